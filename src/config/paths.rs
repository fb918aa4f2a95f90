//! Path-typed keys (`store.path`, `store.redis_ca_file`, `storage.path`, `server.tls.cert`, `server.tls.key`) and what a
//! relative one means. A proxy started from another directory must find the same job store, so:
//!
//! - a relative path written in the configuration file resolves against that file's directory;
//! - a default (`data/jobs.redb`, `data/files`) resolves against the configuration file's directory
//!   when a file was read, else against the working directory;
//! - a relative path from an environment variable resolves against the working directory (where
//!   the command that set it runs), as a shell would.
//!
//! Every path is absolute after [`Config::load`]. Those resolved against the working directory are
//! remembered in [`Loaded`], because they change with it: [`Config::warnings`] names them.

use std::path::{Path, PathBuf};

use figment::{Figment, Source};

use super::Config;

/// Where the configuration came from; not a key (not read from the file or the environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The configuration file read, absolute; `None` for defaults and environment only.
    pub file: Option<PathBuf>,
    /// Path keys that were relative and resolved against the working directory.
    pub relative_to_cwd: Vec<RelativePath>,
}

/// A relative path resolved against the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelativePath {
    pub key: &'static str,
    /// As written.
    pub written: PathBuf,
    /// `"default"` or `"environment"`.
    pub origin: &'static str,
}

impl Config {
    /// The path-typed keys, by name.
    fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let mut paths = vec![
            ("store.path", &mut self.store.path),
            ("storage.path", &mut self.storage.path),
        ];
        if let Some(ca) = &mut self.store.redis_ca_file {
            paths.push(("store.redis_ca_file", ca));
        }
        if let Some(tls) = &mut self.server.tls {
            paths.push(("server.tls.cert", &mut tls.cert));
            paths.push(("server.tls.key", &mut tls.key));
        }
        let upstream = &mut self.upstream;
        for (key, path) in [
            ("upstream.tls.ca_file", &mut upstream.tls.ca_file),
            ("upstream.tls.client_cert", &mut upstream.tls.client_cert),
            ("upstream.tls.client_key", &mut upstream.tls.client_key),
            (
                "upstream.auth.private_key_file",
                &mut upstream.auth.private_key_file,
            ),
        ] {
            if let Some(path) = path {
                paths.push((key, path));
            }
        }
        paths
    }

    /// Makes every path absolute by the rules above, from the providers `figment` says each
    /// value came from.
    pub(super) fn resolve_paths(&mut self, figment: &Figment) {
        let cwd = std::env::current_dir().unwrap_or_default();
        // The file exists (it was read): its directory is canonical, without `..`.
        let absolute = |file: &Path| std::fs::canonicalize(file).unwrap_or_else(|_| cwd.join(file));
        let file = figment.metadata().find_map(|m| match &m.source {
            Some(Source::File(path)) => Some(absolute(path)),
            _ => None,
        });
        let file_dir = file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let mut relative_to_cwd = Vec::new();
        for (key, path) in self.paths_mut() {
            if path.is_absolute() {
                continue;
            }
            // The defaults are `Serialized` (a code location), the environment has no source.
            let (base, origin) = match figment.find_metadata(key).and_then(|m| m.source.as_ref()) {
                Some(Source::File(file)) => {
                    (absolute(file).parent().map(Path::to_path_buf), "file")
                }
                Some(Source::Code(_)) => (file_dir.clone(), "default"),
                _ => (None, "environment"),
            };
            let base = base.unwrap_or_else(|| {
                relative_to_cwd.push(RelativePath {
                    key,
                    written: path.clone(),
                    origin,
                });
                cwd.clone()
            });
            *path = base.join(&*path);
        }
        self.loaded = Loaded {
            file,
            relative_to_cwd,
        };
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn relative_paths_follow_the_file_defaults_follow_the_file_environment_follows_the_cwd() {
        Jail::expect_with(|jail| {
            let cwd = jail.directory().to_path_buf();
            std::fs::create_dir_all(cwd.join("etc/tls")).unwrap();
            std::fs::write(cwd.join("etc/tls/c.pem"), "").unwrap();
            jail.create_file(
                "etc/proxy.toml",
                "[upstream]\nurl = \"http://fhir/fhir\"\n[server.tls]\ncert = \"tls/c.pem\"\nkey = \"/abs/k.pem\"\n[store]\npath = \"db/jobs.redb\"\n",
            )?;
            jail.set_env("BULK_PROXY_STORAGE__PATH", "files-here");
            let mut config: Config = Config::figment(Some(Path::new("etc/proxy.toml")))
                .extract()
                .unwrap();
            config.resolve_paths(&Config::figment(Some(Path::new("etc/proxy.toml"))));
            assert_eq!(
                config.store.path,
                cwd.join("etc/db/jobs.redb"),
                "from the file"
            );
            assert_eq!(config.storage.path, cwd.join("files-here"), "from the env");
            let tls = config.server.tls.as_ref().unwrap();
            assert_eq!(tls.cert, cwd.join("etc/tls/c.pem"));
            assert_eq!(tls.key, Path::new("/abs/k.pem"), "absolute stays");
            assert_eq!(config.loaded.file, Some(cwd.join("etc/proxy.toml")));
            assert_eq!(
                config.loaded.relative_to_cwd,
                [RelativePath {
                    key: "storage.path",
                    written: "files-here".into(),
                    origin: "environment"
                }]
            );

            // A default follows the file when there is one...
            jail.create_file("etc/other.toml", "[upstream]\nurl = \"http://fhir/fhir\"\n")?;
            let config = Config::load(Some(Path::new("etc/other.toml"))).unwrap();
            assert_eq!(config.store.path, cwd.join("etc/data/jobs.redb"));
            // ...and the working directory when there is none.
            jail.set_env("BULK_PROXY_UPSTREAM__URL", "http://fhir/fhir");
            let config = Config::load(None).unwrap();
            assert_eq!(config.store.path, cwd.join("data/jobs.redb"));
            assert_eq!(config.loaded.file, None);
            assert_eq!(config.loaded.relative_to_cwd.len(), 2);
            assert_eq!(config.loaded.relative_to_cwd[0].origin, "default");
            Ok(())
        });
    }

    #[test]
    fn a_proxy_toml_in_a_parent_directory_is_not_read() {
        Jail::expect_with(|jail| {
            jail.create_file("proxy.toml", "[upstream]\nurl = \"http://parent/fhir\"\n")?;
            std::fs::create_dir(jail.directory().join("sub")).unwrap();
            std::env::set_current_dir(jail.directory().join("sub")).unwrap();
            jail.set_env("BULK_PROXY_UPSTREAM__URL", "http://env/fhir");
            jail.set_env("BULK_PROXY_SERVER__LISTEN", "127.0.0.1:1");
            let config = Config::load(None).unwrap();
            assert_eq!(config.loaded.file, None);
            Ok(())
        });
    }
}
