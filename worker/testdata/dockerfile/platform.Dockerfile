# kiln: platform=linux/arm64/v8
FROM --platform=$BUILDPLATFORM golang:1.22 AS build
ARG TARGETOS
ARG TARGETARCH
ARG TARGETVARIANT
ARG BUILDPLATFORM
RUN GOOS=$TARGETOS GOARCH=$TARGETARCH go build -o /out/app
FROM alpine
COPY --from=build /out/app /app
