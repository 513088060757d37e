//! The `oci` exporter: an OCI image layout tarball.
