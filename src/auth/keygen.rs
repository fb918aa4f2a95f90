//! `fhir-bulk-proxy keygen`: a key pair for a new backend-services client (SPEC A4.1–3): the private
//! JWK the client signs its assertions with, the public JWK Set the proxy verifies them with, and the
//! `[[auth.clients]]` snippet that registers it.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p384::elliptic_curve::sec1::ToSec1Point as _;
use rsa::Generate as _;
use rsa::pkcs1::der::Decode as _;
use rsa::pkcs1::{EncodeRsaPrivateKey as _, RsaPrivateKeyRef};
use serde_json::{Map, Value, json};

use crate::config::ClientConfig;

/// The signing algorithm of a generated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Es384,
    Rs384,
}

impl KeyAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Es384 => "ES384",
            Self::Rs384 => "RS384",
        }
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = KeygenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_uppercase().as_str() {
            "ES384" => Ok(Self::Es384),
            "RS384" => Ok(Self::Rs384),
            _ => Err(KeygenError::Algorithm(text.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("unsupported algorithm {0:?}: use ES384 or RS384")]
    Algorithm(String),
    #[error("key generation failed: {0}")]
    Crypto(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The `keygen` command: a new key for `client_id`, written to files in `out` or, without it,
/// returned as text to print. Returns what to print.
pub fn run(
    client_id: &str,
    algorithm: KeyAlgorithm,
    scopes: &[String],
    out: Option<&Path>,
) -> Result<String, KeygenError> {
    let key = generate(algorithm)?;
    let Some(dir) = out else {
        return Ok(Report {
            client_id,
            scopes,
            key: &key,
        }
        .to_string());
    };
    let written = write_files(dir, client_id, scopes, &key)?;
    Ok(format!(
        "private key (give it to the client; readable by you only): {}\n\
         the same, as a JWK Set (for clients that want one):        {}\n\
         public JWK Set (publish it, or keep it inline):           {}\n\
         registration (append it to proxy.toml):                    {}\n",
        written.private_key.display(),
        written.private_jwks.display(),
        written.public_jwks.display(),
        written.registration.display()
    ))
}

/// A generated key pair.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    pub kid: String,
    pub algorithm: KeyAlgorithm,
    /// The private JWK (with `kid`, `alg`, `use`): the client's secret.
    pub private_jwk: Value,
    /// `{"keys": [public JWK]}`: what the proxy needs.
    pub public_jwks: Value,
}

/// RSA modulus size; 2048 bits is the floor SMART's examples use, 3072 lasts longer.
const RSA_BITS: usize = 3072;

/// Generates a key pair with a fresh random `kid`.
pub fn generate(algorithm: KeyAlgorithm) -> Result<GeneratedKey, KeygenError> {
    let (mut private, public_members): (Map<String, Value>, &[&str]) = match algorithm {
        KeyAlgorithm::Es384 => (ec_p384_jwk()?, &["kty", "crv", "x", "y"]),
        KeyAlgorithm::Rs384 => (rsa_jwk(RSA_BITS)?, &["kty", "n", "e"]),
    };
    let kid = uuid::Uuid::new_v4().simple().to_string();
    let mut public: Map<String, Value> = public_members
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), private.get(*name)?.clone())))
        .collect();
    for (name, value) in [
        ("kid", &kid as &str),
        ("alg", algorithm.name()),
        ("use", "sig"),
    ] {
        private.insert(name.into(), json!(value));
        public.insert(name.into(), json!(value));
    }
    // Clients (smart-fetch among them) look for a key allowed to sign.
    private.insert("key_ops".into(), json!(["sign"]));
    public.insert("key_ops".into(), json!(["verify"]));
    Ok(GeneratedKey {
        kid,
        algorithm,
        private_jwk: Value::Object(private),
        public_jwks: json!({ "keys": [public] }),
    })
}

/// A new EC P-384 private JWK (RFC 7518 §6.2): `kty`, `crv`, `x`, `y`, `d`.
pub fn ec_p384_jwk() -> Result<Map<String, Value>, KeygenError> {
    let secret = p384::SecretKey::try_generate().map_err(|e| KeygenError::Crypto(e.to_string()))?;
    let point = secret.public_key().as_affine().to_sec1_point(false);
    // Uncompressed SEC1: 0x04, then x and y, 48 bytes each.
    let (x, y) = point.as_bytes()[1..].split_at(48);
    let mut jwk = Map::new();
    jwk.insert("kty".into(), json!("EC"));
    jwk.insert("crv".into(), json!("P-384"));
    jwk.insert("x".into(), json!(URL_SAFE_NO_PAD.encode(x)));
    jwk.insert("y".into(), json!(URL_SAFE_NO_PAD.encode(y)));
    jwk.insert("d".into(), json!(URL_SAFE_NO_PAD.encode(secret.to_bytes())));
    Ok(jwk)
}

