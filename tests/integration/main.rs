//! Integration tests: a real proxy on a real socket in front of a fake (or real) upstream.

#![allow(clippy::unwrap_used)]

mod auth;
mod client;
mod conformance;
mod dashboard;
mod demo;
mod differential;
mod export;
mod fast_path;
mod finalize;
mod fleet;
mod gate;
mod hostile_input;
mod jobs_cli;
mod kickoff_fuzz;
mod layering;
mod logs;
mod object_storage;
mod operations;
mod paging_styles;
mod passthrough;
mod progress;
mod redis_tls;
mod reference_config;
mod replicas;
mod scan;
mod store_contract;
mod supporting;
mod timeouts;
mod tls;
mod upstream_auth;
mod upstream_tls;
