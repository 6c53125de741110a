//! Where transforms run: the blocking thread pool, at most `[transform] max_concurrent` at once.
//! A transform takes its turn before its source is fetched (admission before work: a queued
//! transform holds no source bytes), and waits at most `[transform] queue_timeout` for it (and,
//! holding it, as long again for room in the fill pool: `render.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::TransformConfig;
use crate::error::ProxyError;

/// The pool: its turns and how they are used.
#[derive(Clone)]
pub(crate) struct Pool {
    turns: Arc<Semaphore>,
    size: usize,
    queue_timeout: Duration,
    stats: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    waiting: AtomicUsize,
    running: AtomicUsize,
}

/// The pool's state, for `/health` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct PoolStats {
    /// Transforms that may run at once.
    pub turns: usize,
    /// Transforms waiting for a turn.
    pub waiting: usize,
    /// Transforms holding a turn (fetching their source or running).
    pub running: usize,
}

/// A turn of the pool, held from before the source is fetched to the end of the transform.
pub(crate) struct Turn {
    _permit: OwnedSemaphorePermit,
    stats: Arc<Counts>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.stats.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// A pool of `config.max_concurrent` turns (0: the number of cores).
    pub(crate) fn new(config: &TransformConfig) -> Self {
        let size = if config.max_concurrent == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.max_concurrent
        };
        Pool {
            turns: Arc::new(Semaphore::new(size)),
            size,
            queue_timeout: config.queue_timeout,
            stats: Arc::default(),
        }
    }

    /// Waits for a turn.
    ///
    /// # Errors
    /// [`ProxyError::Overloaded`] when none came within `queue_timeout`.
    pub(crate) async fn turn(&self) -> Result<Turn, ProxyError> {
        self.stats.waiting.fetch_add(1, Ordering::AcqRel);
        let permit =
            tokio::time::timeout(self.queue_timeout, self.turns.clone().acquire_owned()).await;
        self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
        let permit = permit
            .map_err(|_| ProxyError::Overloaded)?
            .map_err(|_| ProxyError::Overloaded)?;
        self.stats.running.fetch_add(1, Ordering::AcqRel);
        Ok(Turn {
            _permit: permit,
            stats: self.stats.clone(),
        })
    }

    /// Runs `work` on a blocking thread, holding `turn` until it is done (also when the caller
    /// stops waiting for it: the turn is given back when the work ends, not before).
    ///
    /// # Errors
    /// [`ProxyError::Upstream`] when the task panicked.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        turn: Turn,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ProxyError> {
        let done = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            work()
        })
        .await;
        done.map_err(|e| ProxyError::Upstream(format!("transform task failed: {e}")))
    }

    /// How long a transform may wait to start: for its turn, and again for memory.
    pub(crate) fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// How the pool is used now.
    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            turns: self.size,
            waiting: self.stats.waiting.load(Ordering::Acquire),
            running: self.stats.running.load(Ordering::Acquire),
        }
    }
}
