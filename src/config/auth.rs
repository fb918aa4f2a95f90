//! `[auth]`: SMART Backend Services (SPEC A4): the token endpoint, the proxy's access tokens,
//! JWKS fetching and the registry of clients, with their defaults and validation.

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, Secret, invalid};
use crate::fhir::resource_types::is_fhir_id;
use crate::fhir::scopes::Scopes;

/// Token endpoint, access tokens and the client registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether the proxy is a SMART Backend Services authorization server and requires its own
    /// bearer tokens on `$export`, status and file requests. Default true.
    pub enabled: bool,
    /// Path of the token endpoint under the FHIR base. Default `/token`.
    pub token_path: String,
    /// Lifetime of the access tokens the proxy issues, seconds (SMART recommends at most 300).
    /// Default 300.
    pub token_lifetime_secs: u64,
    /// Clock skew allowed when checking `exp`, `nbf` and `iat` of client assertions and access
    /// tokens, seconds. Default 60.
    pub clock_skew_secs: u64,
    /// Secret (at least 32 bytes) the proxy signs its access tokens with (HS256). Every replica must
    /// share it. Default: unset, a random secret is generated at start with a warning; tokens then
    /// work only on the process that issued them and not across a restart.
    pub signing_secret: Option<Secret>,
    /// Time allowed to fetch a client's JWKS URL, milliseconds. Default 5000.
    pub jwks_fetch_timeout_ms: u64,
    /// Largest JWKS document read from a JWKS URL, bytes. Default 65536.
    pub jwks_max_bytes: usize,
    /// At most one fetch of a JWKS URL per this many seconds, whatever clients send (a fetch
    /// needed sooner waits). Default 1.
    pub jwks_min_refetch_secs: u64,
    /// Require the proxy's own access tokens on passthrough requests too (reads only, scoped by
    /// resource type); the client's `Authorization` is then replaced by `upstream.auth`.
    /// Default false: passthrough forwards the client's `Authorization` unchanged.
    pub passthrough: bool,
    /// Registered backend-services clients (`[[auth.clients]]`). Default: none.
    pub clients: Vec<ClientConfig>,
}

/// One registered client: its id, its public keys (inline `jwks` or a `jwks_url`), the scopes it
/// may be granted, and whether it may get tokens at all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The `client_id` (the `iss` and `sub` of its assertions). Required.
    pub client_id: String,
    /// Inline public JWK Set: a table `{ keys = [...] }`, or the same as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// URL of the client's public JWK Set (preferred: it allows key rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Scopes the client may be granted, e.g. `["system/*.read"]`. Required.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// A disabled client gets no tokens. Default true.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// The Groups (ids) this client may export with `Group/{id}/$export`; any other is a 403.
    /// Unset: any Group. Nested Groups count as part of the Group asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
}

fn enabled_by_default() -> bool {
    true
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            token_path: "/token".into(),
            token_lifetime_secs: 300,
            clock_skew_secs: 60,
            signing_secret: None,
            jwks_fetch_timeout_ms: 5_000,
            jwks_max_bytes: 64 * 1024,
            jwks_min_refetch_secs: 1,
            passthrough: false,
            clients: Vec::new(),
        }
    }
}

/// Shortest accepted `auth.signing_secret`: 256 bits, the HS256 key size (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

