//! Bulk export (SPEC A5–A10): kick-off parsing ([`kickoff`]), planning ([`plan`]), upstream paging
//! ([`pager`]), NDJSON ([`ndjson`], [`writer`]), the workers that run units ([`worker`]), the
//! finaliser that builds the manifest's files ([`finalize`]), the sweeper ([`sweep`]) and deleting a job with its files
//! ([`cancel`]: a client's DELETE, the operator's `jobs cancel`, expiry).
//!
//! The flow: a kick-off is validated and planned into units stored with the job; workers on every
//! replica claim units with a lease, page through the upstream, append each page's lines to the
//! unit's part files and commit a checkpoint after each page; the worker that finishes the last
//! unit finalises the job (removing duplicates across searches, writing the error file) and the
//! manifest becomes available. Any replica's sweeper finalises a job whose finisher died.

pub mod cancel;
pub mod compartment;
pub mod finalize;
pub mod group;
pub mod kickoff;
pub mod membership;
pub mod ndjson;
pub mod pager;
pub mod plan;
pub mod sweep;
pub mod worker;
pub mod writer;

pub use worker::Exporter;
