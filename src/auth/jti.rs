//! Single use of client assertions: every `jti` is remembered per issuer until the assertion expires
//! (SPEC A4.11, RFC 7523 §3 item 7). The store is a trait so that replicas can share it: the job
//! store implements it for Redis; [`MemoryJtiStore`] serves one process.

use std::collections::HashMap;
use std::sync::Mutex;

/// Why the replay check could not be made. The token request then fails with a server error: an
/// assertion is never accepted without the check.
#[derive(Debug, thiserror::Error)]
pub enum JtiError {
    #[error("the replay cache is unavailable: {0}")]
    Unavailable(String),
    #[error("the replay cache is full ({0} live entries)")]
    Full(usize),
}

/// Remembers `(issuer, jti)` pairs until they expire.
#[async_trait::async_trait]
pub trait JtiStore: Send + Sync {
    /// Records the pair and returns `true` if it had not been seen, `false` if it is a replay.
    /// `expires_at_unix` is when the assertion (and so the entry) expires, in seconds since the epoch.
    async fn first_use(
        &self,
        issuer: &str,
        jti: &str,
        expires_at_unix: u64,
    ) -> Result<bool, JtiError>;
}

/// A process-local [`JtiStore`]: correct for one replica only.
pub struct MemoryJtiStore {
    entries: Mutex<HashMap<(String, String), u64>>,
    capacity: usize,
}

/// Live entries kept at most; each is an assertion that passed signature checks within the last
/// few minutes, so reaching this means a flood, and refusing is better than growing without bound.
const DEFAULT_CAPACITY: usize = 1_000_000;

impl MemoryJtiStore {
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }
}

impl Default for MemoryJtiStore {
    fn default() -> Self {
        Self::new()
    }
}

use crate::job::now_unix;

#[async_trait::async_trait]
impl JtiStore for MemoryJtiStore {
    async fn first_use(
        &self,
        issuer: &str,
        jti: &str,
        expires_at_unix: u64,
    ) -> Result<bool, JtiError> {
        let now = now_unix();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let key = (issuer.to_owned(), jti.to_owned());
        if let Some(&expiry) = entries.get(&key)
            && expiry >= now
        {
            return Ok(false);
        }
        if entries.len() >= self.capacity {
            entries.retain(|_, expiry| *expiry >= now);
            if entries.len() >= self.capacity {
                return Err(JtiError::Full(entries.len()));
            }
        }
        entries.insert(key, expires_at_unix);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_jti_is_accepted_once_per_issuer() {
        let store = MemoryJtiStore::new();
        let later = now_unix() + 300;
        assert!(store.first_use("a", "1", later).await.unwrap());
        assert!(!store.first_use("a", "1", later).await.unwrap(), "replay");
        assert!(
            store.first_use("b", "1", later).await.unwrap(),
            "other issuer"
        );
    }

    #[tokio::test]
    async fn expired_entries_make_room_and_a_full_cache_refuses() {
        let store = MemoryJtiStore::with_capacity(2);
        let past = now_unix() - 10;
        let later = now_unix() + 300;
        store.first_use("a", "old1", past).await.unwrap();
        store.first_use("a", "old2", past).await.unwrap();
        assert!(
            store.first_use("a", "new1", later).await.unwrap(),
            "expired pruned"
        );
        assert!(store.first_use("a", "new2", later).await.unwrap());
        assert!(matches!(
            store.first_use("a", "new3", later).await,
            Err(JtiError::Full(2))
        ));
    }
}
