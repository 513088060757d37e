# kiln: dockerignore=ok\n!\n
FROM busybox
COPY . /
