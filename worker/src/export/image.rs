//! The `image` exporter: layer blobs, config and manifest into the content store, and
//! push to a registry.
