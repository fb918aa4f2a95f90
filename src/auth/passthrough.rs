//! Which passthrough requests a token allows, when `auth.passthrough = true` (SPEC A1.5: the scopes
//! limit what a client can read). The proxy grants read scopes only (SPEC A4.20), so a protected
//! passthrough is read-only: `GET`/`HEAD`, and `POST` to `_search`; method overrides (`_method`,
//! and the `X-HTTP-Method-Override` headers, refused by the gate) are refused.
//!
//! A token that may read and search every type (`system/*.read`, `system/*.rs`) may read anything.
//! A narrower token may only make requests whose results are resources of the types it covers,
//! and the proxy must be able to tell that from the request alone (DESIGN "One gate": a rule that
//! cannot be checked is refused, not guessed):
//! - reads, version reads and instance histories of one type (SMART v2 `r` on it) and searches and
//!   type histories (`s`): `Patient/1`, `Patient/1/_history/2`, `Patient?name=x`,
//!   `POST Patient/_search` (whose form body is checked too);
//! - search parameters of the search-parameter grammar (`name`, `name:modifier`), without chains,
//!   and `_` parameters from an allow-list of result-neutral ones (`_id`, `_count`, `_sort`,
//!   `_elements`, ...).
//!
//! Refused: `_include`, `_revinclude`, `_has`, chained parameters (`subject.name=`), `_contained`,
//! `_filter`, `_query` and other `_` parameters not on the list, names another parser could read
//! otherwise (leading blanks or controls, `%` left after decoding, a raw `;`), operations
//! (`$everything`), compartment searches (`Patient/1/Observation`), system-level requests, and
//! paths whose segments decode to `.`, `..` or contain `/` or `\`.

use std::borrow::Cow;

use axum::http::Method;
use percent_encoding::percent_decode_str;

use super::{AuthError, Grant};
use crate::fhir::resource_types::{is_fhir_id, is_resource_type};
use crate::fhir::scopes::Permissions;

/// Search parameters whose results are still resources of the searched type only.
const NEUTRAL_PARAMETERS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "_tag",
    "_profile",
    "_security",
    "_source",
    "_text",
    "_content",
    "_language",
    "_count",
    "_offset",
    "_sort",
    "_summary",
    "_elements",
    "_total",
    "_format",
    "_pretty",
    // History.
    "_since",
    "_at",
];

/// Whether this request needs no token: reads of the CapabilityStatement (`/metadata`, in any
/// format or `mode`), which is public (SPEC A2) and which the proxy answers itself in JSON.
pub fn is_public(method: &Method, path: &str) -> bool {
    (*method == Method::GET || *method == Method::HEAD) && path == "/metadata"
}

/// What [`check`] leaves to the caller.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Checked {
    /// Nothing: forward the request.
    Done,
    /// A `POST _search` by a type-limited token: its form body carries parameters too; read it and
    /// pass it to [`check_form`] before forwarding.
    FormToCheck,
}

/// Whether `grant` may make this request. `path` is the raw request path below the FHIR base
/// (`/Patient/123`) and `query` its raw query string.
pub fn check(
    grant: &Grant,
    method: &Method,
    path: &str,
    query: &str,
) -> Result<Checked, AuthError> {
    let segments = decode_segments(path)?;
    let is_search_post =
        *method == Method::POST && segments.last().map(|s| &**s) == Some("_search");
    if !(*method == Method::GET || *method == Method::HEAD || is_search_post) {
        return Err(AuthError::ReadOnly(format!("{method} requests")));
    }
    let parameters: Vec<(Cow<'_, str>, Cow<'_, str>)> =
        url::form_urlencoded::parse(query.as_bytes()).collect();
    if parameters.iter().any(|(name, _)| name == "_method") {
        return Err(AuthError::ReadOnly("method overrides (`_method`)".into()));
    }
    if grant.scopes.allow_all(Permissions::READ_SEARCH) {
        return Ok(Checked::Done);
    }
    let (resource_type, interaction) = single_type(&segments).ok_or_else(|| {
        AuthError::Unchecked(
            "requests other than reads, histories and searches of one resource type".into(),
        )
    })?;
    let (needed, what) = match interaction {
        Interaction::Read => (Permissions::READ, "read"),
        Interaction::Search => (Permissions::SEARCH, "search"),
    };
    if !grant.scopes.allow(resource_type, needed) {
        return Err(AuthError::Forbidden(format!("{resource_type} ({what})")));
    }
    check_parameters(query, parameters)?;
    Ok(if is_search_post {
        Checked::FormToCheck
    } else {
        Checked::Done
    })
}

