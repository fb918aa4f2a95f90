//! Operator commands that work on the proxy's state directly rather than through its HTTP API:
//! [`jobs`] lists, shows and cancels export jobs in the configured job store.

pub mod jobs;
