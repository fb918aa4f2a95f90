//! The shipped `proxy.toml` is valid once given an upstream, names no upstream of its own, and
//! documents every key the code knows.

use fhir_bulk_proxy::config::Config;

#[test]
fn shipped_proxy_toml_is_valid_with_an_upstream_and_names_none_itself() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut config: Config = toml::from_str(&text).expect("proxy.toml parses into Config");
    // Copied as it is, it must not send anyone's requests to an example upstream.
    assert_eq!(config.upstream.url, "", "upstream.url is commented out");
    let refused = config.validate().unwrap_err().to_string();
    assert!(
        refused.starts_with("upstream.url is required: ") && refused.contains("e.g."),
        "{refused}"
    );
    config.upstream.url = "http://fhir.internal:8080/fhir".into();
    config.validate().expect("proxy.toml validates");
}

#[test]
fn proxy_toml_documents_every_key_with_its_environment_name() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut config = Config::default();
    config.server.public_url = Some(String::new());
    config.server.base_path = Some(String::new());
    config.server.tls = Some(fhir_bulk_proxy::config::TlsConfig {
        cert: "c".into(),
        key: "k".into(),
    });
    // One entry per array of tables, with every optional field set, so its fields are checked too.
    config
        .auth
        .clients
        .push(fhir_bulk_proxy::config::ClientConfig {
            client_id: "c".into(),
            jwks: Some(serde_json::json!({ "keys": [] })),
            jwks_url: Some("https://c/jwks.json".into()),
            scopes: vec!["system/*.read".into()],
            enabled: true,
            groups: None,
        });
    let tree = serde_json::to_value(&config).unwrap();
    let mut keys = Vec::new();
    let mut table_fields = Vec::new();
    collect_keys(&tree, "", &mut keys, &mut table_fields);
    for key in keys {
        let env = format!("BULK_PROXY_{}", key.to_uppercase().replace('.', "__"));
        assert!(
            text.contains(&env),
            "proxy.toml does not document {key} ({env})"
        );
    }
    // Fields of an array of tables have no environment name of their own: the comment names them.
    for (array, field) in table_fields {
        assert!(
            text.contains(&field),
            "proxy.toml does not document {array}.{field}"
        );
    }
}

fn collect_keys(
    value: &serde_json::Value,
    prefix: &str,
    keys: &mut Vec<String>,
    table_fields: &mut Vec<(String, String)>,
) {
    if let Some(object) = value.as_object() {
        for (name, child) in object {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if child.is_object() {
                collect_keys(child, &path, keys, table_fields);
            } else {
                if let Some(first) = child
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(|f| f.as_object())
                {
                    table_fields.extend(first.keys().map(|field| (path.clone(), field.clone())));
                }
                keys.push(path);
            }
        }
    }
}
