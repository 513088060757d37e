//! The `docker` exporter: a tarball `docker load` accepts.
