# kiln: target=dev
FROM alpine AS base
RUN apk add --no-cache ca-certificates
FROM base AS dev
RUN apk add --no-cache bash
FROM base AS prod
RUN echo prod only
