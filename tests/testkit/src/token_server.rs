//! An OAuth 2.0 token endpoint on a real socket, standing for an upstream's authorization server:
//! it answers `client_credentials` requests (a client secret by HTTP Basic or in the form, or a
//! client assertion, which it records for the test to check), issues random bearer tokens with the
//! `expires_in` the test sets, and tells an upstream which tokens are valid now
//! ([`TokenServer::authorize`]). Tests steer it: refuse every request, answer slowly, revoke every
//! token issued so far; and read how many token requests it received.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

use crate::memory_fhir::Authorize;

/// How a client authenticated at the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic`: id and secret from the `Authorization` header.
    Basic { client_id: String, secret: String },
    /// `client_secret_post`: id and secret from the form.
    Post { client_id: String, secret: String },
    /// `private_key_jwt`: the client assertion as received.
    Assertion(String),
}

/// One token request as the server received it.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub auth: ClientAuth,
    pub scope: Option<String>,
    pub grant_type: Option<String>,
}

#[derive(Default)]
struct Inner {
    /// Seconds each issued token lives.
    expires_in: AtomicU64,
    /// Answer every request with 401 `invalid_client`.
    refuse: AtomicBool,
    /// Delay before answering, milliseconds.
    delay_ms: AtomicU64,
    requests: AtomicUsize,
    received: Mutex<Vec<TokenRequest>>,
    /// Valid tokens and when each expires.
    issued: Mutex<HashMap<String, Instant>>,
    /// Every token ever issued.
    all_issued: Mutex<Vec<String>>,
}

/// A running token endpoint.
pub struct TokenServer {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl TokenServer {
    /// Serves on a new `127.0.0.1` port; tokens live `expires_in` seconds.
    pub async fn start(expires_in: u64) -> Self {
        let inner = Arc::new(Inner::default());
        inner.expires_in.store(expires_in, Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("an address");
        let app = Router::new()
            .route("/token", axum::routing::post(token))
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, inner }
    }

    /// The token endpoint's URL.
    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token requests received so far.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Every token request received, in order.
    pub fn received(&self) -> Vec<TokenRequest> {
        self.inner.received.lock().unwrap().clone()
    }

    /// Every access token issued so far, revoked or not.
    pub fn issued(&self) -> Vec<String> {
        self.inner.all_issued.lock().unwrap().clone()
    }

    /// Refuses (401 `invalid_client`) every token request from now on, or stops refusing.
    pub fn refuse(&self, refuse: bool) {
        self.inner.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Waits `ms` before answering each token request.
    pub fn delay_ms(&self, ms: u64) {
        self.inner.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Invalidates every token issued so far (an upstream restart, a key rotation).
    pub fn revoke_all(&self) {
        self.inner.issued.lock().unwrap().clear();
    }

    /// Whether `authorization` is `Bearer {token}` of a token this server issued that has neither
    /// expired nor been revoked.
    pub fn is_valid(&self, authorization: Option<&str>) -> bool {
        is_valid(&self.inner, authorization)
    }

    /// [`TokenServer::is_valid`] as a [`crate::memory_fhir::MemoryFhir::require_authorization`]
    /// check.
    pub fn authorize(&self) -> Authorize {
        let inner = self.inner.clone();
        Arc::new(move |authorization| is_valid(&inner, authorization))
    }
}

fn is_valid(inner: &Inner, authorization: Option<&str>) -> bool {
    let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
        return false;
    };
    inner
        .issued
        .lock()
        .unwrap()
        .get(token)
        .is_some_and(|expires| Instant::now() < *expires)
}

async fn token(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: String) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .and_then(|v| String::from_utf8(v).ok());
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let auth = if let Some(assertion) = form.get("client_assertion") {
        ClientAuth::Assertion(assertion.clone())
    } else if let Some(pair) = basic {
        let (id, secret) = pair.split_once(':').unwrap_or((&pair, ""));
        ClientAuth::Basic {
            client_id: decode(id),
            secret: decode(secret),
        }
    } else {
        ClientAuth::Post {
            client_id: form.get("client_id").cloned().unwrap_or_default(),
            secret: form.get("client_secret").cloned().unwrap_or_default(),
        }
    };
    inner.received.lock().unwrap().push(TokenRequest {
        auth,
        scope: form.get("scope").cloned(),
        grant_type: form.get("grant_type").cloned(),
    });
    if inner.refuse.load(Ordering::SeqCst) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                json!({"error": "invalid_client", "error_description": "refused by the test"}),
            ),
        )
            .into_response();
    }
    let access_token = uuid::Uuid::new_v4().simple().to_string();
    let expires_in = inner.expires_in.load(Ordering::SeqCst);
    inner.all_issued.lock().unwrap().push(access_token.clone());
    inner.issued.lock().unwrap().insert(
        access_token.clone(),
        Instant::now() + Duration::from_secs(expires_in),
    );
    axum::Json(json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": form.get("scope").cloned().unwrap_or_default(),
    }))
    .into_response()
}
