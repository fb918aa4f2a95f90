//! The client registry (SPEC A4.1, A4.6): the `[[auth.clients]]` of the configuration, checked and
//! indexed by `client_id` at start-up.

use std::collections::HashMap;
use std::sync::Arc;

use super::jwks::Keys;
use crate::config::AuthConfig;
use crate::fhir::scopes::Scopes;

/// Where a client's public keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Registered inline in the configuration.
    Inline(Keys),
    /// Published at this URL (fetched through [`super::jwks::JwksCache`]).
    Url(String),
}

#[derive(Debug, Clone)]
pub struct Client {
    pub id: String,
    pub keys: KeySource,
    /// What the client may be granted at most.
    pub scopes: Scopes,
    pub enabled: bool,
    /// The Groups it may export; `None`: any.
    pub groups: Option<Vec<String>>,
}

#[derive(Debug, Default)]
pub struct Registry {
    clients: HashMap<String, Client>,
}

impl Registry {
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Self> {
        let mut clients = HashMap::new();
        for entry in &config.clients {
            let keys = match &entry.jwks_url {
                Some(url) => KeySource::Url(url.clone()),
                None => KeySource::Inline(Arc::new(entry.inline_keys()?)),
            };
            let client = Client {
                id: entry.client_id.clone(),
                keys,
                scopes: entry.allowed_scopes()?,
                enabled: entry.enabled,
                groups: entry.groups.clone(),
            };
            clients.insert(client.id.clone(), client);
        }
        Ok(Self { clients })
    }

    pub fn get(&self, client_id: &str) -> Option<&Client> {
        self.clients.get(client_id)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}
