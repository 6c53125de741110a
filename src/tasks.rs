//! [`Tasks`]: the one owner of every task imgedge starts — the pressure monitor, relief, the tier
//! writers and reads, shared fills, background refreshes, client connections and the upstream
//! clients' connections — so that all of them end when `serve` returns.
//!
//! A task spawned here runs until it completes or until [`Tasks::shutdown`], which cancels it at
//! its next `.await` and waits for it to be gone. Nothing else in imgedge calls `tokio::spawn`.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns and owns background tasks. Cheap to clone: every clone spawns into the same set.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tasks {
    /// Counts the tasks still running, so that shutdown can wait for the last one.
    tracker: TaskTracker,
    /// Cancelled at shutdown: every task is raced against it.
    stop: CancellationToken,
}

impl Tasks {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` on the current runtime. The handle yields `Some(output)`, or `None` when
    /// the task was cancelled by [`Tasks::shutdown`] (a task spawned after it never runs). A
    /// panic inside `task` is the handle's `JoinError`, as with `tokio::spawn`.
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker
            .spawn(self.stop.clone().run_until_cancelled_owned(task))
    }

    /// Cancels every task and waits until all of them have ended.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Tasks still running.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.tracker.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// hyper's executor: the HTTP/2 streams of client connections and the upstream clients'
/// connection and pool tasks are spawned here too.
impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawn(future);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_running_tasks_and_waits_for_them() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Holds `tx` until it is dropped: cancelled, since it would otherwise never end.
        let forever = tasks.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        let done = tasks.spawn(async { 7 });
        assert_eq!(done.await.unwrap(), Some(7));
        assert_eq!(tasks.len(), 1);
        tasks.shutdown().await;
        assert!(tasks.is_empty());
        assert!(rx.await.is_err(), "the cancelled task's future was dropped");
        assert_eq!(forever.await.unwrap(), None);
        // After shutdown nothing new runs.
        assert_eq!(tasks.spawn(async { 1 }).await.unwrap(), None);
    }
}
