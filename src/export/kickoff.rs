//! Kick-off request parsing and validation (SPEC A5; Bulk Data IG "Bulk Data Kick-off Request").
//!
//! GET parameters come from the query string, POST parameters from a FHIR `Parameters` body (and
//! the query string). Repeated list parameters are read as one comma-joined list (A5.5); repeated
//! `_typeFilter`s for one type are OR'ed (A5.19). Under `Prefer: handling=lenient`, unsupported or
//! invalid optional parameters are ignored and reported (A5.8); under strict handling (the default)
//! they are rejected with 400 naming the parameter and the reason.

use serde_json::Value;

use crate::fhir::Instant;
use crate::fhir::resource_types::is_resource_type;
use crate::job::Level;

/// The `_outputFormat` values accepted (all mean NDJSON).
const OUTPUT_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Search parameters that shape results rather than select them: never allowed in `_typeFilter`.
const RESULT_PARAMETERS: &[&str] = &[
    "_include",
    "_revinclude",
    "_sort",
    "_count",
    "_elements",
    "_summary",
    "_total",
    "_contained",
    "_containedType",
    "_format",
    "_pretty",
];

/// A rejected kick-off: the parameter (or header) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {reason}")]
pub struct KickOffError {
    pub param: String,
    pub reason: String,
}

fn reject(param: &str, reason: impl Into<String>) -> KickOffError {
    KickOffError {
        param: param.to_owned(),
        reason: reason.into(),
    }
}

/// A validated kick-off request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KickOff {
    /// `_since` and `_until`, in UTC.
    pub since: Option<Instant>,
    pub until: Option<Instant>,
    /// `_type`, in request order without duplicates; `None` when absent.
    pub types: Option<Vec<String>>,
    /// `_typeFilter`s: (type, query) pairs; several for one type are OR'ed.
    pub type_filters: Vec<(String, String)>,
    /// `_elements`: `elem` or `Type.elem`.
    pub elements: Vec<String>,
    /// `patient` ids (POST only, Patient and Group level).
    pub patients: Vec<String>,
    pub include_associated_data: Vec<String>,
    pub lenient: bool,
    /// The `Prefer` header named a `handling` (strict or lenient): the 202 says it was applied.
    pub handling_asked: bool,
    /// Diagnostics for parameters ignored under lenient handling.
    pub ignored: Vec<String>,
}

impl KickOff {
    /// The `Preference-Applied` of the 202 (RFC 7240 §3): `respond-async`, and the `handling`
    /// used when the client asked for one.
    pub fn preference_applied(&self) -> &'static str {
        match (self.handling_asked, self.lenient) {
            (false, _) => "respond-async",
            (true, false) => "respond-async, handling=strict",
            (true, true) => "respond-async, handling=lenient",
        }
    }
}

/// The raw request, as the HTTP layer saw it.
pub struct RawKickOff<'a> {
    pub level: &'a Level,
    pub is_post: bool,
    pub query: &'a str,
    pub accept: Option<&'a str>,
    pub prefer: Option<&'a str>,
    /// The POST body, parsed as JSON (`None` for GET or an empty body).
    pub body: Option<&'a Value>,
    /// The kick-off's time (`transactionTime`): `_since` may not be later.
    pub now: Instant,
}

