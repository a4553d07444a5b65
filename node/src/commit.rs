//! Group commit of the changes that must reach replicas
//! (`replica_acks`): the changes waiting when a connection is free go out
//! together, followed by one `WAIT` for all of them, in one pipeline.
//!
//! `WAIT` blocks the connection it is sent on until the replicas hold
//! every write that connection made, so changes that wait for replicas
//! cannot share a connection one by one (each would wait behind the
//! last's `WAIT`). Instead each of [`LINKS`] connections has a task that
//! takes every change queued for it, sends them and one `WAIT`, and
//! answers each with its own reply, or with `NotReplicated` if fewer
//! replicas than asked acknowledged in time. A batch costs one round trip
//! and one replication acknowledgement, however many changes it holds.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::{Cmd, FromRedisValue, RedisError, Value};
use tokio::sync::{mpsc, oneshot};

use crate::link::{Link, Redis, never_ran};
use crate::store::StoreError;

/// Connections, each with its batch in flight.
pub const LINKS: usize = 4;
/// The most changes in one batch.
const MAX_BATCH: usize = 64;
/// The most changes waiting for one connection; past it a change is
/// refused, unsent, rather than queued behind a Redis that does not
/// answer.
const MAX_QUEUED: usize = 1024;

/// One change and where its answer goes.
struct Job {
    cmd: Cmd,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

/// The connections and their tasks, started on the first change (in the
/// runtime that makes it).
pub struct Committer {
    links: std::sync::Mutex<Vec<Link>>,
    queues: OnceLock<Vec<mpsc::Sender<Job>>>,
    next: AtomicUsize,
    replica_acks: u32,
    timeout: Duration,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("replica_acks", &self.replica_acks)
            .finish_non_exhaustive()
    }
}

impl Committer {
    /// Changes to `redis` that wait for `replica_acks` replicas, each for
    /// up to `timeout`.
    pub fn new(redis: &Redis, replica_acks: u32, timeout: Duration) -> Result<Self, RedisError> {
        let links = (0..LINKS)
            .map(|_| redis.link())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            links: std::sync::Mutex::new(links),
            queues: OnceLock::new(),
            next: AtomicUsize::new(0),
            replica_acks,
            timeout,
        })
    }

    /// Runs `cmd` in the next batch of one of the connections: its reply
    /// once the replicas acknowledged it.
    pub async fn commit(&self, cmd: Cmd) -> Result<Value, StoreError> {
        let queues = self.queues.get_or_init(|| self.start());
        let queue = &queues[self.next.fetch_add(1, Ordering::Relaxed) % queues.len()];
        let (reply, answer) = oneshot::channel();
        if queue.try_send(Job { cmd, reply }).is_err() {
            return Err(StoreError::Busy);
        }
        // The batch has its own bound; this one covers a batch queued
        // behind another.
        let limit = self.timeout * 4;
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(lost()),
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    fn start(&self) -> Vec<mpsc::Sender<Job>> {
        let links = std::mem::take(&mut *self.links.lock().expect("not poisoned"));
        links
            .into_iter()
            .map(|link| {
                let (queue, jobs) = mpsc::channel(MAX_QUEUED);
                tokio::spawn(batches(link, jobs, self.replica_acks, self.timeout));
                queue
            })
            .collect()
    }
}

/// The answer of a change whose batch was dropped: it may have run.
fn lost() -> StoreError {
    StoreError::Redis(RedisError::from((
        redis::ErrorKind::Io,
        "the batch of this change ended without an answer",
    )))
}

/// One connection's task: a batch of every change queued, then the next.
async fn batches(
    mut link: Link,
    mut jobs: mpsc::Receiver<Job>,
    replica_acks: u32,
    timeout: Duration,
) {
    let mut batch: Vec<oneshot::Sender<Result<Value, StoreError>>> = Vec::new();
    while let Some(first) = jobs.recv().await {
        let mut pipe = redis::pipe();
        // Each change's error is its own.
        pipe.ignore_errors();
        let mut job = Some(first);
        while let Some(Job { cmd, reply }) = job {
            // A change whose caller stopped waiting (and answered "outcome
            // unknown") is not sent late.
            if !reply.is_closed() {
                pipe.add_command(cmd);
                batch.push(reply);
            }
            job = if batch.len() < MAX_BATCH {
                jobs.try_recv().ok()
            } else {
                None
            };
        }
        if batch.is_empty() {
            continue;
        }
        // WAIT 0 would wait for ever.
        pipe.cmd("WAIT")
            .arg(replica_acks)
            .arg(timeout.as_millis().max(1) as u64);
        let sent = tokio::time::timeout(timeout * 2, pipe.query_async::<Vec<Value>>(&mut link));
        match sent.await {
            Ok(Ok(mut replies)) if replies.len() == batch.len() + 1 => {
                let acked = replies
                    .pop()
                    .and_then(|acked| u64::from_redis_value(acked).ok())
                    .unwrap_or(0);
                for (reply, value) in batch.drain(..).zip(replies) {
                    let answer = match value {
                        Value::ServerError(err) => Err(StoreError::Redis(err.into())),
                        _ if acked < u64::from(replica_acks) => Err(StoreError::NotReplicated {
                            acked,
                            wanted: replica_acks,
                        }),
                        value => Ok(value),
                    };
                    let _ = reply.send(answer);
                }
            }
            Ok(Ok(_)) => {
                let err = RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "a batch answered with the wrong number of replies",
                ));
                for reply in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Redis(err.clone())));
                }
            }
            Ok(Err(err)) => {
                // The connection failed, or (in a cluster, whose client
                // turns a redirection of any change into an error of the
                // whole pipeline) one change was refused: the others may
                // have run, so only a batch of one keeps an error that says
                // it did not.
                let err = if batch.len() > 1 && never_ran(&err) {
                    RedisError::from((
                        redis::ErrorKind::Io,
                        "a batch of changes failed part way",
                        err.to_string(),
                    ))
                } else {
                    err
                };
                for reply in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Redis(err.clone())));
                }
            }
            Err(_) => {
                link.suspect();
                for reply in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Timeout(timeout * 2)));
                }
            }
        }
    }
}
