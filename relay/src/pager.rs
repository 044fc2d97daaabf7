//! Wake-ups and urgent pages: who gets a push when a message is stored.
//!
//! - A message stored for a device that is not connected wakes it with one push; further
//!   messages within `push.coalesce_window` ride on that push (the app fetches everything
//!   pending when it wakes). Connecting resets the window.
//! - An urgent message pages at once (offline devices) and, while a device's inbox still holds
//!   it after `push.urgent_ack_timeout`, pages again, up to `push.urgent_repeats` times, whether
//!   or not the device looks connected: a phone in a pocket can hold a zombie socket. The inbox
//!   is the source of truth for "not yet acknowledged", so this holds across nodes.
//! - A device has at most one escalation: a further urgent message for a device already being
//!   paged joins it (the escalation follows the newest message, and its count starts again)
//!   instead of paging at once and starting another.
//!
//! **Invariant:** the store's writer thread only ever does a non-blocking channel send here;
//! token lookups and provider calls happen on tasks behind the push dispatcher's bounded queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use push::{DeviceToken, Dispatcher, Push};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::fanout::Presence;
use crate::store::{DeliverySink, DeviceRef, InboxEntry, MessageStore};

/// Stored messages waiting for the pager before non-urgent ones are dropped (and counted).
const BACKLOG: usize = 65_536;

enum Event {
    Stored {
        offline: Vec<DeviceRef>,
        /// Every recipient device, for urgent messages only.
        all: Vec<DeviceRef>,
        id: Uuid,
        seq: u64,
        urgent: bool,
    },
    Online(DeviceRef),
}

/// Timing of wake-ups and escalation.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Wake-ups for one device within this window coalesce.
    pub coalesce_window: Duration,
    /// Wait for an ack before paging again.
    pub urgent_ack_timeout: Duration,
    /// Pages after the first.
    pub urgent_repeats: u32,
}

/// The sessions' and store's handle on the pager.
pub struct Pager {
    events: mpsc::UnboundedSender<Event>,
    backlog: AtomicUsize,
}

/// The pager's receiving end, handed to [`run`] once the store is open.
pub struct Inbox(mpsc::UnboundedReceiver<Event>);

impl Pager {
    /// A pager and the receiver [`run`] consumes.
    pub fn new() -> (Arc<Pager>, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Pager {
                events: tx,
                backlog: AtomicUsize::new(0),
            }),
            Inbox(rx),
        )
    }

    /// A device connected: its next wake-up is not coalesced with earlier ones.
    pub fn online(&self, device: &DeviceRef) {
        let _ = self.events.send(Event::Online(device.clone()));
    }

    fn stored(&self, devices: &[DeviceRef], entry: &InboxEntry, presence: &dyn Presence) {
        let offline: Vec<DeviceRef> = devices
            .iter()
            .filter(|d| !presence.is_online(d))
            .cloned()
            .collect();
        if !entry.urgent {
            if offline.is_empty() {
                return;
            }
            // Urgent pages are never shed; wake-ups are, under a backlog (counted).
            if self.backlog.fetch_add(1, Ordering::Relaxed) >= BACKLOG {
                self.backlog.fetch_sub(1, Ordering::Relaxed);
                metrics::counter!(push::metric::DROPPED, "reason" => "pager_backlog").increment(1);
                return;
            }
        }
        let _ = self.events.send(Event::Stored {
            offline,
            all: if entry.urgent {
                devices.to_vec()
            } else {
                Vec::new()
            },
            id: entry.id,
            seq: entry.seq,
            urgent: entry.urgent,
        });
    }
}

/// The store's delivery sink when push is on: live fan-out, then the push decision.
pub struct PagingSink {
    /// Live fan-out (this node's hub, or the cluster).
    pub delivery: Arc<dyn DeliverySink>,
    /// Who is connected (on this node, or anywhere in the cluster).
    pub presence: Arc<dyn Presence>,
    /// Push decisions.
    pub pager: Arc<Pager>,
}

impl DeliverySink for PagingSink {
    fn deliver(&self, devices: &[DeviceRef], entry: &InboxEntry) {
        self.delivery.deliver(devices, entry);
        self.pager.stored(devices, entry, &*self.presence);
    }
}

/// Deletes a token the provider reported dead, unless the device registered a new one since.
pub fn forget_token(store: Arc<dyn MessageStore>, device: &DeviceRef, dead: &DeviceToken) {
    let (device, dead) = (device.clone(), dead.clone());
    tokio::spawn(async move {
        if let Ok(Some(current)) = store.push_token(device.clone()).await
            && current == dead
            && let Err(e) = store.set_push_token(device.clone(), None).await
        {
            tracing::warn!(user = %device.user, device = %device.device, error = %e, "dead push token not removed");
        }
    });
}

