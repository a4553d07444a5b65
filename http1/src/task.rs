//! What every binary's background work shares: the shutdown signal, and
//! tasks that cannot die silently.

use std::any::Any;
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a background task that panicked waits before it runs again,
/// so that a task failing at once on every start does not spin.
pub const RESTART_AFTER: Duration = Duration::from_secs(1);

/// A token cancelled on the first SIGTERM or Ctrl-C (SIGINT): the shutdown
/// signal of a binary.
pub fn shutdown_on_signal() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

/// Runs the background task that `start` makes (a health check, the watch
/// on a file, a sync with Redis) until it returns or `shutdown`. A task
/// that panics is logged, with `name` and its message, and started again
/// after [`RESTART_AFTER`]: no background task dies silently.
pub fn supervise<F, Fut>(
    name: &'static str,
    shutdown: CancellationToken,
    mut start: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let run = tokio::spawn(start());
            let panic = match run.await {
                Ok(()) => return,
                Err(err) if err.is_panic() => err.into_panic(),
                // The runtime is shutting down.
                Err(_) => return,
            };
            tracing::error!(
                task = name,
                panic = panic_message(&*panic),
                "a background task panicked; starting it again"
            );
            tokio::select! {
                _ = tokio::time::sleep(RESTART_AFTER) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    })
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a message)")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_runs_again_and_one_that_returns_is_done() {
        let runs = Arc::new(AtomicU32::new(0));
        let supervisor = supervise("test", CancellationToken::new(), {
            let runs = Arc::clone(&runs);
            move || {
                let run = runs.fetch_add(1, Ordering::Relaxed);
                async move {
                    if run < 2 {
                        panic!("run {run} fails");
                    }
                }
            }
        });
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_task_that_keeps_failing() {
        let shutdown = CancellationToken::new();
        let supervisor = supervise("test", shutdown.clone(), || async { panic!("always") });
        tokio::time::sleep(RESTART_AFTER * 3 / 2).await;
        shutdown.cancel();
        supervisor.await.unwrap();
    }
}
