FROM alpine
ENV WHO=world
RUN <<EOF
echo "hello $WHO"
apk add --no-cache curl
EOF
RUN <<-EOT
	echo tabs stripped
	EOT
RUN python3 <<PY > /out.txt
print("hi")
PY
RUN <<EOF
#!/bin/sh
echo script with shebang
EOF
COPY <<EOF /etc/motd
Welcome, $WHO
EOF
COPY <<"EOF" <<-CFG /etc/app/
literal $WHO
EOF
	key=$WHO
	CFG
