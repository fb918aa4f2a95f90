//! The shared [`JobStore`]: Redis, so that several replicas share jobs, units, leases, poll times
//! and `jti`s (DESIGN: "any replica can serve any request").
//!
//! Design choices:
//!
//! - **Managed Redis**: `rediss://` through rustls (the system's roots, or `store.redis_ca_file`
//!   alone), the server's name always verified; an ACL user and password from the URL or
//!   `store.redis_password`. [`RedisStore::connect_configured`] sends a PING before it returns, so
//!   that a refused password stops the start instead of every later request.
//! - **One [`ConnectionManager`]** (a multiplexed connection that reconnects by itself), with
//!   connection and response timeouts, so an operation against a dead Redis fails within a few
//!   seconds instead of hanging; every Redis error becomes [`StoreError::Unavailable`] (503).
//! - **Every decision between workers is one Lua script** (`redis::Script`, EVALSHA with a
//!   fallback to EVAL after a Redis restart empties the script cache). Redis runs a script
//!   atomically, which is what claims, leases, the last finisher, the cap and `jti`s need; WATCH
//!   would need a dedicated connection per operation.
//! - **Lua never parses JSON.** The bodies are the JSON of [`crate::job`], written by Rust only:
//!   Redis' `cjson` turns empty arrays into objects and rounds big numbers. What scripts decide on
//!   is kept beside the JSON in plain fields: a job's `state` and `client`, a unit's owner and
//!   lease. When reading a unit, the owner and lease fields override the JSON's, and an
//!   unfinished unit is Running exactly when it has an owner.
//! - Scripts derive their keys from the prefix, so they assume a standalone Redis (or a
//!   primary/replica pair), not Redis Cluster.
//!
//! Key layout (prefix `fbp:` by default):
//!
//! | key                       | type   | content                                               |
//! |---------------------------|--------|-------------------------------------------------------|
//! | `job:{id}`                | hash   | `json` (Job), `state` (its state), `client`, `polled`, `fin*` (below) |
//! | `jobs`                    | set    | every job id                                          |
//! | `active:{client}`         | set    | the client's Running job ids (the kick-off cap)       |
//! | `units:{id}`              | hash   | `b:{i}` Unit JSON, `o:{i}` owner, `l:{i}` lease_until |
//! | `open:{id}`               | set    | indexes of unfinished units (its size counts down)    |
//! | `claimable`               | zset   | `{id}:{i}` scored by lease_until (0 = Pending) for the unfinished units of Running jobs |
//! | `poll:{id}`               | string | last accepted poll (Unix ms), expires after the interval |
//! | `jti:{len(iss)}:{iss}:{jti}` | string | expires_at, expires with it                        |
//! | `upstream-slots`          | zset   | holder → expiry (Unix ms): the fleet-wide upstream request cap |
//!
//! A job's hash also carries its first-poll mark (`polled`, set by the first status poll) and the
//! claim on its finalisation (`fin` the finisher, `fin_lease` until when, `fin_attempts` how many
//! claims so far), so both go with the job.
//!
//! `claimable` holds only units of Running jobs ([`JobStore::put_job`] removes a job's members when
//! it leaves Running), so claiming is one `ZRANGEBYSCORE … LIMIT 0 1` below `now`: expired leases
//! and Pending units alike, in O(log n).

use std::collections::BTreeMap;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, IntoConnectionInfo, RedisError, Script};
use async_trait::async_trait;

use super::{Created, JobStore, StoreError};
use crate::config::StoreConfig;
use crate::job::{Job, JobState, Unit, UnitState, UnixSecs};

/// Key prefix used by [`RedisStore::connect`].
pub const DEFAULT_PREFIX: &str = "fbp:";

/// How long connecting, and waiting for one answer, may take before the operation fails.
const TIMEOUT: Duration = Duration::from_secs(2);

impl From<RedisError> for StoreError {
    fn from(error: RedisError) -> Self {
        crate::telemetry::metrics::store_error("redis");
        StoreError::Unavailable(error.to_string())
    }
}

/// `url` with its password hidden, for messages.
fn redacted(url: &str) -> String {
    crate::config::Secret::from(url).redacted_url()
}

/// A connection error with its causes (rustls' reason for refusing a certificate is the source
/// of an I/O error, which `Display` alone leaves out).
fn describe(error: &RedisError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text = format!("{text}: {shown}");
        }
        source = std::error::Error::source(cause);
    }
    text
}

