//! What `check-config` reports: the effective endpoints, where jobs and files live, and
//! [`Config::warnings`], the one list of settings that are valid but probably not what the
//! operator wants. `run` logs the same list at start (`server::run`), so the two cannot drift.

use std::fmt::Write as _;

use url::Url;

use super::secret::redact_url;
use super::{Config, Secret, StorageBackend, StoreBackend};

impl Config {
    /// Valid settings that leave the proxy less useful or less safe than it looks. `run` logs
    /// each at start; `check-config` prints them and, with `--strict`, fails on any.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let auth = &self.auth;
        if auth.enabled && auth.signing_secret.is_none() {
            warnings.push(
                "auth.signing_secret is unset: signing access tokens with a random secret; \
                 tokens will not be accepted by other replicas or after a restart \
                 (set 32+ random bytes, the same on every replica: BULK_PROXY_AUTH__SIGNING_SECRET)"
                    .to_owned(),
            );
        }
        if auth.enabled && !auth.clients.iter().any(|c| c.enabled) {
            warnings.push(
                "auth is enabled but no enabled [[auth.clients]] are registered: no client can get \
                 a token (register one with `fhir-bulk-proxy keygen --client-id ID --out keys`)"
                    .to_owned(),
            );
        }
        if !auth.enabled {
            warnings.push(
                "auth.enabled = false: $export, status and file downloads need no token; anyone \
                 who reaches the proxy can export everything the upstream serves it"
                    .to_owned(),
            );
        }
        if let Some(public) = &self.server.public_url {
            let clear =
                Url::parse(public).is_ok_and(|url| url.scheme() == "http" && !is_loopback(&url));
            if clear && auth.enabled {
                let tls = if self.server.tls.is_some() {
                    "although the listener has TLS"
                } else {
                    "and the listener has no TLS"
                };
                warnings.push(format!(
                    "server.public_url {public:?} is plain http {tls}, while auth is on: client \
                     assertions and access tokens would cross the network in clear text (use an \
                     https public URL, with [server.tls] or a TLS-terminating ingress)"
                ));
            }
        }
        for relative in &self.loaded.relative_to_cwd {
            let in_use = match relative.key {
                "store.path" => self.store.backend == StoreBackend::Embedded,
                "storage.path" => self.storage.backend == StorageBackend::Local,
                _ => true,
            };
            if !in_use {
                continue;
            }
            let resolved = match relative.key {
                "store.path" => self.store.path.display().to_string(),
                "storage.path" => self.storage.path.display().to_string(),
                _ => String::new(),
            };
            let origin = match relative.origin {
                "default" => "the default, with no configuration file",
                _ => "from the environment",
            };
            warnings.push(format!(
                "{} = {:?} ({origin}) is relative, so it follows the working directory: {resolved}; \
                 started from another directory the proxy uses another one (give an absolute \
                 path, or a configuration file: relative paths in it resolve against its directory)",
                relative.key,
                relative.written.display(),
            ));
        }
        warnings
    }

    /// The `check-config` report: the effective endpoints and stores, then the warnings.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let source = match &self.loaded.file {
            Some(file) => format!("{} and the environment", file.display()),
            None => "defaults and the environment (no configuration file)".to_owned(),
        };
        let _ = writeln!(out, "configuration is valid ({source})");
        let _ = writeln!(out, "  upstream   {}", redact_url(&self.upstream.url));
        let scheme = if self.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let tls = match &self.server.tls {
            Some(tls) => format!(
                "TLS, cert {}, key {}",
                tls.cert.display(),
                tls.key.display()
            ),
            None => "plain HTTP".to_owned(),
        };
        let _ = writeln!(out, "  listen     {} ({tls})", self.server.listen);
        let base = match self.public_base() {
            Some(base) => base,
            None => format!(
                "{scheme}://<host>{} (server.public_url is unset: scheme and host come from each \
                 request's X-Forwarded-Proto, X-Forwarded-Host or Host)",
                self.base_path()
            ),
        };
        let _ = writeln!(out, "  FHIR base  {base}");
        if self.auth.enabled {
            let token = match self.public_base() {
                Some(base) => format!("{base}{}", self.auth.token_path),
                None => format!(
                    "{scheme}://<host>{}{}",
                    self.base_path(),
                    self.auth.token_path
                ),
            };
            let clients = self.auth.clients.iter().filter(|c| c.enabled).count();
            let _ = writeln!(
                out,
                "  token URL  {token} ({clients} enabled client{})",
                if clients == 1 { "" } else { "s" }
            );
        } else {
            let _ = writeln!(out, "  token URL  none: auth is off (auth.enabled = false)");
        }
        let store = match self.store.backend {
            StoreBackend::Embedded => format!("embedded, {}", self.store.path.display()),
            StoreBackend::Redis => format!(
                "redis, {}",
                self.store
                    .redis_url
                    .as_ref()
                    .map_or_else(|| redact_url(""), Secret::redacted_url)
            ),
        };
        let _ = writeln!(out, "  store      {store}");
        let storage = match self.storage.backend {
            StorageBackend::Local => format!("local directory {}", self.storage.path.display()),
            StorageBackend::S3 => {
                let s3 = &self.storage.s3;
                let endpoint = s3
                    .endpoint
                    .as_deref()
                    .map_or_else(|| format!("AWS S3, region {}", s3.region), redact_url);
                let prefix = if s3.prefix.is_empty() {
                    String::new()
                } else {
                    format!(", prefix {}", s3.prefix)
                };
                let credentials = if s3.access_key_id.is_some() {
                    "credentials from the configuration"
                } else {
                    "credentials from the AWS environment"
                };
                format!(
                    "s3 bucket {} at {endpoint}{prefix}, {credentials}",
                    s3.bucket
                )
            }
        };
        let _ = writeln!(out, "  storage    {storage}");
        let warnings = self.warnings();
        for warning in &warnings {
            let _ = writeln!(out, "warning: {warning}");
        }
        let _ = writeln!(
            out,
            "{} warning{}",
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" }
        );
        out
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, Loaded, TlsConfig, paths::RelativePath};

    fn config() -> Config {
        let mut config = Config::default();
        config.upstream.url = "http://fhir.internal:8080/fhir".into();
        config.auth.signing_secret = Some("0123456789abcdef0123456789abcdef".into());
        config.auth.clients.push(ClientConfig {
            client_id: "c".into(),
            jwks: None,
            jwks_url: Some("https://c/jwks.json".into()),
            scopes: vec!["system/*.read".into()],
            enabled: true,
            groups: None,
        });
        config.store.path = "/var/lib/p/jobs.redb".into();
        config.storage.path = "/var/lib/p/files".into();
        config
    }

    #[test]
    fn a_complete_configuration_has_no_warning_and_names_its_endpoints() {
        let mut config = config();
        config.server.public_url = Some("https://fhir.example.org/fhir".into());
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        let report = config.report();
        for expected in [
            "FHIR base  https://fhir.example.org/fhir\n",
            "token URL  https://fhir.example.org/fhir/token (1 enabled client)",
            "store      embedded, /var/lib/p/jobs.redb",
            "storage    local directory /var/lib/p/files",
            "0 warnings",
        ] {
            assert!(report.contains(expected), "{expected}: {report}");
        }
    }

    #[test]
    fn each_warning_names_its_key() {
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 6] = [
            ("auth.signing_secret is unset", |c| {
                c.auth.signing_secret = None
            }),
            ("no enabled [[auth.clients]]", |c| {
                c.auth.clients[0].enabled = false
            }),
            ("auth.enabled = false", |c| c.auth.enabled = false),
            (
                "server.public_url \"http://fhir.example.org/fhir\" is plain http",
                |c| c.server.public_url = Some("http://fhir.example.org/fhir".into()),
            ),
            ("although the listener has TLS", |c| {
                c.server.public_url = Some("http://fhir.example.org/fhir".into());
                c.server.tls = Some(TlsConfig {
                    cert: "/c".into(),
                    key: "/k".into(),
                });
            }),
            (
                "store.path = \"data/jobs.redb\" (from the environment)",
                |c| {
                    c.loaded = Loaded {
                        file: None,
                        relative_to_cwd: vec![RelativePath {
                            key: "store.path",
                            written: "data/jobs.redb".into(),
                            origin: "environment",
                        }],
                    }
                },
            ),
        ];
        for (expected, change) in cases {
            let mut config = config();
            change(&mut config);
            let warnings = config.warnings();
            assert_eq!(warnings.len(), 1, "{expected}: {warnings:?}");
            assert!(warnings[0].contains(expected), "{expected}: {warnings:?}");
            assert!(
                config
                    .report()
                    .contains(&format!("warning: {}", warnings[0]))
            );
        }
        let mut local = config();
        local.server.public_url = Some("http://localhost:8080/fhir".into());
        assert!(local.warnings().is_empty(), "loopback is not the network");
    }

    #[test]
    fn the_report_hides_the_redis_password_and_says_when_auth_is_off() {
        let mut config = config();
        config.store.backend = StoreBackend::Redis;
        config.store.redis_url = Some("redis://default:hunter2@redis:6379/0".into());
        config.auth.enabled = false;
        let report = config.report();
        assert!(!report.contains("hunter2"), "{report}");
        assert!(
            report.contains("store      redis, redis://default:***@redis:6379/0"),
            "{report}"
        );
        assert!(report.contains("token URL  none: auth is off"), "{report}");
        assert!(report.contains("FHIR base  http://<host>/fhir (server.public_url is unset"));
    }
}
