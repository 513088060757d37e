FROM scratch
WORKDIR /app
COPY --chown=10:10 app /app/
COPY cfg/ /etc/cfg/
CMD ["/app/app"]
