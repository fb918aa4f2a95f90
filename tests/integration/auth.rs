//! SMART Backend Services over real sockets: discovery, the token endpoint with good and hostile
//! requests, JWKS URLs (caching, rotation, rate limit, broken servers), and bearer-token
//! enforcement on protected passthrough.

use std::time::{Duration, Instant};

use fhir_bulk_proxy::config::Config;
use serde_json::{Value, json};

use testkit::get_accepting;
use testkit::get_anonymous;
use testkit::get_with_token;
use testkit::smart::{
    ClientKey, JwksServer, SmartClient, TEST_CLIENT, TEST_SIGNING_SECRET, claims, now, post_token,
    register_url, token_form, token_url, unsigned,
};
use testkit::{FakeFhir, TestProxy, outcome, plain_client};

async fn proxy_with(configure: impl FnOnce(&mut Config)) -> (TestProxy, FakeFhirGuard) {
    let fake = FakeFhir::new().start().await;
    let mut config = TestProxy::config(&fake.url());
    configure(&mut config);
    (TestProxy::start(config).await, FakeFhirGuard(fake))
}

/// Keeps the fake upstream alive as long as the test holds it.
struct FakeFhirGuard(#[allow(dead_code)] testkit::fake_fhir::RunningFake);

/// A proxy with the test client registered; returns the client too.
async fn proxy_and_client() -> (TestProxy, SmartClient, FakeFhirGuard) {
    let mut registered = None;
    let (proxy, fake) = proxy_with(|config| registered = Some(SmartClient::register(config))).await;
    (proxy, registered.unwrap(), fake)
}

/// Asserts an RFC 6749 error response with `code` and a 4xx status; returns the description.
async fn oauth_error(response: reqwest::Response, code: &str) -> String {
    let status = response.status();
    assert!(status.is_client_error(), "status {status}");
    assert_json(&response);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    body["error_description"].as_str().unwrap_or("").to_owned()
}

async fn token_with(proxy: &TestProxy, assertion: &str) -> reqwest::Response {
    post_token(proxy, &token_form(assertion, "system/*.read")).await
}

#[tokio::test]
async fn discovery_advertises_absolute_endpoints_without_authentication() {
    let (proxy, _client, _fake) = proxy_and_client().await;
    let response = get_accepting(proxy.url("/.well-known/smart-configuration"), "text/html").await;
    assert_eq!(response.status(), 200);
    assert_json(&response);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["token_endpoint"], token_url(&proxy).as_str());
    assert_eq!(
        doc["authorization_endpoint"],
        proxy.url("/authorize").as_str()
    );
    for (field, value) in [
        ("grant_types_supported", "client_credentials"),
        ("grant_types_supported", "authorization_code"),
        ("token_endpoint_auth_methods_supported", "private_key_jwt"),
        ("token_endpoint_auth_signing_alg_values_supported", "RS384"),
        ("token_endpoint_auth_signing_alg_values_supported", "ES384"),
        ("capabilities", "client-confidential-asymmetric"),
        ("capabilities", "permission-v1"),
        ("capabilities", "permission-v2"),
        ("code_challenge_methods_supported", "S256"),
        ("scopes_supported", "system/*.read"),
    ] {
        assert!(
            doc[field].as_array().unwrap().contains(&json!(value)),
            "{field} lacks {value}"
        );
    }
    assert!(
        doc.get("issuer").is_none(),
        "no issuer without sso-openid-connect"
    );

    let forwarded = plain_client()
        .get(proxy.url("/.well-known/smart-configuration"))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "fhir.example.org")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        forwarded["token_endpoint"],
        "https://fhir.example.org/fhir/token"
    );

    let authorize = get_anonymous(proxy.url("/authorize")).await;
    oauth_error(authorize, "unsupported_response_type").await;
}

