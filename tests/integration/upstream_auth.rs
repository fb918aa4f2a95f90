//! Upstream OAuth 2.0 (`[upstream.auth]` schemes `client_credentials` and `private_key_jwt`): the
//! proxy gets its own tokens from a token server on a real socket and presents them on export
//! paging, metadata and protected passthrough; one token serves many units at once, tokens are
//! renewed before they expire and after a 401, and a token endpoint that is down ends as error
//! lines (export) or a 502 OperationOutcome (passthrough).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhir_bulk_proxy::config::{ClientAuth, Config, UpstreamAuthScheme};
use serde_json::{Value, json};
use testkit::both;
use testkit::memory_fhir::{MemoryFhir, RunningFhir};
use testkit::process::Store;
use testkit::setup::{Setup, expected, fixture_dir, ids};
use testkit::smart::ClientKey;
use testkit::token_server::{self, TokenServer};

const CLIENT_ID: &str = "bulk-proxy-at-upstream";
const SECRET: &str = "s3cret/with+odd:chars";

/// The fixture upstream, accepting only tokens `tokens` issued and not yet expired.
async fn guarded_upstream(
    tokens: &TokenServer,
    extra: impl FnOnce(MemoryFhir) -> MemoryFhir,
) -> RunningFhir {
    let fhir = MemoryFhir::new()
        .load_dir(&fixture_dir())
        .unwrap()
        .require_authorization(tokens.authorize());
    extra(fhir).start().await.unwrap()
}

/// Runs an export in which every unit fails: the job fails with an OperationOutcome (a 5xx status
/// answer), whose text is returned.
pub async fn failed_export(s: &Setup, path_and_query: &str) -> String {
    let status_url = s.start(path_and_query).await;
    let (status, body) =
        testkit::eventually("the job to fail", Duration::from_secs(60), || async {
            let response = s.get(&status_url).await;
            let status = response.status();
            (![202, 429].contains(&status.as_u16())).then_some((status, response))
        })
        .await;
    let body: Value = body.json().await.unwrap();
    assert!(status.is_server_error(), "{status}: {body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    body.to_string()
}

fn client_credentials(config: &mut Config, token_url: &str, client_auth: ClientAuth) {
    let auth = &mut config.upstream.auth;
    auth.scheme = UpstreamAuthScheme::ClientCredentials;
    auth.token_url = Some(token_url.into());
    auth.client_id = Some(CLIENT_ID.into());
    auth.client_secret = Some(SECRET.into());
    auth.client_auth = client_auth;
    auth.scope = Some("system/*.read".into());
}

both!(one_token_serves_every_unit_of_an_export);
async fn one_token_serves_every_unit_of_an_export(store: Store) {
    let tokens = TokenServer::start(3600).await;
    // Slow, so that every unit asks while the first request is still out.
    tokens.delay_ms(300);
    let fhir = guarded_upstream(&tokens, |f| f).await;
    let s = Setup::with_upstream(store, fhir, |c| {
        client_credentials(c, &tokens.url(), ClientAuth::Basic);
        c.export.page_size = 20;
    })
    .await;
    let (manifest, files) = s.export("/$export").await;
    assert_eq!(ids(&files), expected(&s.fhir, None));
    assert!(s.errors(&manifest).await.is_empty());
    assert_eq!(tokens.requests(), 1, "{:?}", tokens.received());
    let request = &tokens.received()[0];
    assert_eq!(
        request.auth,
        token_server::ClientAuth::Basic {
            client_id: CLIENT_ID.into(),
            secret: SECRET.into()
        }
    );
    assert_eq!(request.grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(request.scope.as_deref(), Some("system/*.read"));
}

#[tokio::test]
async fn client_secret_post_sends_the_secret_in_the_form() {
    let tokens = TokenServer::start(3600).await;
    let fhir = guarded_upstream(&tokens, |f| f).await;
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        client_credentials(c, &tokens.url(), ClientAuth::Post)
    })
    .await;
    let (_, files) = s.export("/$export?_type=Patient").await;
    assert_eq!(ids(&files)["Patient"].len(), 10);
    assert_eq!(
        tokens.received()[0].auth,
        token_server::ClientAuth::Post {
            client_id: CLIENT_ID.into(),
            secret: SECRET.into()
        }
    );
}

