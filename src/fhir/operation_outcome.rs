//! `OperationOutcome`: the body of every error the proxy produces itself.

use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IssueSeverity {
    Fatal,
    Error,
    Warning,
    Information,
}

/// One OperationOutcome with a single issue: enough for every error the proxy reports.
#[derive(Debug, Clone)]
pub struct OperationOutcome {
    pub severity: IssueSeverity,
    /// An R4 `IssueType` code, e.g. `invalid`, `not-found`, `transient`, `timeout`, `exception`.
    pub code: &'static str,
    pub diagnostics: String,
}

impl OperationOutcome {
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: IssueSeverity::Error,
            code,
            diagnostics: diagnostics.into(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": self.severity,
                "code": self.code,
                "diagnostics": self.diagnostics,
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_r4_operation_outcome() {
        let oo = OperationOutcome::error("invalid", "bad _since").to_json();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["severity"], "error");
        assert_eq!(oo["issue"][0]["code"], "invalid");
        assert_eq!(oo["issue"][0]["diagnostics"], "bad _since");
    }
}
