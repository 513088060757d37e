# CI stand-in for gcr.io/distroless/cc-debian12:nonroot (no gcr.io here): glibc, libgcc,
# CA certificates and a nonroot user (65532), nothing else: no shell, no package manager.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE} AS debian
RUN set -e; lib=/lib/$(uname -m)-linux-gnu; \
    mkdir -p /out$lib /out/lib64 /out/etc/ssl/certs /out/tmp /out/home/nonroot; \
    cp -a $lib/libc.so.6 $lib/libm.so.6 $lib/libgcc_s.so.1 $lib/libdl.so.2 \
          $lib/libpthread.so.0 $lib/librt.so.1 /out$lib/; \
    cp -aL /lib64/ld-linux-*.so.* /out/lib64/; \
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >/out/etc/passwd; \
    printf 'root:x:0:\nnonroot:x:65532:\n' >/out/etc/group; \
    chmod 1777 /out/tmp; chown 65532:65532 /out/home/nonroot

FROM scratch
COPY --from=debian /out/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