/// The form body of a `POST _search` that [`check`] answered [`Checked::FormToCheck`] for.
pub fn check_form(form: &[u8]) -> Result<(), AuthError> {
    let text = std::str::from_utf8(form)
        .map_err(|_| AuthError::Unchecked("a search form that is not UTF-8".into()))?;
    check_parameters(text, url::form_urlencoded::parse(form))
}

/// How a request touches its one resource type.
enum Interaction {
    /// A read, version read or instance history (SMART v2 `r`).
    Read,
    /// A search or type history (SMART v2 `s`).
    Search,
}

/// The path's segments, percent-decoded; a trailing `/` is ignored. Segments the upstream could
/// read as path structure are refused.
fn decode_segments(path: &str) -> Result<Vec<Cow<'_, str>>, AuthError> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return Ok(Vec::new());
    }
    path.split('/')
        .map(|raw| {
            let segment = percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| unchecked_path(raw))?;
            let tricky = segment.is_empty()
                || segment == "."
                || segment == ".."
                || segment.contains(['/', '\\'])
                || segment.chars().any(char::is_control);
            if tricky {
                Err(unchecked_path(raw))
            } else {
                Ok(segment)
            }
        })
        .collect()
}

fn unchecked_path(segment: &str) -> AuthError {
    AuthError::Unchecked(format!("the path segment {segment:?}"))
}

/// The one resource type whose resources the request returns, and how, if the path's shape tells.
fn single_type<'a>(segments: &'a [Cow<'_, str>]) -> Option<(&'a str, Interaction)> {
    let first = segments.first().filter(|s| is_resource_type(s))?;
    let shape: Vec<&str> = segments[1..].iter().map(|s| &**s).collect();
    let interaction = match shape.as_slice() {
        [] | ["_search"] | ["_history"] => Interaction::Search,
        [id] | [id, "_history"] if is_fhir_id(id) => Interaction::Read,
        [id, "_history", version] if is_fhir_id(id) && is_fhir_id(version) => Interaction::Read,
        _ => return None,
    };
    Some((&**first, interaction))
}