both!(tokens_expiring_mid_export_are_renewed_before_they_lapse);
async fn tokens_expiring_mid_export_are_renewed_before_they_lapse(store: Store) {
    // Tokens live a second; the export takes several.
    let tokens = TokenServer::start(1).await;
    let fhir = guarded_upstream(&tokens, |f| f).await;
    fhir.faults
        .latency_ms
        .store(60, std::sync::atomic::Ordering::SeqCst);
    let s = Setup::with_upstream(store, fhir, |c| {
        client_credentials(c, &tokens.url(), ClientAuth::Basic);
        c.export.page_size = 10;
        c.export.max_upstream_concurrency = 2;
    })
    .await;
    let started = std::time::Instant::now();
    let (manifest, files) = s
        .export("/$export?_type=Patient,Encounter,Observation")
        .await;
    let took = started.elapsed();
    let want = expected(&s.fhir, None);
    for t in ["Patient", "Encounter", "Observation"] {
        assert_eq!(ids(&files)[t], want[t], "{t}");
    }
    assert!(s.errors(&manifest).await.is_empty());
    assert!(took > Duration::from_secs(3), "the export took {took:?}");
    // About one token per 0.8 s (renewed a fifth of its life early), never one per page.
    let requests = tokens.requests();
    let most = took.as_secs_f64() / 0.8 + 3.0;
    assert!(
        requests >= 3 && (requests as f64) <= most,
        "{requests} token requests in {took:?}"
    );
}

both!(a_revoked_token_is_renewed_once_for_all_units);
async fn a_revoked_token_is_renewed_once_for_all_units(store: Store) {
    let tokens = TokenServer::start(3600).await;
    let fhir = guarded_upstream(&tokens, |f| f).await;
    fhir.faults
        .latency_ms
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let pages = fhir.counters.clone();
    let s = Setup::with_upstream(store, fhir, |c| {
        client_credentials(c, &tokens.url(), ClientAuth::Basic);
        c.export.page_size = 10;
    })
    .await;
    let status_url = s
        .start("/$export?_type=Patient,Encounter,Observation,Condition")
        .await;
    testkit::eventually("a page served", Duration::from_secs(20), || async {
        (pages.pages.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    // Every request in flight or to come with the old token now meets a 401.
    tokens.revoke_all();
    let manifest = s.manifest(&status_url).await;
    let files = s.download(&manifest).await;
    let want = expected(&s.fhir, None);
    for t in ["Patient", "Encounter", "Observation", "Condition"] {
        assert_eq!(ids(&files)[t], want[t], "{t}");
    }
    assert!(s.errors(&manifest).await.is_empty());
    assert_eq!(tokens.requests(), 2);
}

#[tokio::test]
async fn an_upstream_refusing_every_token_fails_the_export_without_a_token_storm() {
    let tokens = TokenServer::start(3600).await;
    let fhir = MemoryFhir::new()
        .load_dir(&fixture_dir())
        .unwrap()
        .require_authorization(Arc::new(|_| false))
        .start()
        .await
        .unwrap();
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        client_credentials(c, &tokens.url(), ClientAuth::Basic)
    })
    .await;
    let errors = failed_export(&s, "/$export?_type=Patient,Observation").await;
    assert!(errors.contains("rejected the search with 401"), "{errors}");
    // Each refused request renews the token once, and only once: the first token, one renewal
    // for the metadata read, at most one for the kick-off's counts of the two searches, and at
    // most one per unit (two).
    let requests = tokens.requests();
    assert!((2..=6).contains(&requests), "{requests} token requests");
}

#[tokio::test]
async fn an_unreachable_token_endpoint_fails_units_after_retries_and_passthrough_with_502() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let fhir = testkit::setup::fixture_upstream().await;
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        client_credentials(c, &format!("http://{closed}/token"), ClientAuth::Basic);
        c.export.retry_max_attempts = 3;
        c.auth.passthrough = true;
    })
    .await;
    let errors = failed_export(&s, "/$export?_type=Patient").await;
    assert!(
        errors.contains("access token") && errors.contains("failed 3 times"),
        "{errors}"
    );
    assert!(!errors.contains(SECRET), "{errors}");
    assert_eq!(
        s.fhir
            .counters
            .pages
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    let response = s.get(&s.proxy.url("/Patient")).await;
    let diagnostics = testkit::outcome(response, 502).await;
    assert!(diagnostics.contains("access token"), "{diagnostics}");
    assert!(!diagnostics.contains(SECRET), "{diagnostics}");
}

