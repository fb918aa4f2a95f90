//! Bulk export (SPEC A5–A10): kick-off parsing ([`kickoff`]), planning ([`plan`]), upstream paging
//! ([`pager`]), NDJSON ([`ndjson`], [`writer`]); the [`Exporter`] that jobs are submitted to
//! ([`exporter`]), its workers that claim units under a lease ([`worker`]) and run them
//! ([`mod@unit`]), the finaliser that builds the manifest's files ([`finalize`]) and fetches the
//! supporting resources the exported data references ([`supporting`]), the sweeper
//! ([`sweep`]), and deleting a job with its files ([`cancel`]: a client's DELETE, the operator's
//! `jobs cancel`, expiry, and a writer that finds its job gone).
//!
//! The flow: a kick-off is validated and planned into units stored with the job; workers on every
//! replica claim units with a lease, page through the upstream, append each page's lines to the
//! unit's part files and commit a checkpoint after each page; the worker that finishes the last
//! unit finalises the job (removing duplicates across searches, writing the error file) and the
//! manifest becomes available; a job planned with no units is finalised by the finaliser task of
//! the process it was submitted to. Any replica's sweeper finalises a job whose finisher died.
//! Request handlers only submit jobs: nothing is finalised inside a request.

pub mod cancel;
pub mod compartment;
pub mod exporter;
pub mod finalize;
pub mod group;
pub mod kickoff;
pub mod membership;
pub mod ndjson;
pub mod pager;
pub mod plan;
pub mod supporting;
pub mod sweep;
pub mod unit;
pub mod worker;
pub mod writer;

pub use exporter::Exporter;
