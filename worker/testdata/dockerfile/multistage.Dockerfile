FROM golang:1.22 AS build
WORKDIR /src
COPY . .
RUN go build -o /out/app ./cmd/app

FROM unreachable:1 AS unused
RUN echo never converted

FROM build AS test
RUN go test ./...

FROM alpine:3.20
COPY --from=build /out/app /usr/local/bin/app
COPY --from=0 /src/README.md /doc/
ENTRYPOINT ["/usr/local/bin/app"]
