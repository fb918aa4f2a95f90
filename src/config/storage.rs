//! `[storage]`: where export files live (a local directory or an S3-compatible bucket).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, Secret, invalid};

/// Where export files live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` (a directory) or `s3` (an S3-compatible bucket, `[storage.s3]`). Default `local`.
    pub backend: StorageBackend,
    /// Directory for NDJSON files with the `local` backend (shared by all replicas when there are
    /// several). Default `./data/files`.
    pub path: PathBuf,
    /// With `s3`: put presigned object URLs in manifests (`requiresAccessToken: false`), valid for
    /// at most `auth.token_lifetime_secs`; re-requesting the manifest signs them anew. Otherwise
    /// files are downloaded through the proxy with a bearer token. Default false.
    pub presigned_urls: bool,
    /// The bucket for the `s3` backend.
    pub s3: S3Config,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Local,
    S3,
}

/// An S3-compatible bucket. Credentials left unset come from the environment the AWS way
/// (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, web identity, instance metadata).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name. Required with `storage.backend = "s3"`.
    pub bucket: String,
    /// Endpoint URL for S3-compatible servers (MinIO, Garage, Ceph...), e.g. `http://minio:9000`;
    /// requests are path-style. Default: unset, AWS S3 for `region`.
    pub endpoint: Option<String>,
    /// Region. Default `us-east-1`.
    pub region: String,
    /// Access key id. Default: unset (from the environment).
    pub access_key_id: Option<String>,
    /// Secret access key. Default: unset (from the environment).
    pub secret_access_key: Option<Secret>,
    /// Key prefix for export files (`{prefix}/{job}/{file}`). Default: unset, the bucket root.
    pub prefix: String,
    /// Allow a plain-HTTP endpoint. Default false.
    pub allow_http: bool,
    /// Bytes buffered per file before they are uploaded as one part (a unit's progress is
    /// checkpointed at each part upload, so this is also what a crashed worker re-fetches at
    /// most). At least 5 MiB, S3's minimum part size. Default 8 MiB.
    pub part_size_bytes: u64,
}

/// `endpoint` as check-config shows it: a password in it is not the log's to see.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field(
                "endpoint",
                &self.endpoint.as_deref().map(super::secret::redact_url),
            )
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("prefix", &self.prefix)
            .field("allow_http", &self.allow_http)
            .field("part_size_bytes", &self.part_size_bytes)
            .finish()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Local,
            path: PathBuf::from("data/files"),
            presigned_urls: false,
            s3: S3Config::default(),
        }
    }
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            prefix: String::new(),
            allow_http: false,
            part_size_bytes: 8 * 1024 * 1024,
        }
    }
}

