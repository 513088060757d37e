FROM debian:12
WORKDIR /app
COPY a.txt /abs/a.txt
COPY *.go src/ ./
COPY --chown=1000:1000 --chmod=0640 conf /etc/conf
COPY --chown=app:staff data/ data
COPY --chown=app bin/ /usr/bin/
COPY --link --exclude=*.tmp --exclude=cache dir/ /dir/
ADD release.tar.gz /opt/
ADD --chown=0:0 local.tar .
COPY --from=nginx:1.27 /etc/nginx/nginx.conf /etc/nginx/
