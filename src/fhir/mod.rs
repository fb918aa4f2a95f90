//! The few FHIR R4 wire types the proxy builds or edits itself: OperationOutcome (every error
//! response, FHIR R4 §3.1.0 / Bulk Data IG "Response - Error Status") and the bulk-data and SMART
//! entries added to the upstream's CapabilityStatement (Bulk Data IG "Server Capability Documentation"),
//! the checked `instant` every `_since`, `_until` and `transactionTime` goes through, and the SMART
//! scope grammar ([`scopes`]).

pub mod capability;
pub mod compartment;
pub mod instant;
pub mod mandatory_elements;
pub mod operation_outcome;
pub mod resource_types;
pub mod scopes;

pub use instant::{Instant, InstantError};
pub use operation_outcome::{Issue, IssueSeverity, OperationOutcome, oauth_error};

/// The mandatory top-level elements of an R4 resource type (none for a type R4 does not define).
pub fn mandatory_elements(resource_type: &str) -> &'static [&'static str] {
    mandatory_elements::MANDATORY_ELEMENTS
        .binary_search_by(|(t, _)| t.cmp(&resource_type))
        .map_or(&[], |i| mandatory_elements::MANDATORY_ELEMENTS[i].1)
}

/// Media type of FHIR JSON resources.
pub const FHIR_JSON: &str = "application/fhir+json";
