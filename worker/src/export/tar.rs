//! The `tar` exporter: the result filesystem as one tar stream.
