//! The bounded queue and worker tasks between the relay and the providers.
//!
//! **Invariants:** [`Dispatcher::enqueue`] never blocks and never waits on a provider, so a push
//! outage cannot slow message acceptance or delivery. Non-urgent wake-ups are bounded: when
//! their queue is full the oldest one is dropped (and counted), since a newer wake-up for the
//! same device wakes it just as well. Urgent pages and logout signals are never dropped for
//! space; they are rare, and losing one is what the relay exists to prevent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::apns::Apns;
use crate::fcm::Fcm;
use crate::{DeviceToken, Outcome, Platform, Push, metric};

/// Longest `Retry-After` honoured; a provider asking for more is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Queue and retry settings.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Non-urgent wake-ups that may wait.
    pub capacity: usize,
    /// Worker tasks (pushes in flight at once).
    pub workers: usize,
    /// Tries per push, the first included.
    pub max_attempts: u32,
    /// First retry delay; doubles per try, with full jitter.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            capacity: 10_000,
            workers: 256,
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Called when a provider says a token is dead; the owner deletes it.
pub type OnTokenGone<O> = Arc<dyn Fn(&O, &DeviceToken) + Send + Sync>;

struct Job<O> {
    owner: O,
    target: DeviceToken,
    push: Push,
    attempt: u32,
}

impl<O> Job<O> {
    fn priority(&self) -> bool {
        match self.push {
            Push::Wake { urgent, .. } => urgent,
            Push::Logout { .. } => true,
        }
    }
}

fn kind(push: &Push) -> &'static str {
    match push {
        Push::Wake { urgent: false, .. } => "wake",
        Push::Wake { urgent: true, .. } => "urgent",
        Push::Logout { .. } => "logout",
    }
}

#[derive(Default)]
struct Queues<O> {
    priority: VecDeque<Job<O>>,
    normal: VecDeque<Job<O>>,
}

struct Inner<O> {
    queues: Mutex<Queues<O>>,
    ready: Notify,
    closed: AtomicBool,
    cfg: DispatcherConfig,
    apns: Option<Apns>,
    fcm: Option<Fcm>,
    on_gone: OnTokenGone<O>,
}

/// What happened to an enqueued push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Waiting for a worker.
    Queued,
    /// Not queued: no client is configured for the token's platform.
    NoProvider,
    /// Not queued: the dispatcher is closed.
    Closed,
}

/// Hands pushes to worker tasks. `O` identifies whose token a push goes to (the relay's device).
pub struct Dispatcher<O> {
    inner: Arc<Inner<O>>,
    workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl<O: Clone + Send + Sync + 'static> Dispatcher<O> {
    /// Starts `cfg.workers` workers on the current runtime.
    pub fn start(
        cfg: DispatcherConfig,
        apns: Option<Apns>,
        fcm: Option<Fcm>,
        on_gone: OnTokenGone<O>,
    ) -> Self {
        let inner = Arc::new(Inner {
            queues: Mutex::new(Queues {
                priority: VecDeque::new(),
                normal: VecDeque::new(),
            }),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            apns,
            fcm,
            on_gone,
            cfg,
        });
        let workers = (0..inner.cfg.workers.max(1))
            .map(|_| tokio::spawn(work(inner.clone())))
            .collect();
        Dispatcher {
            inner,
            workers: Mutex::new(workers),
        }
    }

    /// Whether pushes to `platform` can be sent.
    pub fn supports(&self, platform: Platform) -> bool {
        match platform {
            Platform::Apns => self.inner.apns.is_some(),
            Platform::Fcm => self.inner.fcm.is_some(),
        }
    }

    /// Queues a push to `target` on behalf of `owner`. Never blocks.
    pub fn enqueue(&self, owner: O, target: DeviceToken, push: Push) -> Enqueued {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Enqueued::Closed;
        }
        if !self.supports(target.platform) {
            metrics::counter!(metric::DROPPED, "reason" => "no_provider").increment(1);
            return Enqueued::NoProvider;
        }
        self.inner.put(Job {
            owner,
            target,
            push,
            attempt: 0,
        });
        Enqueued::Queued
    }

    /// Pushes waiting for a worker.
    pub fn depth(&self) -> usize {
        self.inner.depth()
    }

    /// Stops taking pushes and sends what is queued (logout pushes first, with the urgent
    /// ones) for at most `grace`, then stops the workers. Returns how many queued pushes were
    /// left unsent; they are counted as dropped (`reason="shutdown"`). Retries not due yet are
    /// dropped too: the inbox still holds every message, and a logout reaches its device at
    /// the next connect.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.ready.notify_waiters();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let aborts: Vec<_> = workers.iter().map(|w| w.abort_handle()).collect();
        let finished = tokio::time::timeout(grace, async {
            for w in workers {
                let _ = w.await;
            }
        })
        .await;
        if finished.is_err() {
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
        let left = {
            let mut q = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
            let n = q.priority.len() + q.normal.len();
            q.priority.clear();
            q.normal.clear();
            n
        };
        metrics::gauge!(metric::QUEUE_DEPTH).set(0.0);
        metrics::counter!(metric::DROPPED, "reason" => "shutdown").increment(left as u64);
        left
    }
}

