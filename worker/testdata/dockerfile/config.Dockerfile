# kiln: label:org.opencontainers.image.source=https://example.com/repo
FROM busybox
MAINTAINER Jane Doe <jane@example.com>
LABEL version=1 description="a test image"
USER 1000:1000
EXPOSE 8080 9000-9002/udp
VOLUME /data /logs
VOLUME ["/cache", "/tmp/x"]
SHELL ["/bin/ash", "-eo", "pipefail", "-c"]
RUN echo with custom shell
STOPSIGNAL SIGQUIT
HEALTHCHECK --interval=30s --timeout=5s --start-period=1m --retries=3 CMD wget -q -O- http://localhost:8080/ || exit 1
ONBUILD COPY . /app
ONBUILD RUN make
CMD ["serve"]
ENTRYPOINT ["/entry"]
