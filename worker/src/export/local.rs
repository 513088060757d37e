//! The `local` exporter: the result filesystem copied into a directory.