impl<O> Drop for Dispatcher<O> {
    fn drop(&mut self) {
        for w in self
            .workers
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            w.abort();
        }
    }
}

impl<O: Clone + Send + Sync + 'static> Inner<O> {
    fn put(&self, job: Job<O>) {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if job.priority() {
            q.priority.push_back(job);
        } else {
            if q.normal.len() >= self.cfg.capacity.max(1) {
                q.normal.pop_front();
                metrics::counter!(metric::DROPPED, "reason" => "queue_full").increment(1);
            }
            q.normal.push_back(job);
        }
        let depth = q.priority.len() + q.normal.len();
        drop(q);
        metrics::gauge!(metric::QUEUE_DEPTH).set(depth as f64);
        self.ready.notify_one();
    }

    fn take(&self) -> Option<Job<O>> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let job = q.priority.pop_front().or_else(|| q.normal.pop_front());
        let depth = q.priority.len() + q.normal.len();
        drop(q);
        if job.is_some() {
            metrics::gauge!(metric::QUEUE_DEPTH).set(depth as f64);
        }
        job
    }

    fn depth(&self) -> usize {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.priority.len() + q.normal.len()
    }

    async fn send(&self, job: &Job<O>) -> Outcome {
        match job.target.platform {
            Platform::Apns => match &self.apns {
                Some(c) => c.send(&job.target, &job.push).await,
                None => Outcome::Failed("no APNs client".into()),
            },
            Platform::Fcm => match &self.fcm {
                Some(c) => c.send(&job.target, &job.push).await,
                None => Outcome::Failed("no FCM client".into()),
            },
        }
    }

    /// Full-jitter exponential backoff for try number `attempt` (1 = first retry).
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.cfg.backoff_max);
        cap.mul_f64(fastrand::f64())
    }
}

async fn work<O: Clone + Send + Sync + 'static>(inner: Arc<Inner<O>>) {
    loop {
        let ready = inner.ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        let Some(mut job) = inner.take() else {
            if inner.closed.load(Ordering::Relaxed) {
                return;
            }
            ready.await;
            continue;
        };
        let provider = job.target.platform.name();
        let kind = kind(&job.push);
        let outcome = inner.send(&job).await;
        job.attempt += 1;
        let label = match &outcome {
            Outcome::Delivered => "delivered",
            Outcome::TokenGone(reason) => {
                tracing::info!(provider, token = %job.target.fingerprint(), reason, "push token rejected; removing it");
                metrics::counter!(metric::TOKENS_REMOVED, "provider" => provider).increment(1);
                (inner.on_gone)(&job.owner, &job.target);
                "token_removed"
            }
            Outcome::Failed(reason) => {
                tracing::warn!(provider, kind, token = %job.target.fingerprint(), %reason, "push failed permanently");
                "failed"
            }
            Outcome::Retry { reason, .. } if job.attempt >= inner.cfg.max_attempts => {
                tracing::warn!(provider, kind, token = %job.target.fingerprint(), %reason, attempts = job.attempt, "push gave up after retries");
                "gave_up"
            }
            Outcome::Retry { after, reason } => {
                let delay = after
                    .map(|a| a.min(MAX_RETRY_AFTER) + inner.backoff(1).mul_f64(0.1))
                    .unwrap_or_else(|| inner.backoff(job.attempt));
                tracing::debug!(provider, kind, %reason, attempt = job.attempt, delay_ms = delay.as_millis() as u64, "push will be retried");
                let again = inner.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if !again.closed.load(Ordering::Relaxed) {
                        again.put(job);
                    }
                });
                "retried"
            }
        };
        metrics::counter!(metric::PUSHES, "provider" => provider, "kind" => kind, "outcome" => label)
            .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Environment;
    use uuid::Uuid;

    fn job(urgent: bool) -> Job<u32> {
        Job {
            owner: 1,
            target: DeviceToken {
                platform: Platform::Fcm,
                token: "t".into(),
                environment: Environment::Production,
                app_id: "a".into(),
            },
            push: Push::Wake {
                message: Uuid::nil(),
                badge: None,
                urgent,
            },
            attempt: 0,
        }
    }

    fn inner(capacity: usize) -> Inner<u32> {
        Inner {
            queues: Mutex::new(Queues::default()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            cfg: DispatcherConfig {
                capacity,
                ..Default::default()
            },
            apns: None,
            fcm: None,
            on_gone: Arc::new(|_, _| {}),
        }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_wake_up_but_never_an_urgent_page() {
        let q = inner(3);
        for _ in 0..10 {
            q.put(job(true));
        }
        for _ in 0..10 {
            q.put(job(false));
        }
        assert_eq!(q.depth(), 13, "10 urgent + 3 wake-ups");
        // Urgent pages come out first.
        for _ in 0..10 {
            assert!(q.take().expect("job").priority());
        }
        assert!(!q.take().expect("job").priority());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let q = inner(1);
        for attempt in 1..30 {
            let d = q.backoff(attempt);
            assert!(d <= q.cfg.backoff_max);
            let cap = q.cfg.backoff_base * (1u32 << (attempt - 1).min(16));
            assert!(d <= cap);
        }
    }
}