#[tokio::test]
async fn protected_passthrough_presents_the_proxys_token_and_renews_it_after_a_401() {
    let tokens = TokenServer::start(3600).await;
    let fhir = guarded_upstream(&tokens, |f| f).await;
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        client_credentials(c, &tokens.url(), ClientAuth::Basic);
        c.auth.passthrough = true;
    })
    .await;
    let patient = s.fhir.ids("Patient")[0].clone();
    let url = s.proxy.url(&format!("/Patient/{patient}"));
    let response = s.get(&url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["id"],
        patient.as_str()
    );
    let first = tokens.requests();
    tokens.revoke_all();
    let response = s.get(&url).await;
    assert_eq!(response.status(), 200, "renewed after the upstream's 401");
    assert_eq!(tokens.requests(), first + 1);
    // Metadata is read with the proxy's token too.
    let response = s.get(&s.proxy.url("/metadata")).await;
    assert_eq!(response.status(), 200);
}

/// Decodes a JWT part.
fn part(jwt: &str, index: usize) -> Value {
    let text = jwt.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).unwrap()).unwrap()
}

async fn private_key_jwt_export(
    key_file: &std::path::Path,
    public_jwk: Value,
    alg: &str,
    kid: Option<&str>,
) {
    let tokens = TokenServer::start(3600).await;
    let url = tokens.url();
    // No token_url: discovered from the upstream's .well-known/smart-configuration.
    let fhir = guarded_upstream(&tokens, |f| {
        f.smart_configuration(
            json!({ "token_endpoint": url, "grant_types_supported": ["client_credentials"] }),
        )
    })
    .await;
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        let auth = &mut c.upstream.auth;
        auth.scheme = UpstreamAuthScheme::PrivateKeyJwt;
        auth.client_id = Some(CLIENT_ID.into());
        auth.private_key_file = Some(key_file.to_path_buf());
        auth.alg = Some(alg.into());
        auth.scope = Some("system/Patient.rs".into());
    })
    .await;
    let (_, files) = s.export("/$export?_type=Patient").await;
    assert_eq!(ids(&files)["Patient"].len(), 10);
    // Two more assertions: each has its own jti.
    tokens.revoke_all();
    let (_, files) = s.export("/$export?_type=Patient").await;
    assert_eq!(ids(&files)["Patient"].len(), 10);

    let received = tokens.received();
    assert!(received.len() >= 2, "{received:?}");
    let mut jtis = BTreeSet::new();
    for request in &received {
        let token_server::ClientAuth::Assertion(jwt) = &request.auth else {
            panic!("not an assertion: {request:?}");
        };
        let header = part(jwt, 0);
        let claims = part(jwt, 1);
        assert_eq!(header["alg"], alg);
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"].as_str(), kid, "{header}");
        assert_eq!(claims["iss"], CLIENT_ID);
        assert_eq!(claims["sub"], CLIENT_ID);
        assert_eq!(claims["aud"], tokens.url().as_str());
        let (exp, iat) = (
            claims["exp"].as_u64().unwrap(),
            claims["iat"].as_u64().unwrap(),
        );
        let now = testkit::smart::now();
        assert!(exp > now && exp <= iat + 300 && iat <= now + 1, "{claims}");
        assert!(
            jtis.insert(claims["jti"].as_str().unwrap().to_owned()),
            "a jti repeated"
        );
        // Verified independently, by jsonwebtoken with the public key.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(public_jwk.clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(alg.parse().unwrap());
        validation.set_audience(&[tokens.url()]);
        validation.set_issuer(&[CLIENT_ID]);
        jsonwebtoken::decode::<Value>(jwt, &key, &validation).expect("a valid signature");
    }
}

#[tokio::test]
async fn private_key_jwt_with_an_rs384_jwk_and_a_discovered_token_endpoint() {
    let key = ClientKey::rs384();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key.jwk");
    std::fs::write(&file, key.private.to_string()).unwrap();
    private_key_jwt_export(&file, key.public.clone(), "RS384", Some(&key.kid)).await;
}

