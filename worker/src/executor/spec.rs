//! The OCI runtime spec (config.json) of a build step, built with oci-spec.