/// `ARGV`: prefix, id, finisher, now, lease_until. Returns the attempt number, or 0 when the
/// job is not Running, has unfinished units, or another finisher's claim is live.
const CLAIM_FINALIZE: &str = r"
local p, id, finisher = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
if redis.call('HGET', jk, 'state') ~= 'running' then return 0 end
if redis.call('SCARD', p .. 'open:' .. id) > 0 then return 0 end
local owner = redis.call('HGET', jk, 'fin')
if owner and owner ~= finisher
  and tonumber(redis.call('HGET', jk, 'fin_lease') or '0') >= tonumber(ARGV[4]) then
  return 0
end
local attempt = redis.call('HINCRBY', jk, 'fin_attempts', 1)
redis.call('HSET', jk, 'fin', finisher, 'fin_lease', ARGV[5])
return attempt
";

/// `ARGV`: prefix, id, finisher, lease_until. Returns 1 extended, 0 claim not held.
const EXTEND_FINALIZE: &str = r"
local jk = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('HGET', jk, 'state') ~= 'running' then return 0 end
if redis.call('HGET', jk, 'fin') ~= ARGV[3] then return 0 end
redis.call('HSET', jk, 'fin_lease', ARGV[4])
return 1
";

/// `ARGV`: prefix, id, finisher, state, json. Returns 1 committed, 0 claim not held or job not
/// Running.
const COMPLETE_JOB: &str = r"
local p, id, state = ARGV[1], ARGV[2], ARGV[4]
local jk = p .. 'job:' .. id
if redis.call('HGET', jk, 'state') ~= 'running' then return 0 end
if redis.call('HGET', jk, 'fin') ~= ARGV[3] then return 0 end
redis.call('HSET', jk, 'json', ARGV[5], 'state', state)
if state ~= 'running' then
  redis.call('SREM', p .. 'active:' .. redis.call('HGET', jk, 'client'), id)
  local ck = p .. 'claimable'
  for _, idx in ipairs(redis.call('SMEMBERS', p .. 'open:' .. id)) do
    redis.call('ZREM', ck, id .. ':' .. idx)
  end
end
return 1
";

/// `KEYS[1]` the job key. Returns 1 for the first poll of an existing job, 0 otherwise.
const FIRST_POLL: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'polled', '1')
";

/// `ARGV`: prefix, id, client, state, json, max, members (JSON, or empty), then per unit: index, body, lease, owner
/// (`""` for none), finished (`1`/`0`). Returns 1 created, 0 over the cap, -1 id taken.
const CREATE_JOB: &str = r"
local p, id, client, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = p .. 'job:' .. id
if redis.call('EXISTS', jk) == 1 then return -1 end
if state == 'running' then
  local ak = p .. 'active:' .. client
  if redis.call('SCARD', ak) >= tonumber(ARGV[6]) then return 0 end
  redis.call('SADD', ak, id)
end
redis.call('HSET', jk, 'json', ARGV[5], 'state', state, 'client', client)
redis.call('SADD', p .. 'jobs', id)
if ARGV[7] ~= '' then redis.call('SET', p .. 'members:' .. id, ARGV[7]) end
local uk, ok, ck = p .. 'units:' .. id, p .. 'open:' .. id, p .. 'claimable'
local i = 8
while i <= #ARGV do
  local idx, lease = ARGV[i], ARGV[i + 2]
  redis.call('HSET', uk, 'b:' .. idx, ARGV[i + 1], 'l:' .. idx, lease)
  if ARGV[i + 3] ~= '' then redis.call('HSET', uk, 'o:' .. idx, ARGV[i + 3]) end
  if ARGV[i + 4] == '0' then
    redis.call('SADD', ok, idx)
    if state == 'running' then redis.call('ZADD', ck, lease, id .. ':' .. idx) end
  end
  i = i + 5
end
return 1
";

