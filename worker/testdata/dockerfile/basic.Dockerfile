FROM busybox
RUN echo hello > /greeting
RUN ["cat", "/greeting"]
CMD ["sh"]