struct Shared {
    store: Arc<dyn MessageStore>,
    dispatcher: Arc<Dispatcher<DeviceRef>>,
    timing: Timing,
    /// Devices being paged, with the newest urgent message (id, seq) the page is about.
    escalating: std::sync::Mutex<HashMap<DeviceRef, (Uuid, u64)>>,
}

impl Shared {
    /// Looks up the device's token and queues `push`. Returns a label for metrics.
    async fn push(&self, device: &DeviceRef, push: Push) -> &'static str {
        match self.store.push_token(device.clone()).await {
            Ok(Some(token)) => match self.dispatcher.enqueue(device.clone(), token, push) {
                push::dispatch::Enqueued::Queued => "queued",
                push::dispatch::Enqueued::NoProvider => "no_provider",
                push::dispatch::Enqueued::Closed => "closed",
            },
            Ok(None) => "no_token",
            Err(e) => {
                tracing::warn!(error = %e, "push token lookup failed");
                "store_error"
            }
        }
    }

    /// Whether `seq` still waits in the device's inbox (not acknowledged).
    async fn pending(&self, device: &DeviceRef, seq: u64) -> bool {
        match self
            .store
            .inbox_page(device.clone(), seq.saturating_sub(1), 1, usize::MAX)
            .await
        {
            Ok(page) => page.first().is_some_and(|e| e.seq == seq),
            // Unknown: page again rather than risk a missed page.
            Err(_) => true,
        }
    }

    fn escalations(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceRef, (Uuid, u64)>> {
        self.escalating.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Points `device`'s escalation at a newer urgent message; false when it has none (the
    /// caller starts one).
    fn join(&self, device: &DeviceRef, id: Uuid, seq: u64) -> bool {
        let mut map = self.escalations();
        match map.get_mut(device) {
            Some(target) => {
                if seq > target.1 {
                    *target = (id, seq);
                }
                true
            }
            None => {
                map.insert(device.clone(), (id, seq));
                false
            }
        }
    }

    /// Ends `device`'s escalation unless a newer message joined it since `seq`.
    fn finish(&self, device: &DeviceRef, seq: u64) -> bool {
        let mut map = self.escalations();
        if map.get(device).is_none_or(|t| t.1 == seq) {
            map.remove(device);
            true
        } else {
            false
        }
    }

    async fn escalate(self: Arc<Self>, device: DeviceRef) {
        let mut current = None;
        let mut step = 0;
        loop {
            tokio::time::sleep(self.timing.urgent_ack_timeout).await;
            let Some((id, seq)) = self.escalations().get(&device).copied() else {
                return;
            };
            if current != Some(seq) {
                current = Some(seq);
                step = 0;
            }
            if !self.pending(&device, seq).await {
                if self.finish(&device, seq) {
                    metrics::counter!("relay_push_escalations_total", "result" => "acknowledged")
                        .increment(1);
                    tracing::info!(user = %device.user, device = %device.device, message = %id, step, "urgent message acknowledged; escalation stops");
                    return;
                }
                continue; // a newer urgent message joined meanwhile
            }
            step += 1;
            if step <= self.timing.urgent_repeats {
                let page = Push::Wake {
                    message: id,
                    badge: None,
                    urgent: true,
                };
                let result = self.push(&device, page).await;
                metrics::counter!("relay_push_escalations_total", "result" => "repaged")
                    .increment(1);
                tracing::info!(user = %device.user, device = %device.device, message = %id, step, result, "urgent message not acknowledged; paging again");
            }
            if step >= self.timing.urgent_repeats && self.finish(&device, seq) {
                metrics::counter!("relay_push_escalations_total", "result" => "exhausted")
                    .increment(1);
                return;
            }
        }
    }
}

/// Why the configured push providers could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// A key, service-account or CA file that could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// An endpoint that is not a URL.
    #[error("`{0}` is not a URL")]
    Url(String),
    /// Credentials or trust roots a provider client refused (`push.apns`, `push.fcm`).
    #[error("{0}: {1}")]
    Provider(&'static str, push::ConfigError),
}

/// Builds the provider clients configured in `[push]`, reading their keys. Fails on unreadable
/// or invalid credentials, so a misconfigured relay does not start.
pub fn providers(
    cfg: &crate::config::PushConfig,
) -> Result<(Option<push::apns::Apns>, Option<push::fcm::Fcm>), ProviderError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| ProviderError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let roots = |ca: &Option<std::path::PathBuf>, name| -> Result<_, ProviderError> {
        let pem = ca.as_deref().map(read).transpose()?;
        push::origin::roots(pem.as_deref()).map_err(|e| ProviderError::Provider(name, e))
    };
    let url = |u: &str| {
        u.parse::<hyper::Uri>()
            .map_err(|_| ProviderError::Url(u.to_string()))
    };
    let apns = match &cfg.apns {
        None => None,
        Some(a) => Some(
            push::apns::Apns::new(
                push::apns::ApnsConfig {
                    team_id: a.team_id.clone(),
                    key_id: a.key_id.clone(),
                    key_pem: read(&a.key_file)?,
                    production_url: url(&a.production_url)?,
                    sandbox_url: url(&a.sandbox_url)?,
                    connections: a.connections,
                    timeout: cfg.request_timeout.0,
                    critical_entitlement: a.critical_entitlement,
                    expiration_secs: a.expiration.0.as_secs(),
                },
                roots(&a.ca_file, "push.apns")?,
            )
            .map_err(|e| ProviderError::Provider("push.apns", e))?,
        ),
    };
    let fcm = match &cfg.fcm {
        None => None,
        Some(f) => {
            let account = push::fcm::ServiceAccount::from_json(&read(&f.service_account_file)?)
                .map_err(|e| ProviderError::Provider("push.fcm", e))?;
            Some(
                push::fcm::Fcm::new(
                    push::fcm::FcmConfig {
                        account,
                        base_url: url(&f.base_url)?,
                        connections: f.connections,
                        timeout: cfg.request_timeout.0,
                        ttl_secs: f.ttl.0.as_secs().min(u64::from(u32::MAX)) as u32,
                        style: match f.style {
                            crate::config::FcmStyleSetting::Data => push::payload::FcmStyle::Data,
                            crate::config::FcmStyleSetting::Notification => {
                                push::payload::FcmStyle::Notification
                            }
                        },
                    },
                    roots(&f.ca_file, "push.fcm")?,
                )
                .map_err(|e| ProviderError::Provider("push.fcm", e))?,
            )
        }
    };
    Ok((apns, fcm))
}