/// A new RSA private JWK of `bits` (RFC 7518 §6.3): `kty`, `n`, `e`, `d`, `p`, `q`, `dp`, `dq`,
/// `qi`, each a minimal big-endian integer; the CRT members are read back from the key's PKCS#1
/// form, which holds them all.
pub fn rsa_jwk(bits: usize) -> Result<Map<String, Value>, KeygenError> {
    let crypto = |e: &dyn fmt::Display| KeygenError::Crypto(e.to_string());
    let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits).map_err(|e| crypto(&e))?;
    let der = key.to_pkcs1_der().map_err(|e| crypto(&e))?;
    let parts = RsaPrivateKeyRef::from_der(der.as_bytes()).map_err(|e| crypto(&e))?;
    let mut jwk = Map::new();
    jwk.insert("kty".into(), json!("RSA"));
    for (name, value) in [
        ("n", parts.modulus),
        ("e", parts.public_exponent),
        ("d", parts.private_exponent),
        ("p", parts.prime1),
        ("q", parts.prime2),
        ("dp", parts.exponent1),
        ("dq", parts.exponent2),
        ("qi", parts.coefficient),
    ] {
        jwk.insert(name.into(), json!(URL_SAFE_NO_PAD.encode(value.as_bytes())));
    }
    Ok(jwk)
}

/// The client registration of `client_id` with this key's public JWK Set inline: what
/// [`config_snippet`] prints, for programs that build their [`Config`](crate::config::Config) in
/// code (the demo, tests).
pub fn client_config(client_id: &str, scopes: &[String], key: &GeneratedKey) -> ClientConfig {
    ClientConfig {
        client_id: client_id.to_owned(),
        jwks: Some(key.public_jwks.clone()),
        jwks_url: None,
        scopes: scopes.to_vec(),
        enabled: true,
        groups: None,
    }
}

/// The `[[auth.clients]]` entry registering `client_id` with this key inline.
pub fn config_snippet(client_id: &str, scopes: &[String], key: &GeneratedKey) -> String {
    let client = client_config(client_id, scopes, key);
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let jwks = client.jwks.unwrap_or_default().to_string();
    let scopes = client
        .scopes
        .iter()
        .map(|s| quote(s))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[auth.clients]]\n\
         client_id = {id}\n\
         scopes = [{scopes}]\n\
         # The public JWK Set, inline (JSON). Or publish it and register its URL instead:\n\
         # jwks_url = \"https://client.example.org/.well-known/jwks.json\"\n\
         jwks = {jwks}\n",
        id = quote(&client.client_id),
        jwks = quote(&jwks),
    )
}

/// The files `keygen --out DIR` wrote.
#[derive(Debug)]
pub struct Written {
    /// The private JWK, readable by its owner only (mode 0600 on Unix).
    pub private_key: PathBuf,
    /// The same private key as a JWK Set (`{"keys": [...]}`, mode 0600), ending in `.jwks`: the
    /// form some clients insist on (smart-fetch and the other cumulus tools read a `.jwks` or
    /// `.pem` file and nothing else).
    pub private_jwks: PathBuf,
    /// The public JWK Set.
    pub public_jwks: PathBuf,
    /// The `[[auth.clients]]` entry, to append to `proxy.toml`.
    pub registration: PathBuf,
}

/// Writes the key pair and the registration of `client_id` as three files in `dir` (created if
/// missing), named after the client id; refuses to overwrite a file that exists.
pub fn write_files(
    dir: &Path,
    client_id: &str,
    scopes: &[String],
    key: &GeneratedKey,
) -> std::io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    let stem: String = client_id
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect();
    let stem = stem.trim_start_matches('.');
    let written = Written {
        private_key: dir.join(format!("{stem}.private.jwk.json")),
        private_jwks: dir.join(format!("{stem}.private.jwks")),
        public_jwks: dir.join(format!("{stem}.jwks.json")),
        registration: dir.join(format!("{stem}.client.toml")),
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    write_new(&written.private_key, &pretty(&key.private_jwk), 0o600)?;
    let private_set = json!({ "keys": [key.private_jwk] });
    write_new(&written.private_jwks, &pretty(&private_set), 0o600)?;
    write_new(&written.public_jwks, &pretty(&key.public_jwks), 0o644)?;
    write_new(
        &written.registration,
        &config_snippet(client_id, scopes, key),
        0o644,
    )?;
    Ok(written)
}