#[tokio::test]
async fn es384_and_rs384_clients_get_short_lived_bearer_tokens() {
    let mut clients = Vec::new();
    let (proxy, _fake) = proxy_with(|config| {
        clients.push(SmartClient::register_with(
            config,
            "ec-client",
            ClientKey::es384(),
            &["system/*.read"],
        ));
        clients.push(SmartClient::register_with(
            config,
            "rsa-client",
            ClientKey::rs384(),
            &["system/*.rs"],
        ));
    })
    .await;
    for registered in &clients {
        let assertion = registered.key.assertion(&registered.id, &token_url(&proxy));
        let response = post_token(&proxy, &token_form(&assertion, "system/Patient.read")).await;
        assert_eq!(response.status(), 200, "{}", registered.id);
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(response.headers()["pragma"], "no-cache");
        assert_json(&response);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 300);
        assert_eq!(body["scope"], "system/Patient.read");
        assert!(!body["access_token"].as_str().unwrap().is_empty());
        assert!(body.get("refresh_token").is_none());
    }
}

#[tokio::test]
async fn scopes_follow_the_bulk_data_test_kit_rules() {
    let (proxy, registered, _fake) = proxy_and_client().await;
    let granted = [
        ("system/*.read", "system/*.read"),
        ("system/*.rs", "system/*.rs"),
        ("system/*.*", "system/*.read"),
        ("system/Patient.*", "system/Patient.read"),
        ("system/*.cruds", "system/*.rs"),
        ("system/Patient.cruds", "system/Patient.rs"),
        (
            "system/Patient.read system/Observation.rs",
            "system/Patient.read system/Observation.rs",
        ),
    ];
    for (asked, expected) in granted {
        let assertion = registered.key.assertion(&registered.id, &token_url(&proxy));
        let response = post_token(&proxy, &token_form(&assertion, asked)).await;
        assert_eq!(response.status(), 200, "{asked}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["scope"], expected, "{asked}");
    }
    let refused = [
        "",
        "launch fhirUser",
        "system/Patient.unknownAction",
        "system/Patient.xyz",
        "system/UnknownResource.read",
        "system/UnknownResource.r",
        "system/Patient.write",
        "system/Patient.c",
        "system/Patient.cu",
        "system/Patient.cd",
        "system/Patient.cud",
        "system/Patient.ud",
        "system/Patient.d",
        "system/Patient.u",
        "system/Patient.rs?a=b",
    ];
    for asked in refused {
        let assertion = registered.key.assertion(&registered.id, &token_url(&proxy));
        let response = post_token(&proxy, &token_form(&assertion, asked)).await;
        assert_eq!(response.status(), 400, "{asked}");
        oauth_error(response, "invalid_scope").await;
    }
}

#[tokio::test]
async fn a_client_registered_for_some_types_gets_a_narrowed_wildcard() {
    let mut registered = None;
    let (proxy, _fake) = proxy_with(|config| {
        registered = Some(SmartClient::register_with(
            config,
            "narrow",
            ClientKey::es384(),
            &["system/Patient.read", "system/Observation.read"],
        ));
    })
    .await;
    let registered = registered.unwrap();
    let assertion = registered.key.assertion("narrow", &token_url(&proxy));
    let body: Value = post_token(&proxy, &token_form(&assertion, "system/*.read"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["scope"], "system/Patient.read system/Observation.read");
}

#[tokio::test]
async fn malformed_requests_get_the_right_oauth_errors() {
    let (proxy, registered, _fake) = proxy_and_client().await;
    let good = || registered.key.assertion(&registered.id, &token_url(&proxy));

    // A JSON body instead of a form.
    let json_body = plain_client()
        .post(token_url(&proxy))
        .json(&json!({"grant_type": "client_credentials", "client_assertion": good()}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), 400);
    oauth_error(json_body, "invalid_request").await;

    // Each parameter missing, then each repeated.
    for name in [
        "grant_type",
        "scope",
        "client_assertion_type",
        "client_assertion",
    ] {
        let form: Vec<_> = token_form(&good(), "system/*.read")
            .into_iter()
            .filter(|(k, _)| *k != name)
            .collect();
        let description = oauth_error(post_token(&proxy, &form).await, "invalid_request").await;
        assert!(description.contains(name), "{description}");
        let mut form = token_form(&good(), "system/*.read");
        let again = form.iter().find(|(k, _)| *k == name).unwrap().clone();
        form.push(again);
        let description = oauth_error(post_token(&proxy, &form).await, "invalid_request").await;
        assert!(description.contains("repeated"), "{description}");
    }

    // Wrong grant_type: exactly 400 (Inferno).
    let mut form = token_form(&good(), "system/*.read");
    form[0].1 = "not_a_grant_type".into();
    let response = post_token(&proxy, &form).await;
    assert_eq!(response.status(), 400);
    oauth_error(response, "unsupported_grant_type").await;

    // Wrong client_assertion_type.
    let mut form = token_form(&good(), "system/*.read");
    form[2].1 = "not_an_assertion_type".into();
    oauth_error(post_token(&proxy, &form).await, "invalid_client").await;

    // Garbage instead of a JWT.
    for garbage in ["not-a-jwt", "a.b.c", "!!!.###.$$$", ""] {
        oauth_error(token_with(&proxy, garbage).await, "invalid_client").await;
    }
}

#[tokio::test]
async fn oversized_assertions_and_bodies_are_refused_without_a_server_error() {
    let (proxy, _registered, _fake) = proxy_and_client().await;
    // A 1 MB assertion within the body limit: refused before decoding.
    let big = format!(
        "{}.{}.{}",
        "e".repeat(400_000),
        "e".repeat(400_000),
        "e".repeat(200_000)
    );
    refused_because(&proxy, &big, "at most").await;
    // A body over server.max_body_bytes (1 MiB): 413 with OAuth JSON.
    let huge = "e".repeat(2 * 1024 * 1024);
    let response = token_with(&proxy, &huge).await;
    assert_eq!(response.status(), 413);
    oauth_error(response, "invalid_request").await;
}

/// A proxy with the test client and a second client `id` (`system/*.read`, signing with `key`,
/// `enabled` or not); the test client, the proxy, its upstream and the token URL.
async fn with_second_client(
    id: &str,
    key: &ClientKey,
    enabled: bool,
) -> (SmartClient, TestProxy, FakeFhirGuard, String) {
    let mut registered = None;
    let (proxy, fake) = proxy_with(|config| {
        registered = Some(SmartClient::register(config));
        SmartClient::register_with(config, id, key.clone(), &["system/*.read"]);
        config.auth.clients.last_mut().unwrap().enabled = enabled;
    })
    .await;
    let url = token_url(&proxy);
    (registered.unwrap(), proxy, fake, url)
}

#[tokio::test]
async fn hostile_headers_are_refused_as_invalid_client() {
    let rsa = ClientKey::rs384();
    let (registered, proxy, _fake, url) = with_second_client("rsa-client", &rsa, true).await;
    let key = &registered.key;
    let good_claims = || claims(TEST_CLIENT, &url);

    // alg none, with and without a signature.
    let none = json!({"alg": "none", "typ": "JWT", "kid": key.kid});
    for signature in [&b""[..], b"x"] {
        let jwt = unsigned(&none, &good_claims(), signature);
        refused_because(&proxy, &jwt, "not accepted").await;
    }

    // HS256 keyed with the RSA public key (the classic algorithm-confusion attack).
    let public_bytes = rsa.public.to_string();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(rsa.kid.clone());
    header.typ = Some("JWT".into());
    let confused = jsonwebtoken::encode(
        &header,
        &claims("rsa-client", &url),
        &jsonwebtoken::EncodingKey::from_secret(public_bytes.as_bytes()).unwrap(),
    )
    .unwrap();
    oauth_error(token_with(&proxy, &confused).await, "invalid_client").await;

    // Unknown kid; kid with path or quote characters.
    let stranger = key.with_kid("unknown-kid");
    refused_because(
        &proxy,
        &stranger.assertion(TEST_CLIENT, &url),
        "no registered key",
    )
    .await;
    for kid in ["../../etc/passwd", "key\"1", "key'1", "a/b"] {
        let mut header = key.header();
        header["kid"] = json!(kid);
        let jwt = key.sign(&header, &good_claims());
        let description = oauth_error(token_with(&proxy, &jwt).await, "invalid_client").await;
        assert!(description.contains("kid must be"), "{kid}: {description}");
    }

    // typ other than JWT; a jku for an inline-registered client.
    let mut header = key.header();
    header["typ"] = json!("at+jwt");
    oauth_error(
        token_with(&proxy, &key.sign(&header, &good_claims())).await,
        "invalid_client",
    )
    .await;
    let mut header = key.header();
    header["jku"] = json!("test-bad-jku");
    refused_because(&proxy, &key.sign(&header, &good_claims()), "jku").await;

    // Signed by another key under the registered kid.
    let impostor = ClientKey::es384().with_kid(&key.kid);
    refused_because(&proxy, &impostor.assertion(TEST_CLIENT, &url), "signature").await;
}

#[tokio::test]
async fn hostile_claims_are_refused_as_invalid_client() {
    let disabled = ClientKey::es384();
    let (registered, proxy, _fake, url) = with_second_client("disabled", &disabled, false).await;
    let key = &registered.key;
    let now = now();
    let with = |field: &str, value: Value| {
        let mut c = claims(TEST_CLIENT, &url);
        c[field] = value;
        key.sign(&key.header(), &c)
    };
    let cases = [
        (with("exp", json!(now - 600)), "expired"),
        (with("nbf", json!(now + 600)), "not valid yet"),
        (with("iat", json!(now + 600)), "issued in the future"),
        (with("exp", json!(now + 3600)), "more than 300 seconds"),
        (
            with("aud", json!("https://elsewhere.example/token")),
            "aud must be",
        ),
        (with("sub", json!("someone-else")), "sub must equal iss"),
        (with("iss", json!("nobody-knows-me")), "unknown client"),
        (with("jti", json!("")), "jti"),
    ];
    for (jwt, reason) in cases {
        let description = oauth_error(token_with(&proxy, &jwt).await, "invalid_client").await;
        assert!(description.contains(reason), "{reason}: {description}");
    }

    // A disabled client.
    refused_because(&proxy, &disabled.assertion("disabled", &url), "disabled").await;

    // A replayed jti.
    let once = key.assertion(TEST_CLIENT, &url);
    assert_eq!(token_with(&proxy, &once).await.status(), 200);
    refused_because(&proxy, &once, "already used").await;
}

/// An assertion spends its `jti` as soon as it verifies, also when the request around it is
/// refused: resent with a scope the client may have, or with the right grant_type, it is refused
/// as already used (SPEC A4.12), so a refused request cannot be replayed into a token.
#[tokio::test]
async fn a_refused_request_spends_its_assertion() {
    let (proxy, registered, _fake) = proxy_and_client().await;
    let url = token_url(&proxy);

    let assertion = registered.key.assertion(&registered.id, &url);
    let refused = post_token(&proxy, &token_form(&assertion, "system/*.write")).await;
    oauth_error(refused, "invalid_scope").await;
    refused_because(&proxy, &assertion, "already used").await;

    let assertion = registered.key.assertion(&registered.id, &url);
    let mut form = token_form(&assertion, "system/*.read");
    form[0].1 = "password".into();
    oauth_error(post_token(&proxy, &form).await, "unsupported_grant_type").await;
    refused_because(&proxy, &assertion, "already used").await;

    // A fresh assertion still gets its token.
    let fresh = registered.key.assertion(&registered.id, &url);
    assert_eq!(token_with(&proxy, &fresh).await.status(), 200);
}

/// Asserts that `proxy` refuses a token for `assertion` as `invalid_client`, saying `because`.
async fn refused_because(proxy: &TestProxy, assertion: &str, because: &str) {
    let description = oauth_error(token_with(proxy, assertion).await, "invalid_client").await;
    assert!(description.contains(because), "{description}");
}

/// A proxy whose client `remote` has its keys at a JWKS URL serving `key` with `cache_control`,
/// refetched at most every `min_refetch_secs`.
async fn at_a_jwks_url(
    key: &ClientKey,
    cache_control: &str,
    min_refetch_secs: u64,
) -> (JwksServer, TestProxy, FakeFhirGuard) {
    let jwks = JwksServer::start(&key.jwks()).await;
    jwks.cache_control(Some(cache_control));
    let (proxy, fake) = proxy_with(|config| {
        register_url(config, "remote", &jwks.url(), &["system/*.read"]);
        config.auth.jwks_min_refetch_secs = min_refetch_secs;
    })
    .await;
    (jwks, proxy, fake)
}

/// `key` published with `cache_control`, then three token requests by `remote` with it, each
/// answered 200; the JWKS server, the proxy, its upstream and the token URL.
async fn three_tokens(
    key: &ClientKey,
    cache_control: &str,
) -> (JwksServer, TestProxy, FakeFhirGuard, String) {
    let (jwks, proxy, fake) = at_a_jwks_url(key, cache_control, 0).await;
    let url = token_url(&proxy);
    for _ in 0..3 {
        let response = token_with(&proxy, &key.assertion("remote", &url)).await;
        assert_eq!(response.status(), 200);
    }
    (jwks, proxy, fake, url)
}

#[tokio::test]
async fn a_jwks_url_is_cached_as_cache_control_allows() {
    let key = ClientKey::es384();
    let (jwks, proxy, _fake, url) = three_tokens(&key, "max-age=60").await;
    assert_eq!(jwks.fetches(), 1, "served from the cache within max-age");

    // With jku equal to the registered URL it works; any other jku is refused.
    let mut header = key.header();
    header["jku"] = json!(jwks.url());
    let jwt = key.sign(&header, &claims("remote", &url));
    assert_eq!(token_with(&proxy, &jwt).await.status(), 200);
    header["jku"] = json!(format!("http://{}/other.json", jwks.addr));
    let jwt = key.sign(&header, &claims("remote", &url));
    refused_because(&proxy, &jwt, "jku").await;
}

#[tokio::test]
async fn a_jwks_url_with_no_store_is_fetched_every_time() {
    let (jwks, _proxy, _fake, _) = three_tokens(&ClientKey::rs384(), "no-store").await;
    assert_eq!(jwks.fetches(), 3);
}

#[tokio::test]
async fn a_rotated_key_is_found_by_refetching_on_an_unknown_kid() {
    let old = ClientKey::es384();
    let (jwks, proxy, _fake) = at_a_jwks_url(&old, "max-age=3600", 1).await;
    let url = token_url(&proxy);
    assert_eq!(
        token_with(&proxy, &old.assertion("remote", &url))
            .await
            .status(),
        200
    );
    // The client publishes its successor next to the current key and switches to it.
    let new = ClientKey::rs384();
    jwks.serve(&json!({ "keys": [old.public, new.public] }));
    let started = Instant::now();
    assert_eq!(
        token_with(&proxy, &new.assertion("remote", &url))
            .await
            .status(),
        200
    );
    assert_eq!(jwks.fetches(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited at most the refetch interval"
    );

    // Two keys under one (new) kid: refused, whichever is right.
    let twin_a = ClientKey::es384().with_kid("twin");
    let twin_b = ClientKey::es384().with_kid("twin");
    jwks.serve(&json!({ "keys": [old.public, new.public, twin_a.public, twin_b.public] }));
    refused_because(
        &proxy,
        &twin_a.assertion("remote", &url),
        "2 registered keys",
    )
    .await;
}

#[tokio::test]
async fn unknown_kids_cannot_make_the_proxy_hammer_a_jwks_url() {
    let key = ClientKey::es384();
    let (jwks, proxy, _fake) = at_a_jwks_url(&key, "max-age=3600", 2).await;
    let url = token_url(&proxy);
    let started = Instant::now();
    let attempts: Vec<_> = (0..10)
        .map(|i| {
            let jwt = key
                .with_kid(&format!("random-{i}"))
                .assertion("remote", &url);
            let proxy_url = url.clone();
            async move {
                plain_client()
                    .post(proxy_url)
                    .form(&token_form(&jwt, "system/*.read"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        })
        .collect();
    let statuses = futures_util::future::join_all(attempts).await;
    assert!(statuses.iter().all(|s| *s == 400));
    let elapsed = started.elapsed();
    // Ten requests with unknown kids in ~2 s: at most one fetch per interval (plus the first).
    let allowed = 2 + (elapsed.as_secs() / 2) as usize;
    assert!(
        jwks.fetches() <= allowed,
        "{} fetches in {elapsed:?}",
        jwks.fetches()
    );
}

#[tokio::test]
async fn broken_jwks_urls_fail_the_request_not_the_proxy() {
    let key = ClientKey::es384();
    let jwks = JwksServer::start(&key.jwks()).await;
    let (proxy, _fake) = proxy_with(|config| {
        register_url(config, "remote", &jwks.url(), &["system/*.read"]);
        config.auth.jwks_min_refetch_secs = 0;
        config.auth.jwks_fetch_timeout_ms = 500;
        config.auth.jwks_max_bytes = 4096;
    })
    .await;
    let url = token_url(&proxy);

    jwks.hang(true);
    let started = Instant::now();
    refused_because(&proxy, &key.assertion("remote", &url), "did not answer").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    jwks.hang(false);

    jwks.serve_bytes(vec![b' '; 1024 * 1024]);
    refused_because(&proxy, &key.assertion("remote", &url), "larger than").await;

    jwks.serve_bytes(b"<html>not json</html>".to_vec());
    refused_because(&proxy, &key.assertion("remote", &url), "JWK Set").await;

    jwks.serve(&key.jwks());
    assert_eq!(
        token_with(&proxy, &key.assertion("remote", &url))
            .await
            .status(),
        200,
        "recovers"
    );
}

/// A proxy protecting passthrough with its tokens, sending a static bearer upstream.
async fn protected_proxy() -> (TestProxy, SmartClient, FakeFhirGuard) {
    let mut registered = None;
    let (proxy, fake) = proxy_with(|config| {
        registered = Some(SmartClient::register_with(
            config,
            TEST_CLIENT,
            ClientKey::es384(),
            &["system/Patient.read"],
        ));
        config.auth.passthrough = true;
        config.upstream.auth.scheme = fhir_bulk_proxy::config::UpstreamAuthScheme::Bearer;
        config.upstream.auth.token = Some("upstream-secret".into());
    })
    .await;
    (proxy, registered.unwrap(), fake)
}

async fn outcome_401(response: reqwest::Response) -> String {
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    outcome(response, 401).await
}

#[tokio::test]
async fn protected_passthrough_needs_a_token_and_sends_the_upstream_credentials() {
    let (proxy, registered, _fake) = protected_proxy().await;
    let patient = proxy.url("/Patient/1");

    outcome_401(get_anonymous(&patient).await).await;
    outcome_401(get_with_token(&patient, "invalidToken").await).await;

    let token = registered.token(&proxy).await; // system/*.read, narrowed to Patient
    let response = get_with_token(&patient, &token).await;
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    let authorization = echoed_header(&report, "authorization");
    assert_eq!(
        authorization,
        Some(json!("Bearer upstream-secret")),
        "{report}"
    );

    // Scopes that do not cover the request: 403 with an OperationOutcome.
    for (method, path) in [
        ("GET", "/Observation"),
        ("DELETE", "/Patient/1"),
        ("GET", "/"),
    ] {
        let response = plain_client()
            .request(method.parse().unwrap(), proxy.url(path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        outcome(response, 403).await;
    }

    // Discovery and metadata stay public.
    let discovery = get_anonymous(proxy.url("/.well-known/smart-configuration")).await;
    assert_eq!(discovery.status(), 200);
}

#[tokio::test]
async fn expired_and_foreign_access_tokens_are_refused() {
    let (proxy, _registered, _fake) = protected_proxy().await;
    let sign = |secret: &str, exp: u64| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.typ = Some("at+jwt".into());
        let claims = json!({
            "iss": "fhir-bulk-proxy", "sub": TEST_CLIENT, "client_id": TEST_CLIENT,
            "scope": "system/*.read", "iat": exp - 300, "exp": exp, "jti": "x",
        });
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let patient = proxy.url("/Patient/1");
    let valid = sign(TEST_SIGNING_SECRET, now() + 60);
    assert_eq!(
        get_with_token(&patient, &valid).await.status(),
        200,
        "a token signed with the shared secret works on any replica"
    );
    let expired = sign(TEST_SIGNING_SECRET, now() - 3600);
    let diagnostics = outcome_401(get_with_token(&patient, &expired).await).await;
    assert!(diagnostics.contains("expired"), "{diagnostics}");
    let foreign = sign("another-proxy-secret-of-at-least-32-bytes", now() + 60);
    let diagnostics = outcome_401(get_with_token(&patient, &foreign).await).await;
    assert!(diagnostics.contains("signature"), "{diagnostics}");
}

#[tokio::test]
async fn default_passthrough_forwards_the_clients_own_authorization() {
    let (proxy, _registered, _fake) = proxy_and_client().await;
    let report: Value = plain_client()
        .get(proxy.url("/Patient/1"))
        .header("authorization", "Bearer the-upstreams-own-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let authorization = echoed_header(&report, "authorization");
    assert_eq!(authorization, Some(json!("Bearer the-upstreams-own-token")));
}

#[tokio::test]
async fn keygen_prints_a_key_and_a_registration_that_works() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
        .args(["keygen", "--client-id", "cli-client", "--alg", "RS384"])
        .output()
        .unwrap();
    testkit::process::assert_succeeded(&output);
    let text = String::from_utf8(output.stdout).unwrap();
    let snippet = &text[text.find("[[auth.clients]]").unwrap()..];
    let private_json = &text[text.find('{').unwrap()..text.find("\n}\n").unwrap() + 2];
    let private: Value = serde_json::from_str(private_json).unwrap();
    assert_eq!(private["kty"], "RSA");
    assert!(private.get("d").is_some());

    #[derive(serde::Deserialize)]
    struct Auth {
        clients: Vec<fhir_bulk_proxy::config::ClientConfig>,
    }
    #[derive(serde::Deserialize)]
    struct Snippet {
        auth: Auth,
    }
    let snippet: Snippet = toml::from_str(snippet).unwrap();
    let fake = FakeFhir::new().start().await;
    let mut config = TestProxy::config(&fake.url());
    config.auth.signing_secret = Some(TEST_SIGNING_SECRET.into());
    config.auth.clients = snippet.auth.clients;
    let proxy = TestProxy::start(config).await;
    let key = ClientKey {
        alg: "RS384",
        kid: private["kid"].as_str().unwrap().to_owned(),
        private: private.clone(),
        public: Value::Null,
    };
    let response = token_with(&proxy, &key.assertion("cli-client", &token_url(&proxy))).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn keygen_out_writes_a_key_only_its_owner_reads_and_a_registration_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    let keygen = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
            .args(["keygen", "--client-id", "team/analytics", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let output = keygen();
    testkit::process::assert_succeeded(&output);
    let private = out.join("team_analytics.private.jwk.json");
    let registration = out.join("team_analytics.client.toml");
    let public: Value =
        serde_json::from_slice(&std::fs::read(out.join("team_analytics.jwks.json")).unwrap())
            .unwrap();
    assert!(public["keys"][0].get("d").is_none(), "{public}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let again = keygen();
    assert!(
        !again.status.success(),
        "an existing key is never overwritten"
    );

    #[derive(serde::Deserialize)]
    struct Auth {
        clients: Vec<fhir_bulk_proxy::config::ClientConfig>,
    }
    #[derive(serde::Deserialize)]
    struct Registration {
        auth: Auth,
    }
    let entry: Registration =
        toml::from_str(&std::fs::read_to_string(registration).unwrap()).unwrap();
    let fake = FakeFhir::new().start().await;
    let mut config = TestProxy::config(&fake.url());
    config.auth.signing_secret = Some(TEST_SIGNING_SECRET.into());
    config.auth.clients = entry.auth.clients;
    let proxy = TestProxy::start(config).await;
    let key = testkit::client::ClientKey::from_file(&private).unwrap();
    let connected = testkit::client::BulkClient::connect(
        &proxy.url(""),
        "team/analytics",
        &key,
        "system/*.read",
    )
    .await
    .unwrap();
    assert_eq!(connected.token().scope, "system/*.read");
}

/// Asserts the answer is JSON (`application/json`, with or without parameters).
fn assert_json(response: &reqwest::Response) {
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
}

/// The value of header `name` in the upstream's echo of a request (`{"headers": [[name, value]]}`).
fn echoed_header(report: &Value, name: &str) -> Option<Value> {
    let headers = report["headers"].as_array().unwrap();
    headers.iter().find(|h| h[0] == name).map(|h| h[1].clone())
}
