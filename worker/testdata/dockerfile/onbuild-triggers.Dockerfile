FROM example/onbuild-base:1
RUN echo "after triggers: $FROM_TRIGGER"