#[tokio::test]
async fn private_key_jwt_with_an_es384_pem_key() {
    let key = ClientKey::es384();
    // The same key as PKCS#8 PEM, without a kid.
    let d = URL_SAFE_NO_PAD
        .decode(key.private["d"].as_str().unwrap())
        .unwrap();
    let secret = p384::SecretKey::from_slice(&d).unwrap();
    let pem = p384::pkcs8::EncodePrivateKey::to_pkcs8_pem(&secret, Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key.pem");
    std::fs::write(&file, pem.as_bytes()).unwrap();
    let mut public = key.public.clone();
    public.as_object_mut().unwrap().remove("kid");
    private_key_jwt_export(&file, public, "ES384", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_secret_and_the_upstream_tokens_never_reach_the_log() {
    // Tokens of a second: several are obtained, and one renewed after a 401, during the export.
    let tokens = TokenServer::start(1).await;
    let fhir = guarded_upstream(&tokens, |f| f).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = testkit::TestProxy::config(&fhir.url());
    client_credentials(&mut config, &tokens.url(), ClientAuth::Basic);
    config.auth.enabled = false;
    config.export.poll_retry_after_secs = 1;
    config.export.page_size = 20;
    config.store.path = dir.path().join("jobs.redb");
    config.storage.path = dir.path().join("files");
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let proxy = testkit::process::ProxyProcess::spawn(&config_path, "debug", &[]);

    let status_url = testkit::start_export(
        format!("{}/$export?_type=Patient,Observation", proxy.base()),
        "unused",
    )
    .await;
    testkit::eventually("the export to finish", Duration::from_secs(60), || async {
        let response = testkit::get_anonymous(&status_url).await;
        (response.status() == 200).then_some(())
    })
    .await;
    // A second export after every token is revoked: its first page is refused, and the token
    // renewed (whether or not the first export outlived a token, which depends on its speed).
    tokens.revoke_all();
    let status_url =
        testkit::start_export(format!("{}/$export?_type=Patient", proxy.base()), "unused").await;
    testkit::eventually(
        "the second export to finish",
        Duration::from_secs(60),
        || async {
            let response = testkit::get_anonymous(&status_url).await;
            (response.status() == 200).then_some(())
        },
    )
    .await;
    let metadata = testkit::get_anonymous(format!("{}/metadata", proxy.base())).await;
    assert_eq!(metadata.status(), 200);

    let log = proxy.logs().join("\n");
    assert!(log.contains("obtained an upstream access token"), "{log}");
    let issued = tokens.issued();
    assert!(issued.len() >= 2, "{issued:?}");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{CLIENT_ID}:{}",
        url::form_urlencoded::byte_serialize(SECRET.as_bytes()).collect::<String>()
    ));
    assert!(!log.contains(SECRET), "the client secret is in the log");
    assert!(
        !log.contains(&basic),
        "the Basic credentials are in the log"
    );
    for token in issued {
        assert!(!log.contains(&token), "an upstream token is in the log");
    }
}

/// The cross-check: the upstream is another fhir-bulk-proxy with protected passthrough, so the
/// assertions this proxy signs are verified by the proxy's own token endpoint (found through its
/// `.well-known/smart-configuration`), and its tokens by the proxy's own gate.
#[tokio::test]
async fn a_fhir_bulk_proxy_in_front_accepts_the_proxys_own_assertions() {
    let fhir = testkit::setup::fixture_upstream().await;
    let key = ClientKey::rs384();
    let mut inner = testkit::TestProxy::config(&fhir.url());
    testkit::smart::SmartClient::register_with(
        &mut inner,
        CLIENT_ID,
        key.clone(),
        &["system/*.read"],
    );
    inner.auth.passthrough = true;
    let inner = testkit::TestProxy::start(inner).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key.jwk");
    std::fs::write(&file, key.private.to_string()).unwrap();
    let inner_url = inner.url("");
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        c.upstream.url = inner_url;
        let auth = &mut c.upstream.auth;
        auth.scheme = UpstreamAuthScheme::PrivateKeyJwt;
        auth.client_id = Some(CLIENT_ID.into());
        auth.private_key_file = Some(file.clone());
        auth.scope = Some("system/*.read".into());
    })
    .await;
    let (manifest, files) = s.export("/$export?_type=Patient,Condition").await;
    let want = expected(&s.fhir, None);
    for t in ["Patient", "Condition"] {
        assert_eq!(ids(&files)[t], want[t], "{t}");
    }
    assert!(s.errors(&manifest).await.is_empty());
    // Without the proxy's credentials the inner proxy refuses the same search.
    let direct = testkit::get_anonymous(inner.url("/Patient")).await;
    assert_eq!(direct.status(), 401);
}

#[tokio::test]
async fn a_token_that_never_expires_by_its_expires_in_is_used_not_a_panic() {
    // Some token endpoints give a token that does not expire a huge `expires_in`; the renewal time
    // computed from it must not overflow.
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(|| async {
            (
                [("content-type", "application/json")],
                r#"{"access_token":"forever","token_type":"bearer","expires_in":18446744073709551615}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let fhir = MemoryFhir::new()
        .load_dir(&fixture_dir())
        .unwrap()
        .start()
        .await
        .unwrap();
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        client_credentials(c, &token_url, ClientAuth::Basic);
        c.export.retry_max_attempts = 1;
    })
    .await;
    let (manifest, files) = s.export("/$export?_type=Patient").await;
    assert!(s.errors(&manifest).await.is_empty());
    assert_eq!(ids(&files)["Patient"].len(), 10);
}