/// `ARGV`: prefix, id, state, json. Returns 1 replaced, 0 no such job.
const PUT_JOB: &str = r"
local p, id, state = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. 'job:' .. id
local old = redis.call('HGET', jk, 'state')
if not old then return 0 end
redis.call('HSET', jk, 'json', ARGV[4], 'state', state)
if old ~= state and (old == 'running' or state == 'running') then
  local ak = p .. 'active:' .. redis.call('HGET', jk, 'client')
  local uk, ck = p .. 'units:' .. id, p .. 'claimable'
  local open = redis.call('SMEMBERS', p .. 'open:' .. id)
  if state == 'running' then
    redis.call('SADD', ak, id)
    for _, idx in ipairs(open) do
      redis.call('ZADD', ck, redis.call('HGET', uk, 'l:' .. idx) or 0, id .. ':' .. idx)
    end
  else
    redis.call('SREM', ak, id)
    for _, idx in ipairs(open) do redis.call('ZREM', ck, id .. ':' .. idx) end
  end
end
return 1
";

/// `ARGV`: prefix, id. Returns 1 deleted, 0 no such job.
const DELETE_JOB: &str = r"
local p, id = ARGV[1], ARGV[2]
local jk = p .. 'job:' .. id
local client = redis.call('HGET', jk, 'client')
if not client then return 0 end
redis.call('SREM', p .. 'active:' .. client, id)
redis.call('SREM', p .. 'jobs', id)
local ck = p .. 'claimable'
for _, idx in ipairs(redis.call('SMEMBERS', p .. 'open:' .. id)) do
  redis.call('ZREM', ck, id .. ':' .. idx)
end
redis.call('DEL', jk, p .. 'units:' .. id, p .. 'open:' .. id, p .. 'poll:' .. id,
  p .. 'members:' .. id)
return 1
";

/// `ARGV`: prefix, worker, now, lease_until. Returns the claimed unit's JSON body, or nil.
const CLAIM_UNIT: &str = r"
local p, worker, lease = ARGV[1], ARGV[2], ARGV[4]
local ck = p .. 'claimable'
-- Every turn removes or claims one member, so stale members (none by construction) cannot
-- stall a claim; the bound keeps one call short whatever happens.
for _ = 1, 64 do
  local m = redis.call('ZRANGEBYSCORE', ck, '-inf', '(' .. ARGV[3], 'LIMIT', 0, 1)[1]
  if not m then return false end
  local id, idx = string.match(m, '^(.*):(%d+)$')
  if id and redis.call('SISMEMBER', p .. 'open:' .. id, idx) == 1 then
    local uk = p .. 'units:' .. id
    local body = redis.call('HGET', uk, 'b:' .. idx)
    if body then
      redis.call('HSET', uk, 'o:' .. idx, worker, 'l:' .. idx, lease)
      redis.call('ZADD', ck, lease, m)
      return body
    end
  end
  redis.call('ZREM', ck, m)
end
return false
";

/// `ARGV`: prefix, id, index, worker, body, lease, finished (`1`/`0`), mode (`save`/`finish`).
/// Returns the job's unfinished count, or -1 when `worker` does not hold the lease.
const SAVE_UNIT: &str = r"
local p, id, idx, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local uk, ok = p .. 'units:' .. id, p .. 'open:' .. id
if redis.call('HGET', uk, 'o:' .. idx) ~= worker then return -1 end
if redis.call('SISMEMBER', ok, idx) == 0 then
  -- Finished already: a retried finish (its first answer lost) gets the count again; a save
  -- after the finish has no lease left.
  if ARGV[8] == 'finish' then return redis.call('SCARD', ok) end
  return -1
end
redis.call('HSET', uk, 'b:' .. idx, ARGV[5], 'l:' .. idx, ARGV[6])
local ck, m = p .. 'claimable', id .. ':' .. idx
if ARGV[7] == '1' then
  redis.call('SREM', ok, idx)
  redis.call('ZREM', ck, m)
else
  -- XX: re-key only; a unit of a job that left Running stays unclaimable.
  redis.call('ZADD', ck, 'XX', ARGV[6], m)
end
return redis.call('SCARD', ok)
";

/// `ARGV`: prefix, id, index, worker. Returns 1 released, 0 not held by `worker`.
const RELEASE_UNIT: &str = r"
local p, id, idx, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local uk = p .. 'units:' .. id
if redis.call('HGET', uk, 'o:' .. idx) ~= worker then return 0 end
if redis.call('SISMEMBER', p .. 'open:' .. id, idx) == 0 then return 0 end
redis.call('HDEL', uk, 'o:' .. idx)
redis.call('HSET', uk, 'l:' .. idx, 0)
redis.call('ZADD', p .. 'claimable', 'XX', 0, id .. ':' .. idx)
return 1
";

