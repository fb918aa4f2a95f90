//! What the proxy writes to its log: a whole export at `debug`, with every secret in play (the
//! signing secret, the upstream's bearer token, client assertions good and refused, access tokens
//! on status, file and protected passthrough requests), leaves none of them in the log. Text logs
//! written to a pipe have no colour codes; each request's lines carry its request id, each job's
//! lines its job id.

use fhir_bulk_proxy::auth::keygen::{self, KeyAlgorithm};
use fhir_bulk_proxy::config::{Config, UpstreamAuthScheme};
use serde_json::Value;
use testkit::client::{BulkClient, ClientKey};
use testkit::get_with_token;
use testkit::memory_fhir::{MemoryFhir, RunningFhir};

use testkit::plain_client;
use testkit::process::ProxyProcess;

const SIGNING_SECRET: &str = "signing-secret-that-must-never-be-logged-0123";
const UPSTREAM_TOKEN: &str = "upstream-token-that-must-never-be-logged";
const CLIENT_ID: &str = "log-test-client";

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_export_at_debug_level_logs_no_secret() {
    let fixtures = testkit::setup::fixture_dir();
    let fhir = MemoryFhir::new()
        .load_dir(&fixtures)
        .unwrap()
        .require_bearer(UPSTREAM_TOKEN)
        .start()
        .await
        .unwrap();
    let (key, _dir, config_path) = written(&fhir, |config| {
        config.upstream.auth.scheme = UpstreamAuthScheme::Bearer;
        config.upstream.auth.token = Some(UPSTREAM_TOKEN.into());
        config.auth.passthrough = true;
    });
    let proxy = ProxyProcess::spawn(&config_path, "debug", &[]);

    let client_key = ClientKey::from_json(&key.private_jwk).unwrap();
    let bulk = BulkClient::connect(&proxy.base(), CLIENT_ID, &client_key, "system/*.read")
        .await
        .unwrap();
    let access_token = bulk.token().access_token.clone();
    let status_url = bulk.kick_off("/Group/synthea-10/$export").await.unwrap();
    let manifest = bulk.wait(&status_url, |_| {}).await.unwrap();
    let mut lines = 0;
    for file in manifest["output"].as_array().unwrap() {
        lines += bulk
            .download(file["url"].as_str().unwrap(), |_| Ok(()))
            .await
            .unwrap();
    }
    assert!(lines > 1000, "{lines} resources exported");

    // Protected passthrough, with the proxy's token (replaced upstream by the upstream's).
    let patients =
        get_with_token(format!("{}/Patient?_count=1", proxy.base()), &access_token).await;
    assert_eq!(patients.status(), 200);

    // A refused assertion (a scope the client is not registered for) and a replayed one.
    let token_url = bulk.token().token_url.clone();
    let refused = client_key.assertion(CLIENT_ID, &token_url).unwrap();
    for scope in ["system/Patient.write", "system/*.read"] {
        let response = plain_client()
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", refused.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{scope}");
    }

    let log = proxy.logs().join("\n");
    let levels: Vec<String> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|line| line["level"].as_str().map(str::to_owned))
        .collect();
    assert!(
        levels.iter().filter(|l| *l == "DEBUG").count() > 10,
        "debug logging is on: {} lines",
        levels.len()
    );
    assert!(
        log.contains("access token issued") && log.contains(CLIENT_ID),
        "the token flow is logged"
    );
    let signature = |jwt: &str| jwt.rsplit('.').next().unwrap().to_owned();
    let private_d = key.private_jwk["d"].as_str().unwrap().to_owned();
    for (what, secret) in [
        ("the signing secret", SIGNING_SECRET.to_owned()),
        ("the upstream token", UPSTREAM_TOKEN.to_owned()),
        ("an access token", access_token.clone()),
        ("an access token's signature", signature(&access_token)),
        ("a client assertion", refused.clone()),
        ("a client assertion's signature", signature(&refused)),
        ("the client's private key", private_d),
    ] {
        assert!(!log.contains(&secret), "{what} is in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_in_a_pipe_have_no_colours_and_name_each_request_and_each_job() {
    let fixtures = testkit::setup::fixture_dir();
    let fhir = MemoryFhir::new()
        .load_dir(&fixtures)
        .unwrap()
        .start()
        .await
        .unwrap();
    let (key, _dir, config_path) = written(&fhir, |_| {});
    let proxy = ProxyProcess::spawn(
        &config_path,
        "fhir_bulk_proxy=debug,info",
        &[("BULK_PROXY_LOG__FORMAT", "text")],
    );

    let client_key = ClientKey::from_json(&key.private_jwk).unwrap();
    let bulk = BulkClient::connect(&proxy.base(), CLIENT_ID, &client_key, "system/*.read")
        .await
        .unwrap();
    let status_url = bulk.kick_off("/Patient/$export").await.unwrap();
    let manifest = bulk.wait(&status_url, |_| {}).await.unwrap();
    let file = manifest["output"][0]["url"].as_str().unwrap();
    bulk.download(file, |_| Ok(())).await.unwrap();
    // A second export, deleted: its lines too name it.
    let deleted = bulk.kick_off("/$export?_type=Patient").await.unwrap();
    let response = plain_client()
        .delete(&deleted)
        .bearer_auth(&bulk.token().access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let passthrough = plain_client()
        .get(format!("{}/Patient?_count=1", proxy.base()))
        .header("x-request-id", "client-chosen-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(passthrough.status(), 200);
    // Access lines are written once the response is: wait for the last one.
    for needle in ["export deleted", "request_id=client-chosen-id-1"] {
        proxy.wait_for_log(needle, std::time::Duration::from_secs(10));
    }

    let lines = proxy.logs();
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("{}", lines.join("\n"));
    }
    for line in &lines {
        assert!(!line.contains('\x1b'), "a colour code in {line:?}");
    }
    let access: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" response status="))
        .collect();
    assert!(access.len() >= 5, "{} access lines", access.len());
    for line in lines.iter().filter(|l| l.contains("request{")) {
        let id = line
            .split("request_id=")
            .nth(1)
            .and_then(|rest| rest.split([' ', '}']).next())
            .unwrap_or_default();
        assert!(!id.is_empty(), "no request id in {line}");
    }
    for line in &access {
        assert!(line.contains("request{request_id="), "{line}");
    }
    assert!(
        access
            .iter()
            .any(|l| l.contains("request_id=client-chosen-id-1")),
        "the client's X-Request-Id is the request id"
    );
    let job_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("fhir_bulk_proxy::export") || l.contains(" export "))
        .collect();
    assert!(
        job_lines.iter().any(|l| l.contains("export started"))
            && job_lines.iter().any(|l| l.contains("export finished"))
            && job_lines.iter().any(|l| l.contains("export deleted")),
        "{job_lines:#?}"
    );
    for line in job_lines {
        assert!(line.contains("job="), "no job id in {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_request_is_logged_with_its_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    // Nothing listens on the discard port: every passthrough request is a 502 of the proxy's own.
    config.upstream.url = "http://127.0.0.1:9/fhir".into();
    config.store.path = dir.path().join("jobs.redb");
    config.storage.path = dir.path().join("files");
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    for format in ["text", "json"] {
        let proxy =
            ProxyProcess::spawn(&config_path, "info", &[("BULK_PROXY_LOG__FORMAT", format)]);
        for (path, id) in [
            ("/Patient?_count=1", "fast-path-1"),
            ("/Patient", "general-1"),
        ] {
            let request = plain_client()
                .request(
                    // A body takes the general path, a bodiless GET the fast path.
                    if id == "general-1" {
                        reqwest::Method::POST
                    } else {
                        reqwest::Method::GET
                    },
                    format!("{}{path}", proxy.base()),
                )
                .header("x-request-id", id);
            let request = if id == "general-1" {
                request.body("{}")
            } else {
                request
            };
            assert_eq!(request.send().await.unwrap().status(), 502, "{format} {id}");
            // The access line comes last.
            let answered = proxy.wait_for_log(id, std::time::Duration::from_secs(5));
            assert!(answered.is_some(), "{format} {id}: {:#?}", proxy.logs());
            let lines: Vec<String> = proxy
                .logs()
                .into_iter()
                .filter(|l| l.contains("request failed") && l.contains("unreachable"))
                .collect();
            assert!(
                !lines.is_empty() && lines.iter().all(|l| l.contains("request_id")),
                "{format}: {lines:#?}"
            );
            assert!(
                lines.iter().any(|l| l.contains(id)),
                "{format} {id}: {lines:#?}"
            );
        }
    }
}

/// A configuration for `fhir` with a registered ES384 client (its key returned), then
/// `configure`; its store and files in a new directory, where it is written as `proxy.toml`. The
/// directory lives as long as the returned guard.
fn written(
    fhir: &RunningFhir,
    configure: impl FnOnce(&mut Config),
) -> (keygen::GeneratedKey, tempfile::TempDir, std::path::PathBuf) {
    let key = keygen::generate(KeyAlgorithm::Es384).unwrap();
    let mut config = Config::default();
    config.upstream.url = fhir.url();
    config.auth.signing_secret = Some(SIGNING_SECRET.into());
    config.export.poll_retry_after_secs = 1;
    let scopes = ["system/*.read".into()];
    config
        .auth
        .clients
        .push(keygen::client_config(CLIENT_ID, &scopes, &key));
    configure(&mut config);
    let dir = tempfile::tempdir().unwrap();
    config.store.path = dir.path().join("jobs.redb");
    config.storage.path = dir.path().join("files");
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    (key, dir, config_path)
}
