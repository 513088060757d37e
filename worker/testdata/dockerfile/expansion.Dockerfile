FROM busybox
ENV A=a EMPTY="" SPACED="x  y"
ENV B=${A:-d1} C=${UNSET:-d2} D=${EMPTY:-d3} E=${EMPTY-d4} F=${UNSET-d5}
ENV G=${A:+alt} H=${EMPTY:+alt} I=${EMPTY+alt} J=${UNSET+alt}
ENV K='$A single' L="$A double" M=\$A N=a\ b O="q\"uote" P=${A}${A}$A
ENV A=changed Q=$A
ENV LEGACY value with   spaces $A
LABEL "com.example.$A"="label $A" plain=yes
WORKDIR /base/$A
WORKDIR rel/${A}
USER ${A}:grp
EXPOSE 80 ${A:+443}/tcp 53/udp
