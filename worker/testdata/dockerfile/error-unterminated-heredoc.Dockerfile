FROM busybox
RUN <<EOF
echo no end
EOF2