/// Parses and validates a kick-off request.
pub fn parse(raw: &RawKickOff<'_>) -> Result<KickOff, KickOffError> {
    check_accept(raw.accept)?;
    let (lenient, handling_asked) = check_prefer(raw.prefer)?;
    let mut params: Vec<(String, ParamValue)> = url::form_urlencoded::parse(raw.query.as_bytes())
        .map(|(k, v)| (k.into_owned(), ParamValue::Text(v.into_owned())))
        .collect();
    if raw.is_post
        && let Some(body) = raw.body
    {
        params.extend(parameters_body(body)?);
    }

    let mut out = KickOff {
        lenient,
        handling_asked,
        ..KickOff::default()
    };
    // Under lenient handling an invalid optional parameter is reported, not fatal.
    let soft = |out: &mut KickOff, error: KickOffError| -> Result<(), KickOffError> {
        if lenient {
            out.ignored
                .push(format!("ignored {}: {}", error.param, error.reason));
            Ok(())
        } else {
            Err(error)
        }
    };

    let mut since_seen = false;
    let mut until_seen = false;
    let mut formats_seen = false;
    for (name, value) in params {
        match name.as_str() {
            "_outputFormat" => {
                let text = value.text(&name)?;
                if formats_seen {
                    return Err(reject(&name, "may be given once"));
                }
                formats_seen = true;
                if !OUTPUT_FORMATS.contains(&text.as_str()) {
                    return Err(reject(
                        &name,
                        format!("{text:?} is not supported; use application/fhir+ndjson"),
                    ));
                }
            }
            "_since" | "_until" => {
                let seen = if name == "_since" {
                    &mut since_seen
                } else {
                    &mut until_seen
                };
                if *seen {
                    return Err(reject(&name, "may be given once"));
                }
                *seen = true;
                let instant = parse_instant(&name, &value.text(&name)?)?;
                if instant > raw.now && name == "_since" {
                    return Err(reject(&name, "is in the future"));
                }
                if name == "_since" {
                    out.since = Some(instant);
                } else {
                    out.until = Some(instant);
                }
            }
            "_type" => {
                let types = out.types.get_or_insert_with(Vec::new);
                for t in split_list(&value.text(&name)?) {
                    if !is_resource_type(&t) {
                        return Err(reject(
                            &name,
                            format!("{t:?} is not a FHIR R4 resource type"),
                        ));
                    }
                    if !types.contains(&t) {
                        types.push(t);
                    }
                }
            }
            "_typeFilter" => {
                let text = value.text(&name)?;
                match parse_type_filter(&text) {
                    Ok(filter) => out.type_filters.push(filter),
                    Err(e) => soft(&mut out, e)?,
                }
            }
            "_elements" => {
                for element in split_list(&value.text(&name)?) {
                    match check_element(&element) {
                        Ok(()) => out.elements.push(element),
                        Err(e) => soft(&mut out, e)?,
                    }
                }
            }
            "patient" => {
                if !raw.is_post {
                    return Err(reject(&name, "is only accepted in a POST Parameters body"));
                }
                if *raw.level == Level::System {
                    return Err(reject(&name, "does not apply to a system-level export"));
                }
                let reference = value.reference();
                let id = reference
                    .strip_prefix("Patient/")
                    .filter(|id| is_fhir_id(id))
                    .ok_or_else(|| {
                        reject(&name, format!("{reference:?} is not a Patient reference"))
                    })?;
                if !out.patients.iter().any(|p| p == id) {
                    out.patients.push(id.to_owned());
                }
            }
            "includeAssociatedData" => {
                let values = split_list(&value.text(&name)?);
                let e = reject(&name, "associated data is not supported by this server");
                if lenient {
                    out.include_associated_data.extend(values);
                }
                soft(&mut out, e)?;
            }
            "allowPartialManifests" => {
                // A boolean (SPEC A5.21). Either value is honoured by a complete manifest: partial
                // manifests are something a server MAY return when asked (A6.4), never MUST.
                let text = value.text(&name)?;
                if text != "true" && text != "false" {
                    soft(
                        &mut out,
                        reject(&name, format!("{text:?} is not a boolean (true or false)")),
                    )?;
                }
            }
            "organizeOutputBy" => soft(&mut out, reject(&name, "is not supported by this server"))?,
            other => soft(
                &mut out,
                reject(other, "is not a kick-off parameter of this server"),
            )?,
        }
    }
    if let (Some(since), Some(until)) = (out.since, out.until)
        && until < since
    {
        return Err(reject("_until", "is earlier than _since"));
    }
    Ok(out)
}

/// A parameter value from the query string or from a `Parameters` body.
enum ParamValue {
    Text(String),
    Reference(String),
}

impl ParamValue {
    fn text(&self, name: &str) -> Result<String, KickOffError> {
        match self {
            Self::Text(text) => Ok(text.clone()),
            Self::Reference(_) => Err(reject(name, "expects a string value, not a reference")),
        }
    }

    fn reference(&self) -> String {
        match self {
            Self::Reference(r) | Self::Text(r) => r.clone(),
        }
    }
}

