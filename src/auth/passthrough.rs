//! Which passthrough requests a token allows, when `auth.passthrough = true`. The proxy grants read
//! scopes only (SPEC A4.20), so a protected passthrough is read-only: `GET`/`HEAD`, and `POST` to
//! `_search`. A request under a resource type (`Patient/123`, `Observation?code=x`) needs read on that
//! type; anything else (system search, `_history`, operations) needs read on `*`.

use axum::http::Method;

use super::{AuthError, Grant};
use crate::fhir::resource_types::is_resource_type;

/// `path` is the request path below the FHIR base, e.g. `/Patient/123`.
pub fn check(grant: &Grant, method: &Method, path: &str) -> Result<(), AuthError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_search_post = *method == Method::POST && segments.last() == Some(&"_search");
    if !(*method == Method::GET || *method == Method::HEAD || is_search_post) {
        return Err(AuthError::Forbidden(format!(
            "{method} requests (the proxy grants read access only)"
        )));
    }
    match segments.first().filter(|s| is_resource_type(s)) {
        Some(resource_type) => grant.require_read([*resource_type]),
        None if grant.scopes.can_read_all() => Ok(()),
        None => Err(AuthError::Forbidden(
            "every resource type (needed for requests outside one type)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scopes;

    fn grant(scopes: &str) -> Grant {
        Grant {
            client_id: "c".into(),
            scopes: Scopes::parse(scopes).unwrap(),
        }
    }

    #[test]
    fn reads_of_a_type_need_read_on_that_type() {
        let patients = grant("system/Patient.read");
        assert!(check(&patients, &Method::GET, "/Patient/1").is_ok());
        assert!(check(&patients, &Method::HEAD, "/Patient").is_ok());
        assert!(check(&patients, &Method::POST, "/Patient/_search").is_ok());
        assert!(check(&patients, &Method::GET, "/Observation").is_err());
        assert!(
            check(&patients, &Method::GET, "/").is_err(),
            "system search needs *"
        );
        assert!(check(&grant("system/*.rs"), &Method::GET, "/_history").is_ok());
    }

    #[test]
    fn writes_are_never_allowed() {
        let all = grant("system/*.read");
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(check(&all, &method, "/Patient/1").is_err(), "{method}");
        }
    }
}
