//! fhir-bulk-proxy: a reverse-proxy sidecar that adds FHIR Bulk Data `$export` and SMART Backend
//! Services to an ordinary FHIR R4 server.
//!
//! - [`config`]: the typed configuration (defaults < `proxy.toml` < `BULK_PROXY_*` environment), its
//!   validation, relative paths resolved against the file's directory, and the one list of
//!   warnings that `run` logs and `check-config` prints.
//! - [`server`]: the listener (plain or TLS), HTTP/1.1 + HTTP/2, graceful shutdown.
//! - [`app`]: the state shared by all handlers.
//! - [`routes`]: the route table, the one description of what the proxy answers itself, from which
//!   the router, the fast path's choice and the tests are derived.
//! - [`http`]: one module per endpoint the proxy answers itself, the router built from
//!   [`routes`], the gate every passthrough request goes through, and the error boundary that turns
//!   every error into an OperationOutcome.
//! - [`auth`]: SMART Backend Services: the client registry, client-assertion checks (JWKS URLs with
//!   caching and rotation, single-use `jti`), SMART v1/v2 scopes, and the proxy's own access tokens,
//!   verifiable by any replica without a lookup.
//! - [`proxy`]: passthrough to the upstream, streamed both ways, with the reverse-proxy header rules.
//! - [`fhir`]: the few FHIR wire types the proxy writes (OperationOutcome, CapabilityStatement edits).
//! - [`job`]: the vocabulary `export` and `store` share: an export job, its units of work and their
//!   checkpoints, all persisted as JSON so a rolling upgrade reads the previous version's records.
//! - [`store`]: the `JobStore` trait where jobs, units, leases, poll times and `jti`s live; an
//!   embedded redb file by default (one node, persistent), Redis when replicas share the work. Both
//!   pass one contract suite, and every decision between workers is atomic in both.
//! - [`export`]: kick-off parsing, planning into units, upstream paging, NDJSON writing, the workers
//!   that run units with checkpoints, and job finalisation.
//! - [`storage`]: where export files live (a local directory, shared by replicas as a volume).
//! - [`ops`]: operator commands on the proxy's state: `jobs list | show | cancel`.
//! - [`telemetry`]: logs (JSON or text) and Prometheus metrics.

pub mod app;
pub mod auth;
pub mod config;
pub mod export;
pub mod fhir;
pub mod http;
pub mod job;
pub mod ops;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod storage;
pub mod store;
pub mod telemetry;