/// Consumes stored-message events until the pager is dropped.
pub async fn run(
    inbox: Inbox,
    pager: Arc<Pager>,
    store: Arc<dyn MessageStore>,
    dispatcher: Arc<Dispatcher<DeviceRef>>,
    timing: Timing,
) {
    let Inbox(mut rx) = inbox;
    let shared = Arc::new(Shared {
        store,
        dispatcher,
        timing,
        escalating: Default::default(),
    });
    let mut last_wake: HashMap<DeviceRef, Instant> = HashMap::new();
    let mut pruned = Instant::now();
    // Wake-ups and escalations in flight: owned by this task, so they end with it (the relay
    // aborts the pager at shutdown, after the dispatcher took what was queued).
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(event) = rx.recv().await {
        while tasks.try_join_next().is_some() {}
        let now = Instant::now();
        match event {
            Event::Online(device) => {
                last_wake.remove(&device);
            }
            Event::Stored {
                offline,
                all,
                id,
                seq,
                urgent,
            } => {
                if !urgent {
                    pager.backlog.fetch_sub(1, Ordering::Relaxed);
                }
                for device in offline {
                    let recent = last_wake
                        .get(&device)
                        .is_some_and(|t| now.duration_since(*t) < timing.coalesce_window);
                    let paging = urgent && shared.escalations().contains_key(&device);
                    if (recent && !urgent) || paging {
                        metrics::counter!("relay_push_wakeups_total", "result" => "coalesced")
                            .increment(1);
                        continue;
                    }
                    last_wake.insert(device.clone(), now);
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        let push = Push::Wake {
                            message: id,
                            badge: None,
                            urgent,
                        };
                        let result = shared.push(&device, push).await;
                        metrics::counter!("relay_push_wakeups_total", "result" => result)
                            .increment(1);
                    });
                }
                for device in all {
                    if !shared.join(&device, id, seq) {
                        tasks.spawn(shared.clone().escalate(device));
                    }
                }
            }
        }
        if now.duration_since(pruned) > timing.coalesce_window {
            last_wake.retain(|_, t| now.duration_since(*t) < timing.coalesce_window);
            pruned = now;
        }
    }
}
