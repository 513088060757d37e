//! The engine's front: [`Engine`] opens a worker root and runs builds (frontend → solver →
//! exporters). The daemonless CLI and the daemon's Control service both call it.

/// The build engine over one worker root.
#[derive(Debug)]
pub struct Engine {}
