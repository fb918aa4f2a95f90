//! The few FHIR R4 wire types the proxy builds or edits itself: OperationOutcome (every error
//! response, FHIR R4 §3.1.0 / Bulk Data IG "Response - Error Status") and the bulk-data and SMART
//! entries added to the upstream's CapabilityStatement (Bulk Data IG "Server Capability Documentation"),
//! and the checked `instant` every `_since`, `_until` and `transactionTime` goes through.

pub mod capability;
pub mod instant;
pub mod operation_outcome;
pub mod resource_types;

pub use instant::{Instant, InstantError};
pub use operation_outcome::{Issue, IssueSeverity, OperationOutcome, oauth_error};

/// Media type of FHIR JSON resources.
pub const FHIR_JSON: &str = "application/fhir+json";