/// Reads a FHIR `Parameters` body (A5.22).
fn parameters_body(body: &Value) -> Result<Vec<(String, ParamValue)>, KickOffError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(reject(
            "body",
            "a POST kick-off body must be a FHIR Parameters resource",
        ));
    }
    let Some(parameters) = body.get("parameter") else {
        return Ok(Vec::new());
    };
    let parameters = parameters
        .as_array()
        .ok_or_else(|| reject("body", "Parameters.parameter must be an array"))?;
    let mut out = Vec::with_capacity(parameters.len());
    for p in parameters {
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| reject("body", "every Parameters.parameter needs a name"))?;
        let value = [
            "valueString",
            "valueInstant",
            "valueDateTime",
            "valueCode",
            "valueUri",
            "valueUrl",
            "valueCanonical",
        ]
        .iter()
        .find_map(|k| p.get(*k).and_then(Value::as_str))
        .map(|s| ParamValue::Text(s.to_owned()))
        .or_else(|| {
            p.get("valueBoolean")
                .and_then(Value::as_bool)
                .map(|b| ParamValue::Text(b.to_string()))
        })
        .or_else(|| {
            p.get("valueReference")
                .and_then(|r| r.get("reference"))
                .and_then(Value::as_str)
                .map(|s| ParamValue::Reference(s.to_owned()))
        })
        .or_else(|| {
            p.get("valueCoding")
                .and_then(|c| c.get("code"))
                .and_then(Value::as_str)
                .map(|s| ParamValue::Text(s.to_owned()))
        })
        .ok_or_else(|| reject(name, "has no supported value[x]"))?;
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// SPEC A5.6: the kick-off answers `application/fhir+json` only, so `Accept` must be that or a
/// wildcard covering it (`*/*`, `application/*`), with any parameters, anywhere in a list, and
/// not refused with `q=0`. `application/json` alone is not enough.
fn check_accept(accept: Option<&str>) -> Result<(), KickOffError> {
    let accept =
        accept.ok_or_else(|| reject("Accept", "header is required (application/fhir+json)"))?;
    let ok = accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f32>() == Ok(0.0)
            })
        });
        !refused
            && matches!(
                media.as_str(),
                "application/fhir+json" | "*/*" | "application/*"
            )
    });
    if ok {
        Ok(())
    } else {
        Err(reject(
            "Accept",
            format!("header {accept:?} is not supported; use application/fhir+json"),
        ))
    }
}

/// Checks `Prefer: respond-async` and returns whether `handling=lenient` was asked for, and
/// whether any `handling` (strict or lenient) was.
fn check_prefer(prefer: Option<&str>) -> Result<(bool, bool), KickOffError> {
    let prefer = prefer.unwrap_or("");
    let tokens: Vec<String> = prefer
        .split([',', ';'])
        .map(|t| t.trim().to_ascii_lowercase().replace(' ', ""))
        .collect();
    if !tokens.iter().any(|t| t == "respond-async") {
        return Err(reject("Prefer", "header must include respond-async"));
    }
    let lenient = tokens.iter().any(|t| t == "handling=lenient");
    let asked = lenient || tokens.iter().any(|t| t == "handling=strict");
    Ok((lenient, asked))
}

/// Parses a FHIR instant; `+` decoded as a space is restored (A5.12).
pub fn parse_instant(param: &str, text: &str) -> Result<Instant, KickOffError> {
    let normalised = text.trim().replace(' ', "+");
    Instant::parse(&normalised).map_err(|e| reject(param, format!("{text:?} {e}")))
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_type_filter(text: &str) -> Result<(String, String), KickOffError> {
    let (resource_type, query) = text.split_once('?').ok_or_else(|| {
        reject(
            "_typeFilter",
            format!("{text:?} is not of the form Type?search"),
        )
    })?;
    if !is_resource_type(resource_type) {
        return Err(reject(
            "_typeFilter",
            format!("{resource_type:?} is not a FHIR R4 resource type"),
        ));
    }
    for (key, _) in url::form_urlencoded::parse(query.as_bytes()) {
        let base = key.split(':').next().unwrap_or("");
        if RESULT_PARAMETERS.contains(&base) {
            return Err(reject(
                "_typeFilter",
                format!("{key} is a result parameter and cannot filter an export"),
            ));
        }
        if key.is_empty() {
            return Err(reject(
                "_typeFilter",
                format!("{text:?} has an invalid search parameter"),
            ));
        }
    }
    Ok((resource_type.to_owned(), query.to_owned()))
}

fn check_element(element: &str) -> Result<(), KickOffError> {
    let (resource_type, name) = match element.split_once('.') {
        Some((t, n)) => (Some(t), n),
        None => (None, element),
    };
    if let Some(t) = resource_type
        && !is_resource_type(t)
    {
        return Err(reject(
            "_elements",
            format!("{t:?} is not a FHIR R4 resource type"),
        ));
    }
    let valid = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(reject(
            "_elements",
            format!("{element:?} is not a top-level element name"),
        ))
    }
}