impl AuthConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.passthrough && !self.enabled {
            return Err(invalid(
                "auth.passthrough",
                "true",
                "needs auth.enabled = true: passthrough is protected by the proxy's own tokens",
            ));
        }
        let path = &self.token_path;
        if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#', ' ']) {
            return Err(invalid(
                "auth.token_path",
                path,
                "must be a path such as `/token`, without query or fragment",
            ));
        }
        if !(1..=3600).contains(&self.token_lifetime_secs) {
            return Err(invalid(
                "auth.token_lifetime_secs",
                self.token_lifetime_secs.to_string(),
                "must be between 1 and 3600 (SMART recommends 300)",
            ));
        }
        if self.clock_skew_secs > 300 {
            return Err(invalid(
                "auth.clock_skew_secs",
                self.clock_skew_secs.to_string(),
                "must be at most 300",
            ));
        }
        if let Some(secret) = &self.signing_secret
            && secret.expose().len() < MIN_SECRET_BYTES
        {
            return Err(invalid(
                "auth.signing_secret",
                "(hidden)",
                format!("must be at least {MIN_SECRET_BYTES} bytes"),
            ));
        }
        if self.jwks_fetch_timeout_ms == 0 {
            return Err(invalid(
                "auth.jwks_fetch_timeout_ms",
                "0",
                "must be greater than 0",
            ));
        }
        if self.jwks_max_bytes < 1024 {
            return Err(invalid(
                "auth.jwks_max_bytes",
                self.jwks_max_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        if self.jwks_min_refetch_secs > 300 {
            return Err(invalid(
                "auth.jwks_min_refetch_secs",
                self.jwks_min_refetch_secs.to_string(),
                "must be at most 300 (a token request may wait this long for a key rotation)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for client in &self.clients {
            client.validate()?;
            if !seen.insert(client.client_id.as_str()) {
                return Err(invalid(
                    "auth.clients.client_id",
                    &client.client_id,
                    "registered twice",
                ));
            }
        }
        Ok(())
    }
}

impl ClientConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.client_id;
        if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
            return Err(invalid(
                "auth.clients.client_id",
                id,
                "must be 1 to 255 printable characters",
            ));
        }
        match (&self.jwks, &self.jwks_url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(invalid(
                    "auth.clients.jwks",
                    id,
                    "give exactly one of `jwks` (inline JWK Set) and `jwks_url`",
                ));
            }
            (Some(_), None) => {
                self.inline_keys()?;
            }
            (None, Some(url)) => {
                let parsed = Url::parse(url)
                    .map_err(|e| invalid("auth.clients.jwks_url", url, e.to_string()))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                    return Err(invalid(
                        "auth.clients.jwks_url",
                        url,
                        "must be an http(s) URL with a host",
                    ));
                }
            }
        }
        if self.scopes.is_empty() {
            return Err(invalid(
                "auth.clients.scopes",
                id,
                "required: the scopes this client may be granted, e.g. [\"system/*.read\"]",
            ));
        }
        self.allowed_scopes()?;
        for group in self.groups.iter().flatten() {
            if !is_fhir_id(group) {
                return Err(invalid(
                    "auth.clients.groups",
                    group,
                    "must be Group ids (1 to 64 of A-Z a-z 0-9 - .)",
                ));
            }
        }
        Ok(())
    }

    /// The keys of the inline `jwks` (a table, or a JSON string). Each has `kty` and a `kid`
    /// unique within the set (SPEC A4.2).
    pub fn inline_keys(&self) -> Result<Vec<serde_json::Value>, ConfigError> {
        let id = &self.client_id;
        let parsed;
        let set = match &self.jwks {
            Some(serde_json::Value::String(text)) => {
                parsed = serde_json::from_str::<serde_json::Value>(text).map_err(|e| {
                    invalid("auth.clients.jwks", id, format!("not a JSON JWK Set: {e}"))
                })?;
                &parsed
            }
            Some(value) => value,
            None => return Ok(Vec::new()),
        };
        let keys = set
            .get("keys")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| invalid("auth.clients.jwks", id, "must have a `keys` array"))?;
        let mut kids = std::collections::HashSet::new();
        for key in keys {
            let kid = key.get("kid").and_then(serde_json::Value::as_str);
            let kty = key.get("kty").and_then(serde_json::Value::as_str);
            let (Some(kid), Some(_)) = (kid, kty) else {
                return Err(invalid(
                    "auth.clients.jwks",
                    id,
                    "every key needs `kty` and `kid`",
                ));
            };
            if key.get("d").is_some() {
                return Err(invalid(
                    "auth.clients.jwks",
                    id,
                    format!("key {kid:?} is a private key: register only the public key"),
                ));
            }
            if !kids.insert(kid) {
                return Err(invalid(
                    "auth.clients.jwks",
                    id,
                    format!("kid {kid:?} appears twice"),
                ));
            }
        }
        Ok(keys.clone())
    }

    /// The scopes this client may be granted (system scopes only: backend services act for no user
    /// or patient).
    pub fn allowed_scopes(&self) -> Result<Scopes, ConfigError> {
        let joined = self.scopes.join(" ");
        let scopes = Scopes::parse(&joined)
            .map_err(|e| invalid("auth.clients.scopes", &joined, e.to_string()))?;
        if !scopes.all_system() {
            return Err(invalid(
                "auth.clients.scopes",
                &joined,
                "backend-services clients can only be granted system/ scopes",
            ));
        }
        Ok(scopes)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use crate::config::tests::load_toml as load;

    #[test]
    fn auth_defaults_are_the_documented_ones() {
        let config = load("").unwrap();
        let auth = &config.auth;
        assert!(auth.enabled);
        assert_eq!(auth.token_path, "/token");
        assert_eq!(auth.token_lifetime_secs, 300);
        assert_eq!(auth.clock_skew_secs, 60);
        assert!(auth.signing_secret.is_none());
        assert!(!auth.passthrough);
        assert!(auth.clients.is_empty());
    }

    #[test]
    fn clients_are_an_array_of_tables_with_inline_jwks_or_a_url() {
        let config = load(
            r#"
[[auth.clients]]
client_id = "inline"
scopes = ["system/*.read"]
jwks = { keys = [{ kty = "EC", kid = "k1", crv = "P-384", x = "AA", y = "AA" }] }

[[auth.clients]]
client_id = "remote"
scopes = ["system/Patient.rs", "system/Observation.read"]
jwks_url = "https://client.example/jwks.json"
enabled = false
"#,
        )
        .unwrap();
        let clients = &config.auth.clients;
        assert_eq!(clients.len(), 2);
        assert!(clients[0].enabled, "enabled by default");
        assert_eq!(clients[0].inline_keys().unwrap().len(), 1);
        assert_eq!(
            clients[1].jwks_url.as_deref(),
            Some("https://client.example/jwks.json")
        );
        assert!(!clients[1].enabled);
    }

    #[test]
    fn inline_jwks_may_be_a_json_string() {
        let config = load(
            r#"
[[auth.clients]]
client_id = "json"
scopes = ["system/*.rs"]
jwks = '{"keys":[{"kty":"RSA","kid":"r1","n":"AQAB","e":"AQAB"}]}'
"#,
        )
        .unwrap();
        assert_eq!(
            config.auth.clients[0].inline_keys().unwrap()[0]["kid"],
            "r1"
        );
    }

    #[test]
    fn each_bad_auth_value_names_key_value_and_reason() {
        let cases = [
            ("[auth]\ntoken_path = \"token\"\n", "auth.token_path"),
            (
                "[auth]\ntoken_lifetime_secs = 0\n",
                "auth.token_lifetime_secs",
            ),
            ("[auth]\nclock_skew_secs = 3600\n", "auth.clock_skew_secs"),
            ("[auth]\nsigning_secret = \"short\"\n", "at least 32 bytes"),
            ("[auth]\njwks_max_bytes = 10\n", "auth.jwks_max_bytes"),
            (
                "[auth]\njwks_fetch_timeout_ms = 0\n",
                "auth.jwks_fetch_timeout_ms",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\n",
                "exactly one of `jwks`",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\njwks_url = \"ftp://x/j\"\n",
                "auth.clients.jwks_url",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\njwks = { keys = [{ kty = \"EC\" }] }\n",
                "`kty` and `kid`",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\njwks = { keys = [{ kty = \"EC\", kid = \"k\" }, { kty = \"EC\", kid = \"k\" }] }\n",
                "appears twice",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\njwks = { keys = [{ kty = \"EC\", kid = \"k\", d = \"secret\" }] }\n",
                "private key",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/Bogus.read\"]\njwks_url = \"https://x/j\"\n",
                "auth.clients.scopes",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"patient/*.read\"]\njwks_url = \"https://x/j\"\n",
                "only be granted system/",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\njwks_url = \"https://x/j\"\ngroups = [\"ok\", \"Group/x\"]\n",
                "auth.clients.groups",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\njwks_url = \"https://x/j\"\n",
                "auth.clients.scopes",
            ),
            (
                "[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\njwks_url = \"https://x/j\"\n[[auth.clients]]\nclient_id = \"a\"\nscopes = [\"system/*.read\"]\njwks_url = \"https://x/j\"\n",
                "registered twice",
            ),
        ];
        for (toml, expected) in cases {
            let message = load(toml).expect_err(toml);
            assert!(message.contains(expected), "{toml}: {message}");
        }
    }
}
