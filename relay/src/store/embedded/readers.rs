//! Inbox pages, read on threads of their own.
//!
//! Every connect reads its first inbox page, and a replay reads one per 128 messages. On
//! Tokio's blocking pool (16 threads, shared with long work: backups, expiry passes, reports)
//! each read woke an idle thread and put it back to sleep, two context switches per connect,
//! and a few long tasks could hold up every connect behind them. A thread per core taking reads
//! from one queue stays busy through a connect storm (the next read is waiting when it finishes
//! one) and waits for nothing but reads.

use std::future::Future;
use std::panic::AssertUnwindSafe;

type Job = Box<dyn FnOnce() + Send>;

/// The reader threads' queue; they stop when it is dropped (with the store).
pub(super) struct Readers {
    jobs: flume::Sender<Job>,
}

impl Readers {
    /// Starts one reader thread per core, at least two (one slow disk read never stalls all).
    pub(super) fn start() -> std::io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let (jobs, queue) = flume::unbounded::<Job>();
        for _ in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("store-reader".into())
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                })?;
        }
        Ok(Readers { jobs })
    }

    /// Runs `read` on a reader thread; `None` if it panicked (the thread goes on).
    pub(super) fn run<T, F>(&self, read: F) -> impl Future<Output = Option<T>> + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if let Ok(value) = std::panic::catch_unwind(AssertUnwindSafe(read)) {
                let _ = tx.send(value);
            }
        });
        // Sending fails only once every reader is gone; the dropped job then answers `None`.
        let _ = self.jobs.send(job);
        async move { rx.await.ok() }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::*;
    use crate::ids::DeviceRef;

    #[test]
    fn a_page_read_is_not_held_up_by_long_work_on_the_blocking_pool() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("dir");
            let store = super::super::open_for_tests(dir.path());
            // Every blocking thread busy with long work (a backup, an expiry pass).
            let gate = Arc::new(Barrier::new(3));
            for _ in 0..2 {
                let gate = gate.clone();
                tokio::task::spawn_blocking(move || gate.wait());
            }
            let page = tokio::time::timeout(
                Duration::from_secs(5),
                store.inbox_page(DeviceRef::new("u", "d"), 0, 10, 1 << 20),
            )
            .await;
            std::thread::spawn(move || gate.wait());
            assert!(
                matches!(page, Ok(Ok(ref p)) if p.is_empty()),
                "the page read waited for the blocking pool: {page:?}"
            );
        });
    }

    #[tokio::test]
    async fn a_read_that_panics_answers_none_and_its_thread_reads_on() {
        let readers = Readers::start().expect("start");
        assert_eq!(readers.run(|| -> u8 { panic!("a bad row") }).await, None);
        for i in 0..16u8 {
            assert_eq!(readers.run(move || i).await, Some(i));
        }
    }
}