/// Creates `path` with `mode` (on Unix) from the start, so the content is never readable by
/// others, not even for a moment.
fn write_new(path: &Path, content: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
    })?;
    file.write_all(content.as_bytes())?;
    file.write_all(b"\n")
}

/// What `keygen` prints.
pub struct Report<'a> {
    pub client_id: &'a str,
    pub scopes: &'a [String],
    pub key: &'a GeneratedKey,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        writeln!(
            f,
            "# Private key of client {:?} ({}, kid {}). Keep it secret: the client signs its\n\
             # assertions with it (e.g. BULK_CLIENT_KEY=<file> cargo run --example backend_client).",
            self.client_id,
            self.key.algorithm.name(),
            self.key.kid
        )?;
        writeln!(f, "{}\n", pretty(&self.key.private_jwk))?;
        writeln!(
            f,
            "# Public JWK Set: publish it at the client's JWKS URL, or register it inline.\n{}\n",
            pretty(&self.key.public_jwks)
        )?;
        writeln!(
            f,
            "# proxy.toml\n{}",
            config_snippet(self.client_id, self.scopes, self.key)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_has_a_private_half_and_a_public_set() {
        for algorithm in [KeyAlgorithm::Es384, KeyAlgorithm::Rs384] {
            let key = generate(algorithm).unwrap();
            assert_eq!(key.private_jwk["kid"], key.kid.as_str());
            assert_eq!(key.private_jwk["alg"], algorithm.name());
            assert!(key.private_jwk.get("d").is_some(), "private");
            let public = &key.public_jwks["keys"][0];
            assert!(public.get("d").is_none(), "public set has no private part");
            assert_eq!(public["kid"], key.kid.as_str());
            assert_eq!(public["use"], "sig");
            assert_eq!(key.private_jwk["key_ops"], json!(["sign"]));
            assert_eq!(public["key_ops"], json!(["verify"]));
            assert_eq!(key.private_jwk["use"], "sig");
            let kind = if algorithm == KeyAlgorithm::Es384 {
                "crv"
            } else {
                "n"
            };
            assert!(key.private_jwk.get(kind).is_some(), "{kind}");
        }
    }

    #[test]
    fn the_snippet_is_a_valid_client_registration() {
        let key = generate(KeyAlgorithm::Es384).unwrap();
        let snippet = config_snippet("my \"client\"", &["system/*.read".into()], &key);
        #[derive(serde::Deserialize)]
        struct Auth {
            clients: Vec<ClientConfig>,
        }
        #[derive(serde::Deserialize)]
        struct File {
            auth: Auth,
        }
        let file: File = toml::from_str(&snippet).unwrap();
        let client = &file.auth.clients[0];
        assert_eq!(client.client_id, "my \"client\"");
        assert_eq!(client.inline_keys().unwrap()[0]["kid"], key.kid.as_str());
        assert!(client.allowed_scopes().unwrap().can_read_all());
        // The registration built in code is the one the snippet prints.
        let built = client_config("my \"client\"", &["system/*.read".into()], &key);
        assert_eq!(built.client_id, client.client_id);
        assert_eq!(built.inline_keys().unwrap(), client.inline_keys().unwrap());
        assert_eq!(built.scopes, client.scopes);
    }

    #[test]
    fn the_private_key_is_written_as_a_jwk_and_as_a_jwk_set_for_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate(KeyAlgorithm::Es384).unwrap();
        let written = write_files(dir.path(), "c", &[], &key).unwrap();
        let read = |path: &Path| -> Value {
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
        };
        assert_eq!(read(&written.private_key), key.private_jwk);
        assert_eq!(
            read(&written.private_jwks),
            json!({ "keys": [key.private_jwk] })
        );
        assert!(written.private_jwks.to_string_lossy().ends_with(".jwks"));
        #[cfg(unix)]
        for path in [&written.private_key, &written.private_jwks] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", path.display());
        }
    }

    #[test]
    fn only_es384_and_rs384_are_offered() {
        assert_eq!(
            "es384".parse::<KeyAlgorithm>().unwrap(),
            KeyAlgorithm::Es384
        );
        assert_eq!(
            "RS384".parse::<KeyAlgorithm>().unwrap(),
            KeyAlgorithm::Rs384
        );
        assert!("HS256".parse::<KeyAlgorithm>().is_err());
    }
}
