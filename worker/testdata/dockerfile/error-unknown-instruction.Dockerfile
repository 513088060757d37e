FROM busybox
RUN true
FRM alpine
