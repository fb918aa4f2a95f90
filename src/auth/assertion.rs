//! Client assertions: the signed JWT a backend-services client authenticates with
//! (`private_key_jwt`, RFC 7523 §3; SMART App Launch "Backend Services" and
//! "client-confidential-asymmetric"; SPEC A4.8–15).
//!
//! Everything that can be checked without a key is checked first, on the raw segments, so hostile
//! input fails early with a precise reason: size, shape, `alg` (RS384 or ES384 only: never `none`,
//! never an HMAC whose secret an attacker could derive from a public key), `typ`, `kid`. The key
//! is then chosen by [`select_key`] (exactly one key with that `kid` and a matching type), the
//! signature verified by jsonwebtoken with the one algorithm the header named, and the claims checked
//! by [`check_claims`] against an explicit clock, so the time rules are unit-tested.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::Value;

/// Longest assertion accepted. A JWT with an RSA-4096 signature and a long `jku` is under 2 KiB;
/// anything far larger is not an assertion and is refused before decoding.
pub const MAX_ASSERTION_BYTES: usize = 16 * 1024;

/// Longest `exp - now` accepted (SMART: "no more than five minutes in the future").
pub const MAX_LIFETIME_SECS: u64 = 300;

/// The algorithms a client may sign with (SPEC A4.3).
pub const ALGORITHMS: [&str; 2] = ["RS384", "ES384"];

/// The header fields that matter, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionHeader {
    pub alg: Algorithm,
    pub kid: String,
    pub jku: Option<String>,
}

/// An assertion split into its parts, not yet verified.
#[derive(Debug)]
pub struct UnverifiedAssertion {
    pub header: AssertionHeader,
    /// The claims as sent; trust nothing here until the signature is checked.
    pub claims: Value,
}

/// Splits and decodes an assertion and checks its header. Errors are reasons for
/// `invalid_client`.
pub fn parse(assertion: &str) -> Result<UnverifiedAssertion, String> {
    if assertion.len() > MAX_ASSERTION_BYTES {
        return Err(format!(
            "the client assertion is {} bytes; at most {MAX_ASSERTION_BYTES} are accepted",
            assertion.len()
        ));
    }
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, _signature] = parts.as_slice() else {
        return Err("the client assertion is not a signed JWT (three base64url parts)".into());
    };
    let header = decode_segment(header, "header")?;
    let claims = decode_segment(claims, "claims")?;
    Ok(UnverifiedAssertion {
        header: check_header(&header)?,
        claims,
    })
}

fn decode_segment(segment: &str, name: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| format!("the JWT {name} is not base64url"))?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|_| format!("the JWT {name} is not JSON"))?;
    if !value.is_object() {
        return Err(format!("the JWT {name} is not a JSON object"));
    }
    Ok(value)
}

/// Checks `alg`, `typ`, `kid` and `jku` (SPEC A4.8).
pub fn check_header(header: &Value) -> Result<AssertionHeader, String> {
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let alg = match alg {
        "RS384" => Algorithm::RS384,
        "ES384" => Algorithm::ES384,
        other => {
            return Err(format!(
                "alg {other:?} is not accepted: sign with RS384 or ES384"
            ));
        }
    };
    match header.get("typ").and_then(Value::as_str) {
        Some(typ) if typ.eq_ignore_ascii_case("JWT") => {}
        other => return Err(format!("typ must be \"JWT\", not {other:?}")),
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or("the JWT header has no kid")?;
    if !is_safe_kid(kid) {
        return Err(
            "kid must be 1 to 128 characters from A-Z a-z 0-9 - _ . : = + and must not contain \"..\""
                .into(),
        );
    }
    let jku = match header.get("jku") {
        None => None,
        Some(Value::String(jku)) => Some(jku.clone()),
        Some(_) => return Err("jku must be a string".into()),
    };
    if header.get("crit").is_some() {
        return Err("crit header parameters are not supported".into());
    }
    Ok(AssertionHeader {
        alg,
        kid: kid.to_owned(),
        jku,
    })
}

/// A `kid` that is safe to log and compare: no path separators, quotes, spaces or control characters.
fn is_safe_kid(kid: &str) -> bool {
    (1..=128).contains(&kid.len())
        && !kid.contains("..")
        && kid.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'=' | b'+')
        })
}

/// Why no key could be chosen.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyChoice {
    None,
    Several(usize),
}

/// The one key in `keys` with this `kid` whose type fits `alg` (SPEC A4.13 (c)): RSA for RS384,
/// EC on P-384 for ES384. Keys marked for another use (`use` other than `sig`, or `key_ops`
/// without `verify`) do not count.
pub fn select_key<'k>(
    keys: &'k [Value],
    kid: &str,
    alg: Algorithm,
) -> Result<&'k Value, KeyChoice> {
    let fits = |key: &&Value| {
        let text = |name: &str| key.get(name).and_then(Value::as_str);
        let type_fits = match alg {
            Algorithm::RS384 => text("kty") == Some("RSA"),
            Algorithm::ES384 => text("kty") == Some("EC") && text("crv") == Some("P-384"),
            _ => false,
        };
        let use_fits = text("use").is_none_or(|u| u == "sig");
        let ops_fit = key
            .get("key_ops")
            .and_then(Value::as_array)
            .is_none_or(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        text("kid") == Some(kid) && type_fits && use_fits && ops_fit
    };
    let mut matching = keys.iter().filter(fits);
    match (matching.next(), matching.count()) {
        (None, _) => Err(KeyChoice::None),
        (Some(key), 0) => Ok(key),
        (Some(_), more) => Err(KeyChoice::Several(more + 1)),
    }
}

