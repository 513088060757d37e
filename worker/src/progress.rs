//! Build progress: vertex lifecycle events, per-vertex statuses and logs, in the shape of
//! BuildKit's `StatusResponse`, sent from the solver to whoever renders or forwards them.
