//! fhir-bulk-proxy: a reverse-proxy sidecar that adds FHIR Bulk Data `$export` and SMART Backend
//! Services to an ordinary FHIR R4 server.
//!
//! ## Where a request goes
//!
//! [`server`] accepts it; [`http`] routes it by the one table in [`routes`]. The proxy answers these
//! itself (paths below the FHIR base unless they start at the server root):
//!
//! | request | handler | then |
//! |---|---|---|
//! | `GET`/`POST` `$export`, `Patient/$export`, `Group/{id}/$export` | `http/export.rs` | [`export::kickoff`] parses, [`export::group`] resolves a Group, [`export::plan`] makes units, [`export::exporter`] submits |
//! | `GET`/`DELETE` `$export-status/{id}` | `http/status.rs` | progress, the manifest; [`export::cancel`] deletes |
//! | `GET` `$export-file/{id}/{name}` | `http/files.rs` | streamed from [`storage`] |
//! | `POST` `{auth.token_path}` (`/token`) | `http/token.rs` | [`auth`]: client assertion, scopes, access token |
//! | `GET` `.well-known/smart-configuration`, `/authorize` | `http/smart.rs` | |
//! | `GET` `metadata` | `http/metadata.rs` | the upstream's CapabilityStatement ([`proxy::metadata`]) plus [`fhir::capability`] |
//! | `GET` `/healthz`, `/readyz`, `/metrics` | `http/ops.rs` | [`telemetry`] |
//! | anything else | [`http::gate`] (scopes, limits), bodiless HTTP/1.1 through [`http::fast`] | [`proxy`]: forwarded, streamed both ways |
//!
//! Every error on the way becomes an OperationOutcome or OAuth error in one place,
//! [`http::error`]. The export itself runs in the background: [`export::worker`] claims units
//! from the [`store`], [`export::unit`] pages through the upstream ([`export::pager`]) into NDJSON
//! files ([`export::ndjson`], [`export::writer`]), [`export::finalize`] writes the manifest's
//! files, [`export::sweep`] expires jobs.
//!
//! ## Modules, from the top down
//!
//! Dependencies point one way, `tests/integration/layering.rs` holds them to it:
//! `server` → `http` → `app` → (`auth`, `export`, `proxy`) → (`store`, `storage`, `fhir`, `job`,
//! `upstream_auth`);
//! `config` and `telemetry` are used from anywhere and import only `fhir` and `config`.
//!
//! - [`server`]: the listener (plain or TLS), HTTP/1.1 + HTTP/2, connection limits, graceful shutdown.
//! - [`http`]: one file per endpoint above, the router built from [`routes`], the passthrough gate,
//!   and the error boundary.
//! - [`app`]: the state shared by all handlers (config, upstream, auth, exporter, store, storage).
//! - [`routes`]: the route table, the one description of what the proxy answers itself, from which
//!   the router, the fast path's choice and the security tests are derived.
//! - [`auth`]: SMART Backend Services: the client registry, client-assertion checks (JWKS URLs with
//!   caching and rotation, single-use `jti`), the proxy's own access tokens, verifiable by any
//!   replica without a lookup, what a token may do on passthrough, `keygen`.
//! - [`export`]: kick-off parsing, Group membership, planning into units, upstream paging, NDJSON
//!   writing, the workers that claim and run units with checkpoints, finalisation, the sweeper.
//! - [`proxy`]: passthrough to the upstream, streamed both ways, with the reverse-proxy header
//!   rules; the upstream's CapabilityStatement cache.
//! - [`upstream_auth`]: what the proxy presents to the upstream on its own behalf: static
//!   credentials or OAuth 2.0 tokens it obtains and renews (`client_credentials`,
//!   `private_key_jwt`), and the one rustls client configuration (`[upstream.tls]`: CA bundle,
//!   client certificate) of export paging, metadata, passthrough and the token requests.
//! - [`store`]: the `JobStore` trait where jobs, units, leases, poll times and `jti`s live; an
//!   embedded redb file by default (one node, persistent), Redis when replicas share the work. Both
//!   pass one contract suite, and every decision between workers is atomic in both.
//! - [`storage`]: where export files live: a local directory (a shared volume for replicas) or an
//!   S3-compatible bucket.
//! - [`job`]: the vocabulary `export` and `store` share: an export job, its units of work and their
//!   checkpoints, all persisted as JSON so a rolling upgrade reads the previous version's records.
//! - [`fhir`]: the FHIR pieces the proxy builds or checks itself: OperationOutcome and OAuth error
//!   bodies, CapabilityStatement edits, the checked `instant`, the SMART scope grammar, R4 resource
//!   types and their mandatory elements.
//! - [`config`]: the typed configuration (defaults < `proxy.toml` < `BULK_PROXY_*` environment), one
//!   file per section with its validation, relative paths resolved against the file's directory,
//!   secrets redacted in one place, and the warnings `run` logs and `check-config` prints.
//! - [`ops`]: operator commands on the proxy's state: `jobs list | show | cancel`.
//! - [`telemetry`]: logs (JSON or text) and Prometheus metrics.
//!
//! Test tooling (the in-memory FHIR server, the Bulk Data client) lives in the dev-only `testkit`
//! crate (`tests/testkit`), not here.

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
pub mod upstream_auth;