/// What the claims must say.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub client_id: &'a str,
    /// The token endpoint URL the client was told (the `aud`).
    pub token_url: &'a str,
    /// Seconds since the epoch.
    pub now: u64,
    pub skew: u64,
}

/// The claims that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedClaims {
    pub jti: String,
    pub exp: u64,
}

/// Checks `iss`, `sub`, `aud`, `exp`, `nbf`, `iat` and `jti` (SPEC A4.9, A4.14; RFC 7523 §3).
pub fn check_claims(claims: &Value, expected: &Expected<'_>) -> Result<CheckedClaims, String> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    match (text("iss"), text("sub")) {
        (Some(iss), _) if iss != expected.client_id => {
            return Err("iss must be the client_id".into());
        }
        (Some(_), Some(sub)) if sub == expected.client_id => {}
        (None, _) => return Err("the assertion has no iss".into()),
        _ => return Err("sub must equal iss (the client_id)".into()),
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == expected.token_url,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(expected.token_url)),
        _ => false,
    };
    if !aud_ok {
        return Err(format!(
            "aud must be the token endpoint URL {:?}",
            expected.token_url
        ));
    }
    let now = expected.now;
    let skew = expected.skew;
    let exp = numeric_date(claims, "exp")?.ok_or("the assertion has no exp")?;
    if exp.saturating_add(skew) < now {
        return Err("the assertion has expired (exp)".into());
    }
    if exp > now + MAX_LIFETIME_SECS + skew {
        return Err(format!(
            "exp is more than {MAX_LIFETIME_SECS} seconds in the future"
        ));
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now + skew
    {
        return Err("the assertion is not valid yet (nbf)".into());
    }
    if let Some(iat) = numeric_date(claims, "iat")?
        && iat > now + skew
    {
        return Err("the assertion was issued in the future (iat)".into());
    }
    let jti = match claims.get("jti") {
        Some(Value::String(jti)) if !jti.is_empty() && jti.len() <= 256 => jti.clone(),
        _ => return Err("jti must be a string of 1 to 256 characters".into()),
    };
    Ok(CheckedClaims { jti, exp })
}