pub use crate::fhir::resource_types::is_fhir_id;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ACCEPT: Option<&str> = Some("application/fhir+json");
    const PREFER: Option<&str> = Some("respond-async");

    fn get(level: &Level, query: &str) -> Result<KickOff, KickOffError> {
        parse(&RawKickOff {
            level,
            is_post: false,
            query,
            accept: ACCEPT,
            prefer: PREFER,
            body: None,
            now: Instant::now(),
        })
    }

    fn post(level: &Level, body: Value, prefer: &str) -> Result<KickOff, KickOffError> {
        parse(&RawKickOff {
            level,
            is_post: true,
            query: "",
            accept: ACCEPT,
            prefer: Some(prefer),
            body: Some(&body),
            now: Instant::now(),
        })
    }

    #[test]
    fn the_three_output_format_aliases_are_accepted_and_others_rejected() {
        for format in ["application/fhir+ndjson", "application/ndjson", "ndjson"] {
            let query = format!("_outputFormat={}", format.replace('+', "%2B"));
            assert!(get(&Level::System, &query).is_ok(), "{format}");
        }
        for format in ["application/xml", "text/html", "x-custom"] {
            let err = get(&Level::System, &format!("_outputFormat={format}")).unwrap_err();
            assert_eq!(err.param, "_outputFormat");
        }
    }

    #[test]
    fn accept_and_prefer_are_required() {
        let raw = |accept, prefer| RawKickOff {
            level: &Level::System,
            is_post: false,
            query: "",
            accept,
            prefer,
            body: None,
            now: Instant::now(),
        };
        assert_eq!(parse(&raw(None, PREFER)).unwrap_err().param, "Accept");
        assert_eq!(
            parse(&raw(Some("text/html"), PREFER)).unwrap_err().param,
            "Accept"
        );
        assert_eq!(parse(&raw(ACCEPT, None)).unwrap_err().param, "Prefer");
        for (prefer, applied) in [
            ("respond-async", "respond-async"),
            (
                "respond-async, handling=strict",
                "respond-async, handling=strict",
            ),
            (
                "handling=lenient; respond-async",
                "respond-async, handling=lenient",
            ),
            (
                "respond-async,handling = lenient",
                "respond-async, handling=lenient",
            ),
        ] {
            let kickoff = parse(&raw(ACCEPT, Some(prefer))).unwrap();
            assert_eq!(kickoff.preference_applied(), applied, "{prefer}");
        }
        for ok in [
            "application/fhir+json",
            "Application/FHIR+JSON",
            "application/fhir+json; charset=utf-8",
            "*/*",
            "*/*;q=0.1",
            "application/*",
            "application/*; q=0.5",
            "text/html, application/fhir+json;q=0.9",
            "application/json, */*;q=0.1",
        ] {
            assert!(parse(&raw(Some(ok), PREFER)).is_ok(), "{ok}");
        }
        for bad in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json, text/html",
            "application/fhir+xml",
            "text/*",
            "application/fhir+json;q=0",
            "",
        ] {
            let err = parse(&raw(Some(bad), PREFER)).unwrap_err();
            assert_eq!(err.param, "Accept", "{bad}");
            assert!(err.to_string().contains("Accept"), "{bad}");
        }
        assert!(
            parse(&raw(ACCEPT, Some("respond-async, handling=lenient")))
                .unwrap()
                .lenient
        );
    }

    #[test]
    fn since_must_be_a_valid_past_instant() {
        let ok = get(&Level::System, "_since=2024-01-02T03:04:05.123+01:00").unwrap();
        assert_eq!(ok.since.unwrap().to_string(), "2024-01-02T02:04:05.123Z");
        // `+` decoded as a space by a careless client.
        assert!(get(&Level::System, "_since=2024-01-02T03:04:05+01:00").is_ok());
        for bad in ["0000-60-01T30:70:80+05:00", "yesterday", "2024-01-02"] {
            assert_eq!(
                get(&Level::System, &format!("_since={bad}"))
                    .unwrap_err()
                    .param,
                "_since"
            );
        }
        let err = get(&Level::System, "_since=2057-01-01T00:00:00Z").unwrap_err();
        assert!(err.reason.contains("future"));
        let err = get(
            &Level::System,
            "_since=2024-01-02T00:00:00Z&_until=2023-01-01T00:00:00Z",
        )
        .unwrap_err();
        assert_eq!(err.param, "_until");
    }

    #[test]
    fn repeated_types_are_one_list() {
        let k = get(
            &Level::System,
            "_type=Patient,Observation&_type=Condition&_type=Patient",
        )
        .unwrap();
        assert_eq!(k.types.unwrap(), ["Patient", "Observation", "Condition"]);
        assert_eq!(
            get(&Level::System, "_type=MissingType").unwrap_err().param,
            "_type"
        );
    }

    #[test]
    fn type_filters_reject_result_parameters_unless_lenient() {
        let k = get(
            &Level::System,
            "_typeFilter=Observation%3Fcode%3D1234&_typeFilter=Observation%3Fcategory%3Dlab",
        )
        .unwrap();
        assert_eq!(k.type_filters.len(), 2);
        let err = get(
            &Level::System,
            "_typeFilter=Observation%3F_include%3DObservation:subject",
        )
        .unwrap_err();
        assert!(err.reason.contains("_include"));
        let err = get(&Level::System, "_typeFilter=Observation%3F_count%3D5").unwrap_err();
        assert!(err.reason.contains("_count"));
        assert_eq!(
            get(&Level::System, "_typeFilter=NoQuery")
                .unwrap_err()
                .param,
            "_typeFilter"
        );
    }

    #[test]
    fn post_parameters_body_is_read() {
        let body = json!({
            "resourceType": "Parameters",
            "parameter": [
                { "name": "_type", "valueString": "Patient,Observation" },
                { "name": "_since", "valueInstant": "2024-01-01T00:00:00Z" },
                { "name": "patient", "valueReference": { "reference": "Patient/123" } },
                { "name": "patient", "valueReference": { "reference": "Patient/456" } },
                { "name": "_outputFormat", "valueString": "ndjson" }
            ]
        });
        let k = post(&Level::Group("g".into()), body, "respond-async").unwrap();
        assert_eq!(k.types.unwrap(), ["Patient", "Observation"]);
        assert_eq!(k.patients, ["123", "456"]);
        assert!(k.since.is_some());
    }

    #[test]
    fn patient_parameter_rules() {
        let body = json!({ "resourceType": "Parameters", "parameter": [
            { "name": "patient", "valueReference": { "reference": "Patient/1" } }
        ]});
        assert_eq!(
            post(&Level::System, body.clone(), "respond-async")
                .unwrap_err()
                .param,
            "patient"
        );
        assert!(post(&Level::Patient, body, "respond-async").is_ok());
        assert_eq!(
            get(&Level::Patient, "patient=Patient/1").unwrap_err().param,
            "patient"
        );
        let bad = json!({ "resourceType": "Parameters", "parameter": [
            { "name": "patient", "valueReference": { "reference": "Observation/1" } }
        ]});
        assert_eq!(
            post(&Level::Patient, bad, "respond-async")
                .unwrap_err()
                .param,
            "patient"
        );
        assert_eq!(
            post(
                &Level::Patient,
                json!({"resourceType": "Patient"}),
                "respond-async"
            )
            .unwrap_err()
            .param,
            "body"
        );
    }

    #[test]
    fn unsupported_parameters_depend_on_handling() {
        for query in [
            "includeAssociatedData=LatestProvenanceResources",
            "organizeOutputBy=Patient",
            "_bogus=1",
        ] {
            assert!(get(&Level::System, query).is_err(), "{query} strict");
            let lenient = parse(&RawKickOff {
                level: &Level::System,
                is_post: false,
                query,
                accept: ACCEPT,
                prefer: Some("respond-async, handling=lenient"),
                body: None,
                now: Instant::now(),
            })
            .unwrap();
            assert_eq!(lenient.ignored.len(), 1, "{query}");
        }
    }

    #[test]
    fn allow_partial_manifests_is_a_boolean() {
        for query in ["allowPartialManifests=true", "allowPartialManifests=false"] {
            assert!(get(&Level::System, query).is_ok(), "{query}");
        }
        for value in ["banana", "", "TRUE", "1", "true,false"] {
            let err = get(
                &Level::Group("g".into()),
                &format!("allowPartialManifests={value}"),
            )
            .unwrap_err();
            assert_eq!(err.param, "allowPartialManifests", "{value:?}");
        }
        let body = |value: Value| {
            json!({ "resourceType": "Parameters", "parameter": [
                { "name": "allowPartialManifests", "valueBoolean": value } ]})
        };
        assert!(post(&Level::System, body(json!(true)), "respond-async").is_ok());
        assert!(post(&Level::System, body(json!("yes")), "respond-async").is_err());
    }

    #[test]
    fn elements_are_top_level_names() {
        let k = get(&Level::System, "_elements=id,Patient.meta&_elements=status").unwrap();
        assert_eq!(k.elements, ["id", "Patient.meta", "status"]);
        assert!(get(&Level::System, "_elements=Patient.name.given").is_err());
        assert!(get(&Level::System, "_elements=Nope.id").is_err());
    }

    #[test]
    fn instants_outside_0001_to_9999_in_utc_are_rejected_naming_the_parameter() {
        // Issue 14: the first panicked when written back, the second was stored as "".
        for (query, param) in [
            ("_until=9999-12-31T23:59:59-23:59", "_until"),
            ("_until=9999-12-31T23:59:59-01:00", "_until"),
            ("_since=0000-01-01T00:00:00%2B23:59", "_since"),
            ("_since=0001-01-01T00:00:00%2B01:00", "_since"),
        ] {
            let err = get(&Level::System, query).unwrap_err();
            assert_eq!(err.param, param, "{query}");
            assert!(
                err.reason.contains("0001") || err.reason.contains("14:00"),
                "{err}"
            );
        }
        let body = json!({ "resourceType": "Parameters", "parameter": [
            { "name": "_until", "valueInstant": "9999-12-31T23:59:59-23:59" }
        ]});
        let err = post(&Level::Patient, body, "respond-async").unwrap_err();
        assert_eq!(err.param, "_until");
        // Lenient handling does not make them optional.
        let err = parse(&RawKickOff {
            level: &Level::System,
            is_post: false,
            query: "_until=9999-12-31T23:59:59-01:00",
            accept: ACCEPT,
            prefer: Some("respond-async, handling=lenient"),
            body: None,
            now: Instant::now(),
        })
        .unwrap_err();
        assert_eq!(err.param, "_until");
    }

    /// Query strings of kick-off parameters with generated values, instants half the time.
    fn kickoff_query() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let name = prop_oneof![
            Just("_since"),
            Just("_until"),
            Just("_type"),
            Just("_typeFilter"),
            Just("_elements"),
            Just("_outputFormat"),
            Just("patient"),
            Just("includeAssociatedData"),
            Just("\u{0}"),
        ];
        let value = prop_oneof![
            crate::fhir::instant::strategies::instant_like(),
            "\\PC{0,30}",
            "[A-Za-z?=&%+,.0-9:]{0,30}",
        ];
        prop::collection::vec((name, value), 0..6).prop_map(|pairs| {
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish()
        })
    }

    proptest::proptest! {
        /// What the handler does with a kick-off: parse it, then write its instants into the job.
        /// Whatever is accepted must write back as the same instant. (Generated parameters, and
        /// any text after them: the old `never_panics_on_any_query` drew only the latter, which
        /// almost never is an instant, and stopped at `parse`, so it missed the panic.)
        #[test]
        fn accepted_instants_write_back_and_nothing_panics(
            query in kickoff_query(),
            tail in ".{0,100}",
            lenient in proptest::bool::ANY,
        ) {
            let query = format!("{query}&{tail}");
            let prefer = if lenient { "respond-async, handling=lenient" } else { "respond-async" };
            for level in [Level::System, Level::Group("x".into())] {
                let result = parse(&RawKickOff {
                    level: &level,
                    is_post: false,
                    query: &query,
                    accept: ACCEPT,
                    prefer: Some(prefer),
                    body: None,
                    now: Instant::now(),
                });
                if let Ok(k) = result {
                    for instant in k.since.iter().chain(&k.until) {
                        let written = instant.to_string();
                        proptest::prop_assert_eq!(Instant::parse(&written), Ok(*instant));
                    }
                }
            }
        }
    }
}
