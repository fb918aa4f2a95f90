//! Every error body the proxy writes itself is built here: the FHIR [`OperationOutcome`] (FHIR R4
//! §3.1.0; Bulk Data IG "Response - Error Status") of its responses and of the export's error
//! files, and, so that no body is assembled by hand anywhere else, the OAuth error JSON of the
//! token and authorization endpoints ([`oauth_error`], RFC 6749 §5.2).

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

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: IssueSeverity,
    /// An R4 `IssueType` code, e.g. `invalid`, `not-found`, `transient`, `timeout`, `exception`.
    pub code: &'static str,
    pub diagnostics: String,
    /// FHIRPath expressions locating the issue (e.g. a kick-off parameter); omitted when empty.
    pub expression: Vec<String>,
}

impl Issue {
    pub fn new(
        severity: IssueSeverity,
        code: &'static str,
        diagnostics: impl Into<String>,
    ) -> Self {
        Self {
            severity,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    /// The issue, located at `expression`.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression.push(expression.into());
        self
    }

    fn to_json(&self) -> Value {
        let mut issue = json!({
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        });
        if !self.expression.is_empty() {
            issue["expression"] = json!(self.expression);
        }
        issue
    }
}

/// An OperationOutcome: one issue for everything the proxy answers, several where one is
/// written for several problems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationOutcome {
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    /// One issue.
    pub fn new(issue: Issue) -> Self {
        Self {
            issues: vec![issue],
        }
    }

    /// One `error` issue with `code`: what every error response says.
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self::new(Issue::new(IssueSeverity::Error, code, diagnostics))
    }

    /// One `information` issue (`informational`): a success answered with an OperationOutcome
    /// (a kick-off accepted, a job deleted).
    pub fn information(diagnostics: impl Into<String>) -> Self {
        Self::new(Issue::new(
            IssueSeverity::Information,
            "informational",
            diagnostics,
        ))
    }

    /// One `warning` issue (`informational`): something the client should know that did not stop
    /// the export (e.g. a parameter ignored under lenient handling), for the error file.
    pub fn warning(diagnostics: impl Into<String>) -> Self {
        Self::new(Issue::new(
            IssueSeverity::Warning,
            "informational",
            diagnostics,
        ))
    }

    /// The outcome with `issue` added.
    pub fn and(mut self, issue: Issue) -> Self {
        self.issues.push(issue);
        self
    }

    pub fn to_json(&self) -> Value {
        json!({
            "resourceType": "OperationOutcome",
            "issue": self.issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
        })
    }

    /// The outcome as one line of JSON without its line break: an NDJSON error file's line.
    pub fn to_line(&self) -> String {
        self.to_json().to_string()
    }
}

/// An RFC 6749 §5.2 error response body: `error` (an RFC 6749 code such as `invalid_client`) and a
/// human-readable `error_description`.
pub fn oauth_error(code: &str, description: &str) -> Value {
    json!({
        "error": code,
        "error_description": description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_an_r4_operation_outcome_with_one_issue() {
        assert_eq!(
            OperationOutcome::error("invalid", "bad _since").to_json(),
            json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad _since"}],
            })
        );
    }

    #[test]
    fn information_and_warning_are_informational() {
        assert_eq!(
            OperationOutcome::information("export 1 deleted").to_json(),
            json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "information", "code": "informational", "diagnostics": "export 1 deleted"}],
            })
        );
        assert_eq!(
            OperationOutcome::warning("_foo ignored").to_json(),
            json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "warning", "code": "informational", "diagnostics": "_foo ignored"}],
            })
        );
    }

    #[test]
    fn several_issues_keep_their_order_and_expressions() {
        let outcome = OperationOutcome::error("invalid", "bad _since")
            .and(Issue::new(IssueSeverity::Warning, "not-supported", "_foo ignored").at("_foo"));
        assert_eq!(
            outcome.to_json(),
            json!({
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "invalid", "diagnostics": "bad _since"},
                    {"severity": "warning", "code": "not-supported", "diagnostics": "_foo ignored", "expression": ["_foo"]},
                ],
            })
        );
    }

    #[test]
    fn a_line_is_the_outcome_on_one_line() {
        let line = OperationOutcome::error("processing", "line\nbreak").to_line();
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(
            line,
            r#"{"issue":[{"code":"processing","diagnostics":"line\nbreak","severity":"error"}],"resourceType":"OperationOutcome"}"#
        );
    }

    #[test]
    fn an_oauth_error_has_exactly_error_and_description() {
        assert_eq!(
            oauth_error("invalid_client", "unknown client").to_string(),
            r#"{"error":"invalid_client","error_description":"unknown client"}"#
        );
    }
}
