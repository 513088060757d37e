FROM alpine AS deps
RUN echo deps > /deps.txt

FROM alpine
WORKDIR /work
RUN --mount=type=cache,target=/root/.cache,id=gocache,sharing=private \
    --mount=type=cache,target=cache-rel \
    go build ./...
RUN --mount=type=tmpfs,target=/scratch,size=64m true
RUN --mount=type=secret,id=npmrc,target=/root/.npmrc,uid=1000,gid=1000,mode=0440,required=true \
    --mount=type=secret,id=token cat /run/secrets/token
RUN --mount=type=bind,from=deps,source=/deps.txt,target=/mnt/deps.txt \
    --mount=type=bind,target=/ctx,rw \
    --mount=type=bind,from=docker.io/library/golang:1.22,source=/usr/local/go,target=/go \
    cat /mnt/deps.txt
RUN --network=none echo offline
RUN --network=host echo host
RUN --network=default echo default
USER 1000
RUN --mount=type=cache,target=/home/u/.cache,uid=1000,gid=1000,mode=0700 ls
