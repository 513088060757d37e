//! Invoking runc/crun: bundle, create/start/wait, kill on cancel, output capture.
