//! The queue: a sale's order stream read through a Redis consumer group.
//!
//! Each order service is a consumer of the group: `XREADGROUP` hands each
//! new event to one of them, and the event stays in the group's pending
//! list until its reader acknowledges it (`XACK`), which the service does
//! only after the database has committed it. What a dead consumer read and
//! never acknowledged is taken over by another after `claim_idle`
//! (`XAUTOCLAIM`), or read again by the same consumer when it restarts
//! under its name. An entry that is not an event is parked in the dead
//! letter stream (`spike:{EVENT}:orders:dead`) with the reason, then
//! acknowledged. The stream is trimmed below the first entry some group
//! has not acknowledged, never further, and only while this service's own
//! group exists, in one script (`TRIM_SCRIPT`) so that no group can be
//! created or read in between.

/// Trims the stream (KEYS[1]) below the first entry that some consumer
/// group has not acknowledged: its first pending entry, or the one after
/// the last it was delivered. Trims nothing unless the group ARGV[1]
/// exists. Returns the entries removed.
const TRIM_SCRIPT: &str = r"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local own, bound_ms, bound_seq = false, nil, nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #group, 2 do
    fields[group[i]] = group[i + 1]
  end
  if fields['name'] == ARGV[1] then
    own = true
  end
  local ms, seq
  if tonumber(fields['pending']) > 0 then
    ms, seq = parse(redis.call('XPENDING', KEYS[1], fields['name'])[2])
  else
    ms, seq = parse(fields['last-delivered-id'])
    seq = seq + 1
  end
  if not bound_ms or ms < bound_ms or (ms == bound_ms and seq < bound_seq) then
    bound_ms, bound_seq = ms, seq
  end
end
if not own then
  return 0
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', bound_ms, bound_seq))
";

use std::collections::HashMap;
use std::time::Duration;

use node::link::{Link, Redis};
use redis::{RedisError, Value};
use spike_config::redis::RedisTarget;

use crate::event::is_entry_id;

/// The most entries `lag` counts itself when Redis cannot tell.
const LAG_COUNTED: u64 = 10_000;

/// An entry as read: its id, and its fields as bytes (`None` if it was
/// deleted after being delivered).
pub type Entry = (String, Option<Vec<(Vec<u8>, Vec<u8>)>>);

/// A handle on the order stream of one sale, for one consumer of one group.
#[derive(Clone)]
pub struct Stream {
    conn: Link,
    /// For reads that block until entries come: Redis answers nothing
    /// else on a connection while one waits.
    blocking: Link,
    trim: redis::Script,
    pub key: String,
    pub dead: String,
    /// The sale's stock hash, where `replicated` counts what it confirms.
    stock: String,
    pub group: String,
    pub consumer: String,
    timeout: Duration,
    read_wait: Duration,
    replica_acks: u32,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("only {acked} of {wanted} replicas hold the events read")]
    NotReplicated { acked: u64, wanted: u32 },
}

/// Where the group stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Lag {
    /// Events not in the database yet: read and not acknowledged, and not
    /// read yet.
    pub events: u64,
    /// How long the oldest of them has waited (ms), 0 if none.
    pub oldest_ms: u64,
    /// Entries in the stream.
    pub stream: u64,
}

impl Stream {
    /// The order stream of `event` in `redis`, read as `consumer` of `group`.
    /// Connects on first use. A blocking read may wait `read_wait` on top
    /// of `timeout`, on a connection of its own. With `replica_acks`, a
    /// read returns its entries only once that many replicas hold them.
    pub fn new(
        redis: &RedisTarget,
        event: &str,
        group: &str,
        consumer: &str,
        (timeout, read_wait): (Duration, Duration),
        replica_acks: u32,
    ) -> Result<Self, RedisError> {
        // One Redis, so that both links follow the same master.
        let redis = Redis::new(redis, timeout, read_wait + timeout)?;
        let (conn, blocking) = (redis.link()?, redis.link()?);
        let key = format!("spike:{{{event}}}:orders");
        Ok(Self {
            conn,
            blocking,
            trim: redis::Script::new(TRIM_SCRIPT),
            dead: format!("{key}:dead"),
            stock: format!("spike:{{{event}}}:stock"),
            key,
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            timeout,
            read_wait,
            replica_acks,
        })
    }