/// `KEYS[1]` the poll key; `ARGV`: now_ms, min_interval_ms. Returns 1 accepted, 0 too soon.
/// Times come from the caller (as in the embedded store); the key's TTL only cleans up.
const RECORD_POLL: &str = r"
local last = redis.call('GET', KEYS[1])
if last and tonumber(ARGV[1]) - tonumber(last) < tonumber(ARGV[2]) then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
";

/// `KEYS[1]` the jti key; `ARGV`: now, expires_at, ttl seconds. Returns 1 first use, 0 replay.
const FIRST_USE: &str = r"
local seen = redis.call('GET', KEYS[1])
if seen and tonumber(seen) > tonumber(ARGV[1]) then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
";

/// `KEYS[1]` the slots sorted set (holder → expiry ms); `ARGV`: holder, now_ms, expires_ms, max.
/// Returns 1 when the holder has a slot, 0 when all `max` are taken by live holders.
const ACQUIRE_SLOT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
";

struct Scripts {
    create_job: Script,
    put_job: Script,
    delete_job: Script,
    claim_unit: Script,
    save_unit: Script,
    release_unit: Script,
    claim_finalize: Script,
    extend_finalize: Script,
    complete_job: Script,
    first_poll: Script,
    record_poll: Script,
    first_use: Script,
    acquire_slot: Script,
}

/// The Redis job store. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
    }
}

/// A unit as stored: its JSON body overridden by the fields the scripts own.
fn overlay(body: &str, owner: Option<String>, lease_until: UnixSecs) -> Result<Unit, StoreError> {
    let mut unit: Unit = decode(body)?;
    unit.owner = owner;
    unit.lease_until = lease_until;
    if !unit.is_finished() {
        unit.state = if unit.owner.is_some() {
            UnitState::Running
        } else {
            UnitState::Pending
        };
    }
    Ok(unit)
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) with keys prefixed `fbp:`. Fails with
    /// [`StoreError::Unavailable`] when Redis does not answer within a few seconds.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_prefix(url, DEFAULT_PREFIX).await
    }

    /// Like [`RedisStore::connect`], with another key prefix (several deployments, one Redis).
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url)?;
        Self::connect_client(client, &redacted(url), prefix).await
    }

    /// Connects as `[store]` says: `store.redis_url` (`redis://` or `rediss://`, the user and
    /// password in it if any), `store.redis_password` and, for TLS, `store.redis_ca_file` as the
    /// only trusted roots (otherwise the system's). TLS always verifies the server's certificate
    /// and name. A wrong password or an untrusted certificate fails here, with Redis' or rustls'
    /// reason; the password never appears in an error.
    pub async fn connect_configured(config: &StoreConfig) -> Result<Self, StoreError> {
        let url = config.redis_url.as_ref().map_or("", |url| url.expose());
        let shown = redacted(url);
        let mut info = url.into_connection_info()?;
        if let Some(password) = &config.redis_password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &config.redis_ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot read store.redis_ca_file {}: {e}",
                        path.display()
                    ))
                })?;
                ::redis::Client::build_with_tls(
                    info,
                    ::redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )?
            }
            None => ::redis::Client::open(info)?,
        };
        Self::connect_client(client, &shown, DEFAULT_PREFIX).await
    }

    async fn connect_client(
        client: ::redis::Client,
        shown: &str,
        prefix: &str,
    ) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            // Few, short reconnect attempts: callers retry on 503 anyway, and a long backoff
            // here would keep a recovered Redis unused.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let conn = tokio::time::timeout(
            TIMEOUT * 3,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("no answer from Redis at {shown}")))?
        .map_err(|e| StoreError::Unavailable(format!("{shown}: {}", describe(&e))))?;
        // A Redis that wants a password nobody gave accepts the connection but no command: ask
        // one now, so that the proxy stops at start rather than failing every request.
        let _: String = ::redis::cmd("PING")
            .query_async(&mut conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("{shown}: {}", describe(&e))))?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            scripts: std::sync::Arc::new(Scripts {
                create_job: Script::new(CREATE_JOB),
                put_job: Script::new(PUT_JOB),
                delete_job: Script::new(DELETE_JOB),
                claim_unit: Script::new(CLAIM_UNIT),
                save_unit: Script::new(SAVE_UNIT),
                release_unit: Script::new(RELEASE_UNIT),
                claim_finalize: Script::new(CLAIM_FINALIZE),
                extend_finalize: Script::new(EXTEND_FINALIZE),
                complete_job: Script::new(COMPLETE_JOB),
                first_poll: Script::new(FIRST_POLL),
                record_poll: Script::new(RECORD_POLL),
                first_use: Script::new(FIRST_USE),
                acquire_slot: Script::new(ACQUIRE_SLOT),
            }),
        })
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        key.push_str(&parts.concat());
        key
    }

    /// Saves under `worker`'s lease; returns the unfinished count, or `None` if the lease is lost.
    async fn save(&self, unit: &Unit, worker: &str, mode: &str) -> Result<Option<u32>, StoreError> {
        let mut body = unit.clone();
        body.owner = Some(worker.to_owned());
        let left: i64 = self
            .scripts
            .save_unit
            .arg(&self.prefix)
            .arg(&unit.job_id)
            .arg(unit.index)
            .arg(worker)
            .arg(encode(&body)?)
            .arg(unit.lease_until)
            .arg(if unit.is_finished() { "1" } else { "0" })
            .arg(mode)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(u32::try_from(left).ok())
    }
}