/// Search parameters a type-limited token may use: names of the search-parameter grammar
/// (`name`, `_name`, with `:modifier`s), no chains, and `_` names only from the neutral list. A raw
/// `;` is refused too: some servers read it as a separator, so what the proxy parsed as one
/// parameter could be two there.
fn check_parameters<'a>(
    raw: &str,
    parameters: impl IntoIterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
) -> Result<(), AuthError> {
    if raw.contains(';') {
        return Err(AuthError::Unchecked(
            "a `;` in the search parameters".into(),
        ));
    }
    for (name, _) in parameters {
        let mut parts = name.split(':');
        let base = parts.next().unwrap_or_default();
        let word =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let grammatical = word(base.strip_prefix('_').unwrap_or(base)) && parts.all(word);
        let neutral = !base.starts_with('_') || NEUTRAL_PARAMETERS.contains(&base);
        if !(grammatical && neutral) {
            let shown: String = name.chars().take(64).collect();
            return Err(AuthError::Unchecked(format!(
                "the search parameter {shown:?}"
            )));
        }
    }
    Ok(())
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

    fn allowed(grant: &Grant, method: Method, target: &str) -> bool {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        check(grant, &method, path, query).is_ok()
    }

    #[test]
    fn reads_of_a_type_need_read_on_that_type() {
        let patients = grant("system/Patient.read");
        for target in [
            "/Patient/1",
            "/Patient",
            "/Patient/",
            "/Patient?name=x&_count=10&_sort=-_lastUpdated",
            "/Patient/1/_history",
            "/Patient/1/_history/2",
            "/Patient/_history?_since=2024-01-01",
            "/%50atient/1",
            "/Patient?general-practitioner:Practitioner=1&name:exact=A",
        ] {
            assert!(allowed(&patients, Method::GET, target), "{target}");
        }
        assert!(allowed(&patients, Method::HEAD, "/Patient"));
        assert!(allowed(&patients, Method::POST, "/Patient/_search"));
        assert!(!allowed(&patients, Method::GET, "/Observation"));
        assert!(
            !allowed(&patients, Method::GET, "/"),
            "system search needs *"
        );
        assert!(allowed(&grant("system/*.rs"), Method::GET, "/_history"));
    }

    #[test]
    fn requests_whose_results_cannot_be_checked_need_every_type() {
        let patients = grant("system/Patient.read");
        let all = grant("system/*.read");
        for target in [
            "/Patient?_revinclude=Observation:patient",
            "/Patient?_include=Patient:organization",
            "/Patient?_include:iterate=Patient:link",
            "/Patient?_has:Observation:patient:code=1234",
            "/Patient?organization.name=Acme",
            "/Patient?general-practitioner:Practitioner.name=x",
            "/Patient?_contained=true",
            "/Patient?_filter=name eq x",
            "/Patient?_query=everything",
            "/Patient?_list=5",
            "/Patient?_type=Observation",
            "/Patient/x/$everything",
            "/Patient/$match",
            "/Patient/x/Observation",
            "/Patient/x/*",
            "/Patient/..%2FObservation",
            "/Patient/%2e%2e/Observation",
            "/Patient/a%2fb",
            "/Patient//1",
            "/Patient/1;x=2",
            "/$export",
            "/_history",
            "/metadata",
        ] {
            assert!(!allowed(&patients, Method::GET, target), "{target}");
            if !target.contains("%2") && !target.contains("//") {
                assert!(allowed(&all, Method::GET, target), "{target}");
            }
        }
    }

    #[test]
    fn reads_and_searches_need_their_own_v2_letters() {
        let read_only = grant("system/Patient.r");
        assert!(allowed(&read_only, Method::GET, "/Patient/1"));
        assert!(allowed(&read_only, Method::GET, "/Patient/1/_history/2"));
        assert!(!allowed(&read_only, Method::GET, "/Patient?name=x"));
        assert!(!allowed(&read_only, Method::GET, "/Patient"));
        assert!(!allowed(&read_only, Method::POST, "/Patient/_search"));
        let search_only = grant("system/Patient.s");
        assert!(allowed(&search_only, Method::GET, "/Patient?name=x"));
        assert!(!allowed(&search_only, Method::GET, "/Patient/1"));
        let all_read = grant("system/*.r");
        assert!(!allowed(&all_read, Method::GET, "/Observation?code=1"));
        assert!(allowed(&all_read, Method::GET, "/Observation/1"));
    }

    #[test]
    fn parameters_another_parser_could_read_otherwise_are_refused() {
        let patients = grant("system/Patient.read");
        for target in [
            "/Patient?+_revinclude=Observation:patient",
            "/Patient?%20_revinclude=Observation:patient",
            "/Patient?%09_include=x",
            "/Patient?%00_has:Observation:patient:code=1",
            "/Patient?%255Frevinclude=Observation:patient",
            "/Patient?name=x;_revinclude=Observation:patient",
            "/Patient?name%3Bx=1",
            "/Patient?=x",
            "/Patient?name:=x",
        ] {
            assert!(!allowed(&patients, Method::GET, target), "{target}");
        }
        assert!(allowed(
            &patients,
            Method::GET,
            "/Patient?%5Fid=1&name:exact=A&birthdate=ge2000"
        ));
        assert!(check_form(b"name=x&_count=2").is_ok());
        assert!(check_form(b"name=x&_revinclude=Observation:patient").is_err());
        assert!(check_form(b"\x00_revinclude=Observation:patient").is_err());
        assert!(check_form(b"name=x;_include=Patient:link").is_err());
    }

    #[test]
    fn a_search_post_asks_for_its_form_to_be_checked_however_it_is_written() {
        let patients = grant("system/Patient.read");
        for path in [
            "/Patient/_search",
            "/Patient/%5Fsearch",
            "/Patient/_searc%68",
        ] {
            assert_eq!(
                check(&patients, &Method::POST, path, ""),
                Ok(Checked::FormToCheck),
                "{path}"
            );
        }
        let all = grant("system/*.read");
        assert_eq!(
            check(&all, &Method::POST, "/Patient/%5Fsearch", ""),
            Ok(Checked::Done)
        );
    }

    #[test]
    fn method_overrides_are_refused_to_every_token() {
        let all = grant("system/*.read");
        assert!(!allowed(&all, Method::GET, "/Patient/1?_method=DELETE"));
    }

    #[test]
    fn writes_are_never_allowed() {
        let all = grant("system/*.read");
        for method in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(!allowed(&all, method.clone(), "/Patient/1"), "{method}");
        }
        assert!(!allowed(&all, Method::POST, "/Patient"));
    }

    #[test]
    fn a_narrow_grant_refuses_path_tricks_whatever_it_covers() {
        let all = grant("system/*.read");
        for target in ["/Patient/%2e%2e", "/Patient/..%2FObservation", "/a//b"] {
            assert!(!allowed(&all, Method::GET, target), "{target}");
        }
    }
}