/// A NumericDate claim (RFC 7519 §2): a JSON number of seconds; fractions are dropped.
fn numeric_date(claims: &Value, name: &str) -> Result<Option<u64>, String> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(f)) if f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
            _ => Err(format!("{name} must be a positive number of seconds")),
        },
        Some(_) => Err(format!(
            "{name} must be a number of seconds since the epoch"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;
    const TOKEN_URL: &str = "https://proxy.example/fhir/token";

    fn expected() -> Expected<'static> {
        Expected {
            client_id: "client-1",
            token_url: TOKEN_URL,
            now: NOW,
            skew: 60,
        }
    }

    fn claims() -> Value {
        json!({
            "iss": "client-1", "sub": "client-1", "aud": TOKEN_URL,
            "exp": NOW + 240, "iat": NOW, "jti": "abc-1"
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut c = claims();
        c[field] = value;
        c
    }

    fn without(field: &str) -> Value {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(field);
        c
    }

    fn fails(claims: Value, reason: &str) {
        let err = check_claims(&claims, &expected()).unwrap_err();
        assert!(err.contains(reason), "{claims}: {err}");
    }

    #[test]
    fn good_claims_pass_and_yield_jti_and_exp() {
        let checked = check_claims(&claims(), &expected()).unwrap();
        assert_eq!(checked.jti, "abc-1");
        assert_eq!(checked.exp, NOW + 240);
        assert!(check_claims(&with("aud", json!(["x", TOKEN_URL])), &expected()).is_ok());
    }

    #[test]
    fn issuer_and_subject_must_both_be_the_client() {
        fails(
            with("iss", json!("someone-else")),
            "iss must be the client_id",
        );
        fails(with("sub", json!("someone-else")), "sub must equal iss");
        fails(without("sub"), "sub must equal iss");
        fails(without("iss"), "no iss");
    }

    #[test]
    fn audience_must_be_the_token_endpoint() {
        fails(
            with("aud", json!("https://proxy.example/fhir")),
            "aud must be",
        );
        fails(with("aud", json!(TOKEN_URL.to_uppercase())), "aud must be");
        fails(without("aud"), "aud must be");
    }

    #[test]
    fn time_claims_allow_the_skew_and_no_more() {
        assert!(
            check_claims(&with("exp", json!(NOW - 59)), &expected()).is_ok(),
            "within skew"
        );
        fails(with("exp", json!(NOW - 61)), "expired");
        fails(with("exp", json!(NOW + 300 + 61)), "more than 300 seconds");
        assert!(check_claims(&with("exp", json!(NOW + 300)), &expected()).is_ok());
        fails(with("nbf", json!(NOW + 120)), "not valid yet");
        fails(with("iat", json!(NOW + 120)), "issued in the future");
        assert!(check_claims(&with("iat", json!(NOW + 30)), &expected()).is_ok());
        fails(with("exp", json!("tomorrow")), "exp must be a number");
        fails(with("exp", json!(-5)), "exp must be a positive number");
        fails(without("exp"), "no exp");
        assert!(check_claims(&with("exp", json!((NOW + 10) as f64 + 0.5)), &expected()).is_ok());
    }

    #[test]
    fn jti_is_required() {
        fails(without("jti"), "jti");
        fails(with("jti", json!("")), "jti");
        fails(with("jti", json!(7)), "jti");
        fails(with("jti", json!("x".repeat(257))), "jti");
    }

    fn header(value: Value) -> Result<AssertionHeader, String> {
        check_header(&value)
    }

    #[test]
    fn only_rs384_and_es384_with_typ_jwt_and_a_plain_kid_are_accepted() {
        let ok = header(json!({"alg": "ES384", "typ": "JWT", "kid": "key-1"})).unwrap();
        assert_eq!(ok.alg, Algorithm::ES384);
        assert!(header(json!({"alg": "RS384", "typ": "jwt", "kid": "a:b=c+d.e_f"})).is_ok());
        for alg in ["none", "HS256", "RS256", "ES256", "PS384", ""] {
            let err = header(json!({"alg": alg, "typ": "JWT", "kid": "k"})).unwrap_err();
            assert!(err.contains("not accepted"), "{alg}: {err}");
        }
        assert!(header(json!({"typ": "JWT", "kid": "k"})).is_err(), "no alg");
        assert!(
            header(json!({"alg": "ES384", "kid": "k"}))
                .unwrap_err()
                .contains("typ")
        );
        assert!(header(json!({"alg": "ES384", "typ": "at+jwt", "kid": "k"})).is_err());
        assert!(
            header(json!({"alg": "ES384", "typ": "JWT"}))
                .unwrap_err()
                .contains("no kid")
        );
        for kid in [
            "../../etc/passwd",
            "a/b",
            "k\"ey",
            "k'ey",
            "k ey",
            "k\\ey",
            "",
            "k\ney",
        ] {
            let err = header(json!({"alg": "ES384", "typ": "JWT", "kid": kid})).unwrap_err();
            assert!(err.contains("kid must be"), "{kid:?}: {err}");
        }
        assert!(header(json!({"alg": "ES384", "typ": "JWT", "kid": "k", "jku": 3})).is_err());
        assert!(
            header(json!({"alg": "ES384", "typ": "JWT", "kid": "k", "crit": ["exp"]})).is_err()
        );
    }

    #[test]
    fn malformed_assertions_are_refused_before_any_key_is_looked_up() {
        assert!(parse("").unwrap_err().contains("three"));
        assert!(parse("a.b").unwrap_err().contains("three"));
        assert!(parse("a.b.c.d").unwrap_err().contains("three"));
        assert!(parse("!!!.e30.sig").unwrap_err().contains("base64url"));
        assert!(
            parse("bm90IGpzb24.e30.sig")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(parse("WzFd.e30.sig").unwrap_err().contains("object"));
        let huge = format!("{}.e30.sig", "A".repeat(MAX_ASSERTION_BYTES));
        assert!(parse(&huge).unwrap_err().contains("at most"));
    }

    #[test]
    fn exactly_one_key_of_the_right_type_must_match_the_kid() {
        let rsa = json!({"kty": "RSA", "kid": "a", "n": "AQAB", "e": "AQAB"});
        let ec = json!({"kty": "EC", "kid": "a", "crv": "P-384", "x": "AA", "y": "AA"});
        let ec256 = json!({"kty": "EC", "kid": "b", "crv": "P-256", "x": "AA", "y": "AA"});
        let enc = json!({"kty": "EC", "kid": "c", "crv": "P-384", "use": "enc"});
        let keys = vec![rsa.clone(), ec.clone(), ec256, enc];
        assert_eq!(select_key(&keys, "a", Algorithm::RS384), Ok(&rsa));
        assert_eq!(select_key(&keys, "a", Algorithm::ES384), Ok(&ec));
        assert_eq!(
            select_key(&keys, "b", Algorithm::ES384),
            Err(KeyChoice::None),
            "wrong curve"
        );
        assert_eq!(
            select_key(&keys, "c", Algorithm::ES384),
            Err(KeyChoice::None),
            "not for signatures"
        );
        assert_eq!(
            select_key(&keys, "z", Algorithm::ES384),
            Err(KeyChoice::None)
        );
        let twins = vec![ec.clone(), ec];
        assert_eq!(
            select_key(&twins, "a", Algorithm::ES384),
            Err(KeyChoice::Several(2))
        );
    }
}