#[async_trait]
impl JobStore for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = ::redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn create_job(
        &self,
        job: &Job,
        units: &[Unit],
        members: &[String],
        max_active_per_client: usize,
    ) -> Result<Created, StoreError> {
        let mut invocation = self.scripts.create_job.prepare_invoke();
        invocation
            .arg(&self.prefix)
            .arg(&job.id)
            .arg(&job.client_id)
            .arg(state_name(job.state))
            .arg(encode(job)?)
            .arg(max_active_per_client)
            .arg(if members.is_empty() {
                String::new()
            } else {
                encode(&members)?
            });
        for unit in units {
            invocation
                .arg(unit.index)
                .arg(encode(unit)?)
                .arg(unit.lease_until)
                .arg(unit.owner.as_deref().unwrap_or(""))
                .arg(if unit.is_finished() { "1" } else { "0" });
        }
        let created: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        match created {
            1 => Ok(Created::Yes),
            0 => Ok(Created::TooManyActive),
            // Ids are random UUIDs: a duplicate is a caller bug, and overwriting would orphan
            // the first job's units.
            _ => Err(StoreError::Corrupt(format!(
                "job {} already exists",
                job.id
            ))),
        }
    }

    async fn members(&self, job_id: &str) -> Result<Vec<String>, StoreError> {
        let json: Option<String> = self
            .conn
            .clone()
            .get(self.key(&["members:", job_id]))
            .await?;
        json.as_deref().map_or(Ok(Vec::new()), decode)
    }

    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let json: Option<String> = self
            .conn
            .clone()
            .hget(self.key(&["job:", id]), "json")
            .await?;
        json.as_deref().map(decode).transpose()
    }

    async fn put_job(&self, job: &Job) -> Result<bool, StoreError> {
        let replaced: i64 = self
            .scripts
            .put_job
            .arg(&self.prefix)
            .arg(&job.id)
            .arg(state_name(job.state))
            .arg(encode(job)?)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(replaced == 1)
    }

    async fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        let deleted: i64 = self
            .scripts
            .delete_job
            .arg(&self.prefix)
            .arg(id)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(deleted == 1)
    }

    async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.conn.clone().smembers(self.key(&["jobs"])).await?)
    }

    async fn units(&self, job_id: &str) -> Result<Vec<Unit>, StoreError> {
        let fields: Vec<(String, String)> = self
            .conn
            .clone()
            .hgetall(self.key(&["units:", job_id]))
            .await?;
        // index → (body, owner, lease); a BTreeMap yields them in index order.
        let mut parts: BTreeMap<u32, (Option<String>, Option<String>, UnixSecs)> = BTreeMap::new();
        for (field, value) in fields {
            let Some((kind, index)) = field.split_once(':') else {
                continue;
            };
            let Ok(index) = index.parse::<u32>() else {
                return Err(StoreError::Corrupt(format!(
                    "unit field {field} of job {job_id}"
                )));
            };
            let entry = parts.entry(index).or_default();
            match kind {
                "b" => entry.0 = Some(value),
                "o" => entry.1 = Some(value),
                "l" => entry.2 = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        parts
            .into_iter()
            .map(|(index, (body, owner, lease))| {
                let body = body.ok_or_else(|| {
                    StoreError::Corrupt(format!("unit {job_id}/{index} has no record"))
                })?;
                overlay(&body, owner, lease)
            })
            .collect()
    }

    async fn claim_unit(
        &self,
        worker: &str,
        now: UnixSecs,
        lease_until: UnixSecs,
    ) -> Result<Option<Unit>, StoreError> {
        let body: Option<String> = self
            .scripts
            .claim_unit
            .arg(&self.prefix)
            .arg(worker)
            .arg(now)
            .arg(lease_until)
            .invoke_async(&mut self.conn.clone())
            .await?;
        body.map(|body| overlay(&body, Some(worker.to_owned()), lease_until))
            .transpose()
    }

    async fn save_unit(&self, unit: &Unit, worker: &str) -> Result<bool, StoreError> {
        Ok(self.save(unit, worker, "save").await?.is_some())
    }

    async fn finish_unit(&self, unit: &Unit, worker: &str) -> Result<Option<u32>, StoreError> {
        self.save(unit, worker, "finish").await
    }

    async fn release_unit(&self, unit: &Unit, worker: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .scripts
            .release_unit
            .arg(&self.prefix)
            .arg(&unit.job_id)
            .arg(unit.index)
            .arg(worker)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn claim_finalize(
        &self,
        job_id: &str,
        finisher: &str,
        now: UnixSecs,
        lease_until: UnixSecs,
    ) -> Result<Option<u32>, StoreError> {
        let attempt: i64 = self
            .scripts
            .claim_finalize
            .arg(&self.prefix)
            .arg(job_id)
            .arg(finisher)
            .arg(now)
            .arg(lease_until)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(u32::try_from(attempt).ok().filter(|&a| a > 0))
    }

    async fn extend_finalize(
        &self,
        job_id: &str,
        finisher: &str,
        lease_until: UnixSecs,
    ) -> Result<bool, StoreError> {
        let extended: i64 = self
            .scripts
            .extend_finalize
            .arg(&self.prefix)
            .arg(job_id)
            .arg(finisher)
            .arg(lease_until)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(extended == 1)
    }

    async fn complete_job(&self, job: &Job, finisher: &str) -> Result<bool, StoreError> {
        let committed: i64 = self
            .scripts
            .complete_job
            .arg(&self.prefix)
            .arg(&job.id)
            .arg(finisher)
            .arg(state_name(job.state))
            .arg(encode(job)?)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(committed == 1)
    }

    async fn first_poll(&self, job_id: &str) -> Result<bool, StoreError> {
        let first: i64 = self
            .scripts
            .first_poll
            .key(self.key(&["job:", job_id]))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(first == 1)
    }

    async fn record_poll(
        &self,
        job_id: &str,
        now_ms: u64,
        min_interval_ms: u64,
    ) -> Result<bool, StoreError> {
        let accepted: i64 = self
            .scripts
            .record_poll
            .key(self.key(&["poll:", job_id]))
            .arg(now_ms)
            .arg(min_interval_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(accepted == 1)
    }

    async fn first_use(
        &self,
        issuer: &str,
        jti: &str,
        now: UnixSecs,
        expires_at: UnixSecs,
    ) -> Result<bool, StoreError> {
        // The issuer's length keeps `iss`/`jti` pairs apart whatever characters they contain.
        let key = self.key(&["jti:", &issuer.len().to_string(), ":", issuer, ":", jti]);
        let first: i64 = self
            .scripts
            .first_use
            .key(key)
            .arg(now)
            .arg(expires_at)
            .arg(expires_at.saturating_sub(now))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(first == 1)
    }

    async fn acquire_slot(
        &self,
        holder: &str,
        now_ms: u64,
        expires_ms: u64,
        max: usize,
    ) -> Result<bool, StoreError> {
        let granted: i64 = self
            .scripts
            .acquire_slot
            .key(self.key(&["upstream-slots"]))
            .arg(holder)
            .arg(now_ms)
            .arg(expires_ms)
            .arg(max)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(granted == 1)
    }

    async fn release_slot(&self, holder: &str) -> Result<(), StoreError> {
        let _: i64 = ::redis::cmd("ZREM")
            .arg(self.key(&["upstream-slots"]))
            .arg(holder)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
