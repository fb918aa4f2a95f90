//! SMART Backend Services from the client's side, for tests: key pairs (ES384, RS384), JWK Sets,
//! signed assertions (including deliberately broken ones), client registration on a test config,
//! a one-line `token()`, and a JWKS URL server whose answers tests steer.
//!
//! ```ignore
//! let mut config = TestProxy::config(&fake.url());
//! let client = SmartClient::register(&mut config);          // "test-client", system/*.read
//! let proxy = TestProxy::start(config).await;
//! let token = client.token(&proxy).await;                   // a bearer token
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhir_bulk_proxy::auth::keygen;
use fhir_bulk_proxy::config::{ClientConfig, Config};
use serde_json::{Value, json};

use crate::TestProxy;

/// The HS256 secret test proxies sign access tokens with (so tests can forge expired ones).
pub const TEST_SIGNING_SECRET: &str = "test-signing-secret-of-at-least-32-bytes";
/// The client id [`SmartClient::register`] uses.
pub const TEST_CLIENT: &str = "test-client";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A client key pair.
#[derive(Clone)]
pub struct ClientKey {
    pub alg: &'static str,
    pub kid: String,
    /// The private JWK, as `keygen` prints it.
    pub private: Value,
    pub public: Value,
}

impl ClientKey {
    pub fn es384() -> Self {
        Self::generate("ES384", &uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn rs384() -> Self {
        Self::generate("RS384", &uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn generate(alg: &'static str, kid: &str) -> Self {
        let (mut private, public_members): (_, &[&str]) = match alg {
            "ES384" => (keygen::ec_p384_jwk().unwrap(), &["kty", "crv", "x", "y"]),
            "RS384" => (keygen::rsa_jwk(2048).unwrap(), &["kty", "n", "e"]),
            other => panic!("no key type for {other}"),
        };
        private.insert("kid".into(), json!(kid));
        let mut public = json!({});
        for name in public_members {
            public[*name] = private[*name].clone();
        }
        public["kid"] = json!(kid);
        Self {
            alg,
            kid: kid.to_owned(),
            private: Value::Object(private),
            public,
        }
    }

    /// The same key material under another `kid`.
    pub fn with_kid(&self, kid: &str) -> Self {
        let mut key = self.clone();
        key.kid = kid.to_owned();
        key.private["kid"] = json!(kid);
        key.public["kid"] = json!(kid);
        key
    }

    /// `{"keys": [public]}`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.public] })
    }

    /// The usual header: `alg`, `typ` JWT, `kid`.
    pub fn header(&self) -> Value {
        json!({ "alg": self.alg, "typ": "JWT", "kid": self.kid })
    }

    /// Signs `header.claims` with this key, whatever the header says.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // The library's client signs with the key's own algorithm (ES384 or RS384).
        let signature = crate::client::ClientKey::from_json(&self.private)
            .unwrap()
            .sign(input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// A valid assertion for `client_id` at `token_url`, expiring in 4 minutes, with a fresh `jti`.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> String {
        self.sign(&self.header(), &claims(client_id, token_url))
    }
}

/// Good assertion claims: iss = sub = client, aud = token URL, exp in 4 minutes, a fresh jti.
pub fn claims(client_id: &str, token_url: &str) -> Value {
    let now = now();
    json!({
        "iss": client_id, "sub": client_id, "aud": token_url,
        "exp": now + 240, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
    })
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An unsigned JWT: `header.claims.signature` with the parts given (for `alg: none` and friends).
pub fn unsigned(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// The form of a good token request.
pub fn token_form(assertion: &str, scope: &str) -> Vec<(&'static str, String)> {
    vec![
        ("grant_type", "client_credentials".into()),
        ("scope", scope.into()),
        ("client_assertion_type", JWT_BEARER.into()),
        ("client_assertion", assertion.into()),
    ]
}

/// POSTs a form to the proxy's token endpoint.
pub async fn post_token(proxy: &TestProxy, form: &[(&str, String)]) -> reqwest::Response {
    crate::plain_client()
        .post(token_url(proxy))
        .form(form)
        .send()
        .await
        .unwrap()
}

/// The token endpoint of `proxy`, as clients must name it in `aud`.
pub fn token_url(proxy: &TestProxy) -> String {
    proxy.url(&proxy.config.auth.token_path)
}

/// A registered client and its key.
#[derive(Clone)]
pub struct SmartClient {
    pub id: String,
    pub key: ClientKey,
}

impl SmartClient {
    /// Registers [`TEST_CLIENT`] (ES384 key, inline JWKS, `system/*.read`) on `config`, and sets the
    /// test signing secret.
    pub fn register(config: &mut Config) -> Self {
        Self::register_with(config, TEST_CLIENT, ClientKey::es384(), &["system/*.read"])
    }

    /// Registers `id` with `key` inline and `scopes`.
    pub fn register_with(config: &mut Config, id: &str, key: ClientKey, scopes: &[&str]) -> Self {
        config.auth.signing_secret = Some(TEST_SIGNING_SECRET.into());
        config.auth.clients.push(ClientConfig {
            client_id: id.into(),
            jwks: Some(key.jwks()),
            jwks_url: None,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            enabled: true,
            groups: None,
        });
        Self { id: id.into(), key }
    }

    /// An access token for `system/*.read`.
    pub async fn token(&self, proxy: &TestProxy) -> String {
        self.token_for(proxy, "system/*.read").await
    }

    /// An access token for `scope`; panics with the proxy's answer if it refuses.
    pub async fn token_for(&self, proxy: &TestProxy, scope: &str) -> String {
        let assertion = self.key.assertion(&self.id, &token_url(proxy));
        let response = post_token(proxy, &token_form(&assertion, scope)).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "token request refused: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }
}

/// A client's JWKS URL on `127.0.0.1:0`, steered by the test: what it serves, its
/// `Cache-Control`, whether it hangs, and how often it was fetched.
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<JwksState>,
}

#[derive(Default)]
struct JwksState {
    body: Mutex<Vec<u8>>,
    cache_control: Mutex<Option<String>>,
    hang: AtomicBool,
    fetches: AtomicUsize,
}

impl JwksServer {
    pub async fn start(jwks: &Value) -> Self {
        let state = Arc::new(JwksState::default());
        *state.body.lock().unwrap() = jwks.to_string().into_bytes();
        let app = Router::new()
            .route("/jwks.json", axum::routing::get(serve_jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    pub fn serve(&self, jwks: &Value) {
        self.serve_bytes(jwks.to_string().into_bytes());
    }

    pub fn serve_bytes(&self, body: Vec<u8>) {
        *self.state.body.lock().unwrap() = body;
    }

    pub fn cache_control(&self, value: Option<&str>) {
        *self.state.cache_control.lock().unwrap() = value.map(str::to_owned);
    }

    pub fn hang(&self, hang: bool) {
        self.state.hang.store(hang, Ordering::SeqCst);
    }

    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }
}

async fn serve_jwks(State(state): State<Arc<JwksState>>) -> Response {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    if state.hang.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let body = state.body.lock().unwrap().clone();
    let mut response = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(value) = state.cache_control.lock().unwrap().as_deref() {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
    }
    response
}

/// Registers `id` with a JWKS URL instead of an inline set.
pub fn register_url(config: &mut Config, id: &str, url: &str, scopes: &[&str]) {
    config.auth.signing_secret = Some(TEST_SIGNING_SECRET.into());
    config.auth.clients.push(ClientConfig {
        client_id: id.into(),
        jwks: None,
        jwks_url: Some(url.into()),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        enabled: true,
        groups: None,
    });
}