    /// Creates the group, reading the stream from its first entry, unless
    /// it exists.
    pub async fn join(&self) -> Result<(), StreamError> {
        let created: Result<(), StreamError> = self
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&self.key)
                    .arg(&self.group)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match created {
            Err(StreamError::Redis(err)) if err.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Up to `count` entries this consumer read before and did not
    /// acknowledge, from the first.
    pub async fn read_own(&self, count: u64) -> Result<Vec<Entry>, StreamError> {
        self.read_group(count, None, "0").await
    }

    /// Up to `count` entries no consumer of the group has read, waiting up
    /// to `wait` for the first.
    pub async fn read_new(&self, count: u64, wait: Duration) -> Result<Vec<Entry>, StreamError> {
        self.read_group(count, Some(wait), ">").await
    }

    async fn read_group(
        &self,
        count: u64,
        wait: Option<Duration>,
        from: &str,
    ) -> Result<Vec<Entry>, StreamError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(wait) = wait {
            cmd.arg("BLOCK").arg(wait.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.key).arg(from);
        let reply: Option<Vec<(String, Vec<Entry>)>> = match wait {
            Some(_) => self.read(&cmd, &self.blocking, self.read_wait).await?,
            None => self.read(&cmd, &self.conn, Duration::ZERO).await?,
        };
        Ok(reply
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .collect())
    }

    /// Takes over up to `count` entries other consumers read and left
    /// unacknowledged for `min_idle`, scanning the pending list from
    /// `cursor`; returns them and where the next scan starts (`0-0` once
    /// the whole list has been scanned).
    pub async fn claim(
        &self,
        min_idle: Duration,
        cursor: &str,
        count: u64,
    ) -> Result<(Vec<Entry>, String), StreamError> {
        let (next, entries, _deleted): (String, Vec<Entry>, Vec<String>) = self
            .read(
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.key)
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(min_idle.as_millis() as u64)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(count),
                &self.conn,
                Duration::ZERO,
            )
            .await?;
        Ok((entries, next))
    }