impl StorageConfig {
    /// `max_file_bytes` is `export.max_file_bytes`: it decides how many parts an upload needs.
    pub(super) fn validate(&self, max_file_bytes: u64) -> Result<(), ConfigError> {
        let storage = self;
        if storage.backend != StorageBackend::S3 {
            if storage.presigned_urls {
                return Err(invalid(
                    "storage.presigned_urls",
                    "true",
                    "needs storage.backend = \"s3\"",
                ));
            }
            return Ok(());
        }
        let s3 = &storage.s3;
        let bucket_ok = (3..=63).contains(&s3.bucket.len())
            && s3
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
        if !bucket_ok {
            return Err(invalid(
                "storage.s3.bucket",
                &s3.bucket,
                "required with storage.backend = \"s3\": 3 to 63 lowercase letters, digits, dots and hyphens",
            ));
        }
        if let Some(endpoint) = &s3.endpoint {
            let url = Url::parse(endpoint)
                .map_err(|e| invalid("storage.s3.endpoint", endpoint, e.to_string()))?;
            match url.scheme() {
                "https" => {}
                "http" if s3.allow_http => {}
                "http" => {
                    return Err(invalid(
                        "storage.s3.endpoint",
                        endpoint,
                        "plain http needs storage.s3.allow_http = true",
                    ));
                }
                _ => {
                    return Err(invalid(
                        "storage.s3.endpoint",
                        endpoint,
                        "scheme must be http or https",
                    ));
                }
            }
        }
        if s3.region.is_empty() {
            return Err(invalid("storage.s3.region", "", "must not be empty"));
        }
        if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
            return Err(invalid(
                "storage.s3.access_key_id",
                s3.access_key_id.as_deref().unwrap_or(""),
                "set both storage.s3.access_key_id and storage.s3.secret_access_key, or neither",
            ));
        }
        let prefix_ok = s3
            .prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .all(|segment| {
                !segment.starts_with('.')
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
        if !prefix_ok {
            return Err(invalid(
                "storage.s3.prefix",
                &s3.prefix,
                "segments of letters, digits, `.`, `_` and `-`, separated by `/`",
            ));
        }
        const MIN_PART: u64 = 5 * 1024 * 1024;
        const MAX_PART: u64 = 5 * 1024 * 1024 * 1024;
        if !(MIN_PART..=MAX_PART).contains(&s3.part_size_bytes) {
            return Err(invalid(
                "storage.s3.part_size_bytes",
                s3.part_size_bytes.to_string(),
                "must be between 5 MiB and 5 GiB (S3's part size limits)",
            ));
        }
        // S3 allows 10,000 parts per upload.
        if max_file_bytes / s3.part_size_bytes >= 10_000 {
            return Err(invalid(
                "storage.s3.part_size_bytes",
                s3.part_size_bytes.to_string(),
                "export.max_file_bytes would need more than 10000 parts: raise the part size",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use figment::Jail;

    use crate::config::Config;
    use crate::config::tests::{assert_each_bad_value_named, with_upstream};

    #[test]
    fn each_bad_storage_value_names_key_value_and_reason() {
        assert_each_bad_value_named(&[
            ("BULK_PROXY_STORAGE__BACKEND", "s3", "storage.s3.bucket"),
            ("BULK_PROXY_STORAGE__BACKEND", "gcs", "backend"),
            (
                "BULK_PROXY_STORAGE__PRESIGNED_URLS",
                "true",
                "storage.presigned_urls",
            ),
        ]);
    }

    #[test]
    fn s3_storage_settings_are_checked() {
        let check = |vars: &[(&str, &str)], expected: &str| {
            Jail::expect_with(|jail| {
                with_upstream(jail);
                jail.set_env("BULK_PROXY_STORAGE__BACKEND", "s3");
                jail.set_env("BULK_PROXY_STORAGE__S3__BUCKET", "exports");
                for (key, value) in vars {
                    jail.set_env(key, value);
                }
                let result = Config::load(None);
                match (expected, result) {
                    ("", Ok(_)) => {}
                    ("", Err(e)) => panic!("{vars:?}: {e}"),
                    (_, Ok(_)) => panic!("{vars:?} accepted"),
                    (_, Err(e)) => assert!(e.to_string().contains(expected), "{vars:?}: {e}"),
                }
                Ok(())
            });
        };
        check(&[], "");
        check(
            &[("BULK_PROXY_STORAGE__S3__BUCKET", "Bad_Bucket")],
            "storage.s3.bucket",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__ENDPOINT", "http://minio:9000")],
            "allow_http",
        );
        check(
            &[
                ("BULK_PROXY_STORAGE__S3__ENDPOINT", "http://minio:9000"),
                ("BULK_PROXY_STORAGE__S3__ALLOW_HTTP", "true"),
                ("BULK_PROXY_STORAGE__PRESIGNED_URLS", "true"),
            ],
            "",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__ACCESS_KEY_ID", "AKIA")],
            "secret_access_key",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__PART_SIZE_BYTES", "1024")],
            "storage.s3.part_size_bytes",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__PREFIX", "a/../b")],
            "storage.s3.prefix",
        );
    }
}
