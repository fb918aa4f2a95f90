//! The test client's keys (testkit::client) against the proxy's own key generator: what
//! `keygen` prints is what a client signs with, and what the proxy verifies.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhir_bulk_proxy::auth::keygen::{self, KeyAlgorithm};
use serde_json::{Value, json};
use testkit::client::ClientKey;

#[test]
fn a_keygen_key_signs_assertions_with_its_algorithm_and_kid() {
    for algorithm in [KeyAlgorithm::Es384, KeyAlgorithm::Rs384] {
        let generated = keygen::generate(algorithm).unwrap();
        let key = ClientKey::from_json(&generated.private_jwk).unwrap();
        assert_eq!(key.alg(), algorithm.name());
        let jwt = key.assertion("c1", "http://proxy/token").unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(header["kid"], generated.kid.as_str());
        assert_eq!(header["alg"], algorithm.name());
        assert_eq!(claims["iss"], "c1");
        assert_eq!(claims["sub"], "c1");
        assert_eq!(claims["aud"], "http://proxy/token");
    }
}

#[test]
fn an_assertion_verifies_with_the_public_jwk_keygen_printed() {
    for algorithm in [KeyAlgorithm::Es384, KeyAlgorithm::Rs384] {
        let generated = keygen::generate(algorithm).unwrap();
        let key = ClientKey::from_json(&generated.private_jwk).unwrap();
        let jwt = key.assertion("c1", "http://proxy/token").unwrap();
        let public: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(generated.public_jwks["keys"][0].clone()).unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&public).unwrap();
        let alg = algorithm.name().parse().unwrap();
        let mut validation = jsonwebtoken::Validation::new(alg);
        validation.set_audience(&["http://proxy/token"]);
        let claims = jsonwebtoken::decode::<Value>(&jwt, &decoding, &validation).unwrap();
        assert_eq!(claims.claims["iss"], "c1");
        // Another key's signature does not verify.
        let other = keygen::generate(algorithm).unwrap();
        let other = ClientKey::from_json(&other.private_jwk).unwrap();
        let forged = other.assertion("c1", "http://proxy/token").unwrap();
        assert!(jsonwebtoken::decode::<Value>(&forged, &decoding, &validation).is_err());
    }
}

#[test]
fn a_key_without_kid_or_of_another_type_is_refused() {
    let mut generated = keygen::generate(KeyAlgorithm::Es384).unwrap().private_jwk;
    generated.as_object_mut().unwrap().remove("kid");
    assert!(ClientKey::from_json(&generated).is_err());
    assert!(ClientKey::from_json(&json!({"kty": "oct", "k": "AAAA", "kid": "x"})).is_err());
    assert!(ClientKey::from_json(&json!("not a key")).is_err());
}
