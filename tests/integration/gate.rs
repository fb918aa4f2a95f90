//! The one gate, from the attacker's side over real sockets. The table of what the proxy answers
//! itself is the library's own (`routes::RouteTable`), so a new route is in these tests the day it
//! is added: every method on every route, with no token, a type-limited token and a token for every
//! type, on every way a connection can be served (the fast path, hyper, passthrough authorization
//! on), never reaches the upstream; every passthrough request with passthrough authorization on
//! passes the token and scope checks.

use axum::http::Method;
use fhir_bulk_proxy::config::Config;
use fhir_bulk_proxy::routes::{Access, RouteTable};
use serde_json::Value;

use crate::support::fake_fhir::RunningFake;
use crate::support::smart::{ClientKey, SmartClient};
use crate::support::{FakeFhir, TestProxy, client, outcome, raw_request};

/// Every request a test sends carries this header; the upstream seeing it means it was forwarded.
const PROBE: &str = "x-gate-probe";

const METHODS: &[Method] = &[
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// A proxy with two clients: one limited to Patient, one for every type.
struct Gated {
    proxy: TestProxy,
    fake: RunningFake,
    patient_token: String,
    all_token: String,
    /// One client for the whole test (building one loads the system's root certificates).
    client: reqwest::Client,
}

impl Gated {
    async fn start(configure: impl FnOnce(&mut Config)) -> Self {
        let fake = FakeFhir::new().start().await;
        let mut config = TestProxy::config(&fake.url());
        let patients = SmartClient::register_with(
            &mut config,
            "patients-only",
            ClientKey::es384(),
            &["system/Patient.read"],
        );
        let everything = SmartClient::register_with(
            &mut config,
            "everything",
            ClientKey::es384(),
            &["system/*.read"],
        );
        configure(&mut config);
        let proxy = TestProxy::start(config).await;
        let (patient_token, all_token) = if proxy.config.auth.enabled {
            (
                patients.token_for(&proxy, "system/Patient.read").await,
                everything.token(&proxy).await,
            )
        } else {
            (String::new(), String::new())
        };
        Self {
            proxy,
            fake,
            patient_token,
            all_token,
            client: client(),
        }
    }

    fn tokens(&self) -> [(&'static str, Option<&str>); 3] {
        [
            ("no token", None),
            ("Patient token", Some(&self.patient_token)),
            ("all-types token", Some(&self.all_token)),
        ]
    }

    /// Sends `method target` (the target below the server's root) with `token` and the probe.
    async fn send(&self, method: &Method, target: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .request(method.clone(), self.proxy.root(target))
            .header(PROBE, format!("{method} {target}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// Sends the request line as written; returns the status.
    async fn send_raw(&self, method: &Method, target: &str, token: Option<&str>) -> u16 {
        let probe = format!("{method} {target}");
        let authorization = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![(PROBE, probe.as_str())];
        if let Some(authorization) = &authorization {
            headers.push(("authorization", authorization));
        }
        raw_request(self.proxy.addr, method.as_str(), target, &headers).await
    }

    /// The probes the upstream has seen.
    fn forwarded(&self) -> Vec<String> {
        self.fake
            .received()
            .iter()
            .filter_map(|r| r.header(PROBE).map(str::to_owned))
            .collect()
    }
}

/// A change to a test proxy's configuration.
type Configure = fn(&mut Config);

/// Every way a connection can be served: a name and the configuration change.
fn configurations() -> [(&'static str, Configure); 4] {
    [
        ("fast path", |_| {}),
        ("general path", |c| c.server.http1_fast_path = false),
        ("passthrough authorization", |c| c.auth.passthrough = true),
        ("auth disabled", |c| c.auth.enabled = false),
    ]
}

#[tokio::test]
async fn no_method_on_any_route_of_the_proxy_reaches_the_upstream() {
    for (name, configure) in configurations() {
        let gated = Gated::start(configure).await;
        let config = &gated.proxy.config;
        let table = RouteTable::new(
            &config.base_path(),
            config.auth.enabled,
            &config.auth.token_path,
        );
        let mut sent = 0;
        for mounted in table.iter() {
            let route = mounted.route;
            for target in [
                mounted.example("x1"),
                mounted.example("x1") + "?_format=xml",
            ] {
                for method in METHODS {
                    for (holder, token) in gated.tokens() {
                        let response = gated.send(method, &target, token).await;
                        sent += 1;
                        let status = response.status().as_u16();
                        let what = format!("{name}: {method} {target} with {holder} -> {status}");
                        if !route.methods.contains(method) {
                            assert_eq!(status, 405, "{what}");
                            let allow = response.headers()["allow"].to_str().unwrap().to_owned();
                            assert!(allow.contains("GET") || allow.contains("POST"), "{what}");
                            if *method != Method::HEAD {
                                outcome(response, 405).await;
                            }
                            continue;
                        }
                        assert!(status < 500, "{what}");
                        assert_ne!(status, 405, "{what}");
                        if route.access == Access::Token && token.is_none() && config.auth.enabled {
                            assert_eq!(status, 401, "{what}");
                        }
                    }
                }
            }
        }
        assert!(sent > 300, "{name}: {sent} requests");
        let forwarded: Vec<String> = gated
            .forwarded()
            .into_iter()
            // The metadata endpoint hands XML to the upstream, through the gate.
            .filter(|probe| !(probe.contains("/metadata?_format=xml")))
            .collect();
        assert!(forwarded.is_empty(), "{name}: forwarded {forwarded:?}");
    }
}

#[tokio::test]
async fn with_passthrough_authorization_every_forward_passes_the_token_and_scope_checks() {
    let gated = Gated::start(|c| c.auth.passthrough = true).await;
    // (method, target below the base, what the Patient token gets, what the all-types token gets);
    // 0 = forwarded. No token gets 401 everywhere but the public metadata.
    let cases: &[(Method, &str, u16, u16)] = &[
        (Method::GET, "/Patient/1", 0, 0),
        (Method::HEAD, "/Patient", 0, 0),
        (Method::GET, "/Patient?name=x&_count=5", 0, 0),
        (Method::GET, "/Patient/1/_history/2", 0, 0),
        (Method::GET, "/Observation", 403, 0),
        (
            Method::GET,
            "/Patient?_revinclude=Observation:patient",
            403,
            0,
        ),
        (
            Method::GET,
            "/Patient?_include=Patient:organization",
            403,
            0,
        ),
        (
            Method::GET,
            "/Patient?_has:Observation:patient:code=1",
            403,
            0,
        ),
        (Method::GET, "/Patient?organization.name=Acme", 403, 0),
        (Method::GET, "/Patient/x/$everything", 403, 0),
        (Method::GET, "/Patient/x/Observation", 403, 0),
        (Method::GET, "/Patient/%2e%2e/Observation", 403, 403),
        (Method::GET, "/Patient/..%2FObservation", 403, 403),
        (Method::GET, "/", 403, 0),
        (Method::GET, "/_history", 403, 0),
        (Method::PUT, "/Patient/1", 403, 403),
        (Method::DELETE, "/Patient/1", 403, 403),
        (Method::PATCH, "/Group/7", 403, 403),
        (Method::POST, "/Patient", 403, 403),
    ];
    let base = gated.proxy.config.base_path();
    for (method, target, patient, all) in cases {
        let target = format!("{base}{target}");
        for (holder, token, expected) in [
            ("no token", None, 401),
            ("Patient token", Some(&gated.patient_token), *patient),
            ("all-types token", Some(&gated.all_token), *all),
        ] {
            let before = gated.forwarded().len();
            let token = token.map(|t| t.as_str());
            // reqwest's URL parser would resolve `%2e%2e` as `..` before sending.
            let (status, response) = if target.contains("%2e") {
                (gated.send_raw(method, &target, token).await, None)
            } else {
                let response = gated.send(method, &target, token).await;
                (response.status().as_u16(), Some(response))
            };
            let forwarded = gated.forwarded().len() > before;
            let what = format!("{method} {target} with {holder} -> {status}");
            if expected == 0 {
                assert!(forwarded && status == 200, "{what}");
                continue;
            }
            assert!(!forwarded, "{what} reached the upstream");
            assert_eq!(status, expected, "{what}");
            if let Some(response) = response.filter(|_| *method != Method::HEAD) {
                outcome(response, expected).await;
            }
        }
    }

    // The CapabilityStatement stays public in every form; writes to it do not get through.
    let xml = gated
        .send(&Method::GET, &format!("{base}/metadata?_format=xml"), None)
        .await;
    assert_eq!(xml.status(), 200);
    assert!(
        gated
            .forwarded()
            .iter()
            .any(|p| p.ends_with("/metadata?_format=xml")),
        "handed to the upstream without a token"
    );
    for method in [Method::PUT, Method::DELETE, Method::POST] {
        let response = gated.send(&method, &format!("{base}/metadata"), None).await;
        outcome(response, 405).await;
    }
}

#[tokio::test]
async fn a_post_search_is_checked_by_its_form_body_too() {
    let gated = Gated::start(|c| c.auth.passthrough = true).await;
    let search = gated.proxy.url("/Patient/_search");
    let post = |body: &'static str, token: &str| {
        client()
            .post(&search)
            .header(PROBE, body)
            .header("content-type", "application/x-www-form-urlencoded")
            .bearer_auth(token)
            .body(body)
            .send()
    };

    let refused = post(
        "name=x&_revinclude=Observation:patient",
        &gated.patient_token,
    )
    .await
    .unwrap();
    let diagnostics = outcome(refused, 403).await;
    assert!(diagnostics.contains("_revinclude"), "{diagnostics}");

    let allowed = post("name=x&_count=3", &gated.patient_token).await.unwrap();
    assert_eq!(allowed.status(), 200);
    let report: Value = allowed.json().await.unwrap();
    assert_eq!(report["method"], "POST", "{report}");
    let received = gated.fake.received();
    let last = received.last().unwrap();
    assert_eq!(
        &last.body[..],
        b"name=x&_count=3",
        "the body reaches the upstream as sent"
    );

    let all = post("_revinclude=Observation:patient", &gated.all_token)
        .await
        .unwrap();
    assert_eq!(
        all.status(),
        200,
        "a token for every type may include anything"
    );

    let json = client()
        .post(&search)
        .header("content-type", "application/fhir+json")
        .bearer_auth(&gated.patient_token)
        .body("{}")
        .send()
        .await
        .unwrap();
    outcome(json, 400).await;
}
