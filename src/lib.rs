//! fhir-bulk-proxy: a reverse-proxy sidecar that adds FHIR Bulk Data `$export` and SMART Backend
//! Services to an ordinary FHIR R4 server.
//!
//! - [`config`]: the typed configuration (defaults < `proxy.toml` < `BULK_PROXY_*` environment) and
//!   its validation.
//! - [`server`]: the listener (plain or TLS), HTTP/1.1 + HTTP/2, graceful shutdown.
//! - [`app`]: the state shared by all handlers.
//! - [`http`]: one module per endpoint the proxy answers itself, the router, and the error boundary
//!   that turns every error into an OperationOutcome.
//! - [`proxy`]: passthrough to the upstream, streamed both ways, with the reverse-proxy header rules.
//! - [`fhir`]: the few FHIR wire types the proxy writes (OperationOutcome, CapabilityStatement edits).
//! - [`telemetry`]: logs (JSON or text) and Prometheus metrics.

pub mod app;
pub mod config;
pub mod fhir;
pub mod http;
pub mod proxy;
pub mod server;
pub mod telemetry;