    /// Runs the read `cmd` on `link`, which may wait `wait` in Redis.
    /// With `replica_acks`, in the same pipeline, on the same connection:
    /// one write (a count, `confirmed`, in the sale's stock hash; its
    /// offset in the replication stream is past everything the read saw)
    /// and `WAIT` for it, for up to half the timeout; the reply only if
    /// enough replicas acknowledged.
    async fn read<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        link: &Link,
        wait: Duration,
    ) -> Result<T, StreamError> {
        let mut conn = link.clone();
        let limit = self.timeout + wait;
        if self.replica_acks == 0 {
            return tokio::time::timeout(limit, cmd.query_async(&mut conn))
                .await
                .map_err(|_| StreamError::Timeout(limit))?
                .map_err(StreamError::from);
        }
        let confirm = self.timeout / 2;
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone())
            .hincr(&self.stock, "confirmed", 1)
            .ignore()
            .cmd("WAIT")
            .arg(self.replica_acks)
            .arg(confirm.as_millis().max(1) as u64);
        let limit = limit + confirm;
        let (reply, acked): (T, u64) = tokio::time::timeout(limit, pipe.query_async(&mut conn))
            .await
            .map_err(|_| StreamError::Timeout(limit))??;
        if acked < u64::from(self.replica_acks) {
            return Err(StreamError::NotReplicated {
                acked,
                wanted: self.replica_acks,
            });
        }
        Ok(reply)
    }

    /// Acknowledges `ids`: they are in the database.
    pub async fn ack(&self, ids: &[&str]) -> Result<(), StreamError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: u64 = self
            .query(redis::cmd("XACK").arg(&self.key).arg(&self.group).arg(ids))
            .await?;
        Ok(())
    }

    /// Parks entry `id` in the dead letter stream with `reason` and its
    /// fields, then acknowledges it: only once it is parked (should the
    /// acknowledgement fail, the entry is read and parked again).
    pub async fn park(
        &self,
        id: &str,
        fields: Option<&[(Vec<u8>, Vec<u8>)]>,
        reason: &str,
    ) -> Result<(), StreamError> {
        let mut add = redis::cmd("XADD");
        add.arg(&self.dead)
            .arg("*")
            .arg("entry")
            .arg(id)
            .arg("group")
            .arg(&self.group)
            .arg("reason")
            .arg(reason);
        for (field, value) in fields.unwrap_or_default() {
            add.arg(field).arg(value);
        }
        let _: String = self.query(&add).await?;
        self.ack(&[id]).await
    }

    /// The group's lag, by Redis's clock.
    pub async fn lag(&self) -> Result<Lag, StreamError> {
        let (groups, length, (secs, micros)): (Vec<HashMap<String, Value>>, u64, (u64, u64)) = self
            .query_pipe(
                redis::pipe()
                    .cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&self.key)
                    .xlen(&self.key)
                    .cmd("TIME"),
            )
            .await?;
        let now = secs * 1000 + micros / 1000;
        let Some(group) = groups
            .iter()
            .find(|group| text(group.get("name")).as_deref() == Some(self.group.as_str()))
        else {
            // No group yet: nothing of the stream has been written.
            let oldest = self.first_after("0-0").await?;
            return Ok(Lag {
                events: length,
                oldest_ms: oldest.map_or(0, |id| now.saturating_sub(entry_ms(&id))),
                stream: length,
            });
        };
        let pending = number(group.get("pending")).unwrap_or(0);
        let last = text(group.get("last-delivered-id")).unwrap_or_else(|| "0-0".to_owned());
        // Redis counts the entries not delivered yet, unless it cannot
        // tell (entries deleted in the middle): then they are counted here,
        // up to a bound.
        let undelivered = match number(group.get("lag")) {
            Some(lag) => lag,
            None => self.after(&last, LAG_COUNTED).await?.len() as u64,
        };
        let oldest = match pending {
            0 => self.first_after(&last).await?,
            _ => self.first_pending().await?,
        };
        Ok(Lag {
            events: pending + undelivered,
            oldest_ms: oldest.map_or(0, |id| now.saturating_sub(entry_ms(&id))),
            stream: length,
        })
    }

    /// The id of the first entry after `id`.
    async fn first_after(&self, id: &str) -> Result<Option<String>, StreamError> {
        Ok(self.after(id, 1).await?.into_iter().next())
    }

    /// The ids of up to `count` entries after `id`.
    async fn after(&self, id: &str, count: u64) -> Result<Vec<String>, StreamError> {
        let entries: Vec<(String, Value)> = self
            .query(
                redis::cmd("XRANGE")
                    .arg(&self.key)
                    .arg(format!("({id}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        Ok(entries.into_iter().map(|(id, _)| id).collect())
    }

    /// The id of the group's first unacknowledged entry.
    async fn first_pending(&self) -> Result<Option<String>, StreamError> {
        let (_, first, _, _): (u64, Option<String>, Option<String>, Value) = self
            .query(redis::cmd("XPENDING").arg(&self.key).arg(&self.group))
            .await?;
        Ok(first)
    }

    /// Trims the stream below the first entry that some group of it has
    /// not acknowledged (nothing while this service's group does not
    /// exist); returns the entries removed.
    pub async fn trim(&self) -> Result<u64, StreamError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.trim.key(&self.key);
        invocation.arg(&self.group);
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(trimmed) => Ok(trimmed?),
            Err(_) => Err(StreamError::Timeout(self.timeout)),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StreamError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(StreamError::Timeout(self.timeout)),
        }
    }

    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StreamError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(StreamError::Timeout(self.timeout)),
        }
    }
}

fn text(value: Option<&Value>) -> Option<String> {
    value.and_then(|value| redis::from_redis_value_ref(value).ok())
}

fn number(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Nil => None,
        value => redis::from_redis_value_ref(value).ok(),
    }
}

/// An entry id's two numbers.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    if !is_entry_id(id) {
        return None;
    }
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// When entry `id` was added (ms since the epoch).
pub fn entry_ms(id: &str) -> u64 {
    parse_id(id).map_or(0, |(ms, _)| ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_give_their_time() {
        assert_eq!(parse_id("1796127866503-7"), Some((1796127866503, 7)));
        assert_eq!(entry_ms("1796127866503-7"), 1796127866503);
        assert_eq!(parse_id("x"), None);
    }
}
