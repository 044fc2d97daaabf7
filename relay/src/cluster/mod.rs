//! Cluster mode: many relay nodes sharing one ScyllaDB and a NATS bus.
//!
//! **Persist first, then carry.** The node that accepts a message stores it (ScyllaDB, durable
//! before `accepted`), delivers it to its own devices, then publishes the stored entry, sealed,
//! on the recipient user's subject. Nodes subscribe to the subjects of users with a device
//! connected to them, so NATS routes each delivery only to nodes that want it, and the
//! receiving node delivers from memory without reading the database. The bus is a fast path,
//! never the record: whatever it loses is still in the inbox.
//!
//! **No gap at connect.** A session subscribes to its user's subject and waits until NATS has
//! processed the subscription *before* it reads its inbox. A message stored before that point
//! is read by the replay; one stored after is published after it and reaches the session live.
//!
//! **When the bus fails** (NATS away, a publication dropped, a slow subscriber), the node
//! remembers the sequence floor from which deliveries may have been lost. While the bus is down,
//! every session re-reads its inbox from there every `inbox_check`; when it is back, the node
//! asks every node (itself included) to do that once more (`Resync`).
//!
//! Presence: see [`presence`]. Displacement: an `Online` event closes older connections of the
//! same device on other nodes.

pub mod presence;
mod unpublished;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::access::model::Target;
use crate::config::ClusterConfig;
use crate::fanout::{Hub, LiveLogout, Presence};
use crate::seal::Keyring;
use crate::store::{DeliverySink, DeviceRef, InboxEntry, MessageStore, now_ms, seq_floor};
use presence::{Directory, HeartbeatOutcome};
use unpublished::Unpublished;
use wire::{Control, Delivery, Subjects};

/// How far before a detected failure deliveries are re-read from the inbox: publications in
/// flight when the bus failed were stored up to this much earlier.
const GAP_MARGIN_MS: u64 = 5_000;
/// Devices per presence snapshot message (NATS' default payload limit is 1 MiB).
const SNAPSHOT_PART: usize = 2_000;
/// How long a connecting session waits for NATS to confirm its subscription.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(1);

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A NATS URL or option was rejected.
    #[error("nats: {0}")]
    Nats(String),
}

struct UserSub {
    devices: usize,
    task: tokio::task::JoinHandle<()>,
}

/// This node's membership in the cluster.
pub struct Cluster {
    /// Known once the store is open (it may lease the id).
    node_id: AtomicU8,
    /// Random per process: a restarted node is a new instance.
    instance: u64,
    client: async_nats::Client,
    subjects: Subjects,
    keyring: Arc<Keyring>,
    hub: Arc<Hub>,
    directory: Directory,
    users: tokio::sync::Mutex<HashMap<Arc<str>, UserSub>>,
    outbound: mpsc::Sender<(String, Bytes)>,
    connected: AtomicBool,
    /// Bus disconnections so far: control messages (logouts) may have been lost in each.
    disconnects: AtomicU64,
    /// Sequence floor from which deliveries may have been lost; 0 = none.
    gap: AtomicU64,
    store: OnceLock<Arc<dyn MessageStore>>,
    config: ClusterConfig,
    leaving: AtomicBool,
    /// What the store wrote that may not be on the bus yet (heartbeats announce it).
    unpublished: Unpublished,
}

/// Background tasks of cluster mode.
pub struct Tasks {
    handles: Vec<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Tasks {
    /// Stops them.
    pub fn abort(self) {
        self.stop.cancel();
        for h in self.handles {
            h.abort();
        }
    }
}

impl Cluster {
    /// Connects to NATS (in the background: a node starts even while the bus is away, degraded)
    /// and starts the control, heartbeat and publisher tasks.
    pub async fn start(
        config: &ClusterConfig,
        keyring: Arc<Keyring>,
        hub: Arc<Hub>,
    ) -> Result<(Arc<Cluster>, Tasks), ClusterError> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::new()
            .name("relay")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            })
            .connect(config.nats.join(","))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let (outbound, outbound_rx) = mpsc::channel(config.publish_queue);
        let cluster = Arc::new(Cluster {
            node_id: AtomicU8::new(u8::MAX),
            instance: fastrand::u64(1..),
            client,
            subjects: Subjects::new(&config.subject_prefix),
            keyring,
            hub,
            directory: Directory::default(),
            users: tokio::sync::Mutex::new(HashMap::new()),
            outbound,
            connected: AtomicBool::new(false),
            disconnects: AtomicU64::new(0),
            gap: AtomicU64::new(0),
            store: OnceLock::new(),
            config: config.clone(),
            leaving: AtomicBool::new(false),
            unpublished: Unpublished::default(),
        });
        metrics::gauge!("relay_bus_connected").set(0.0);
        let control = cluster
            .client
            .subscribe(cluster.subjects.control_all())
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let snapshots = cluster
            .client
            .subscribe(cluster.subjects.snapshot(cluster.instance))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let stop = CancellationToken::new();
        let handles = vec![
            tokio::spawn(cluster.clone().publisher(outbound_rx)),
            tokio::spawn(cluster.clone().control(control, snapshots, events_rx)),
            tokio::spawn(cluster.clone().ticker(stop.clone())),
        ];
        tracing::info!(instance = %format!("{:016x}", cluster.instance), "cluster mode: joining the bus");
        Ok((cluster, Tasks { handles, stop }))
    }

    /// Gives the cluster the store and this node's id (the store is built after the cluster,
    /// whose deliveries it feeds, and may lease the id).
    pub fn set_store(&self, store: Arc<dyn MessageStore>, node_id: u8) {
        self.node_id.store(node_id, Ordering::Relaxed);
        let _ = self.store.set(store);
    }

    /// Whether NATS is connected now.
    pub fn bus_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Devices connected to other nodes.
    pub fn remote_online(&self) -> usize {
        self.directory.len()
    }

    fn publish<T: AsRef<[u8]>>(&self, subject: String, plain: T) {
        if !self.bus_connected() {
            // The client holds it until reconnect, but may not: re-read from here then.
            self.mark_gap(now_ms());
        }
        let sealed = wire::seal(&self.keyring, &subject, plain.as_ref());
        match self.outbound.try_send((subject, sealed)) {
            Ok(()) => {}
            Err(_) => {
                metrics::counter!("relay_bus_publish_dropped_total").increment(1);
                self.mark_gap(now_ms());
            }
        }
    }

    fn publish_control(&self, kind: &str, msg: &Control) {
        match serde_json::to_vec(msg) {
            Ok(plain) => self.publish(self.subjects.control(kind), plain),
            Err(e) => tracing::error!(error = %e, "control message not encodable"),
        }
    }

    /// Deliveries since about `at_ms` may be lost: remember the earliest such point.
    fn mark_gap(&self, at_ms: u64) {
        let floor = seq_floor(at_ms.saturating_sub(GAP_MARGIN_MS)).max(1);
        let _ = self
            .gap
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
                (g == 0 || floor < g).then_some(floor)
            });
    }

    /// A session of `device`, registered with the hub at `since`, is about to replay: make sure
    /// deliveries for its user reach this node, then tell the cluster it is here.
    pub async fn attach(self: &Arc<Self>, device: &DeviceRef, since: u64) {
        let fresh = {
            let mut users = self.users.lock().await;
            match users.get_mut(&device.user) {
                Some(sub) => {
                    sub.devices += 1;
                    false
                }
                None => match self
                    .client
                    .subscribe(self.subjects.user(&device.user))
                    .await
                {
                    Ok(sub) => {
                        let task = tokio::spawn(self.clone().forward(sub));
                        users.insert(device.user.clone(), UserSub { devices: 1, task });
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bus subscription failed");
                        false
                    }
                },
            }
        };
        // NATS has processed the subscription once a flush round trip returns. Without the
        // bus, the inbox checks and the resync on reconnect cover this session.
        if !self.bus_connected() {
            self.mark_gap(now_ms());
        } else if fresh {
            let _ = tokio::time::timeout(ATTACH_TIMEOUT, self.client.flush()).await;
        }
        self.publish_control(
            "presence",
            &Control::Online {
                instance: self.instance,
                user: device.user.to_string(),
                device: device.device.to_string(),
                since,
            },
        );
    }

    /// The session of `device` that attached at `since` ended.
    pub async fn detach(&self, device: &DeviceRef, since: u64) {
        {
            let mut users = self.users.lock().await;
            if let Some(sub) = users.get_mut(&device.user) {
                sub.devices -= 1;
                if sub.devices == 0 {
                    // Dropping the subscriber unsubscribes.
                    if let Some(sub) = users.remove(&device.user) {
                        sub.task.abort();
                    }
                }
            }
        }
        self.publish_control(
            "presence",
            &Control::Offline {
                instance: self.instance,
                user: device.user.to_string(),
                device: device.device.to_string(),
                since,
            },
        );
    }

    /// Tells every other node to close the sessions a logout covers (it is already stored).
    fn tell_others_to_logout(&self, target: &Target, reason: &str, signal: uuid::Uuid, at: u64) {
        let (device, except) = target.parts();
        self.publish_control(
            "logout",
            &Control::Logout {
                instance: self.instance,
                user: target.user().into(),
                device,
                except,
                reason: reason.into(),
                signal,
                at,
            },
        );
    }

    /// Announces that this node is going away, so others forget its devices at once.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.heartbeat();
    }

    /// Sends what is queued for the bus and waits for NATS to have it (bounded).
    pub async fn flush(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.outbound.is_closed()
            && self.outbound.capacity() < self.outbound.max_capacity()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout_at(deadline, self.client.flush()).await;
    }

    fn heartbeat(&self) {
        self.publish_control(
            "heartbeat",
            &Control::Heartbeat {
                instance: self.instance,
                node_id: self.node_id.load(Ordering::Relaxed),
                devices: self.hub.online(),
                leaving: self.leaving.load(Ordering::Relaxed),
                unpublished: self.unpublished.announce(),
            },
        );
    }

    async fn publisher(self: Arc<Self>, mut rx: mpsc::Receiver<(String, Bytes)>) {
        while let Some((subject, payload)) = rx.recv().await {
            let started = Instant::now();
            match self.client.publish(subject, payload).await {
                Ok(()) => {
                    metrics::counter!("relay_bus_published_total").increment(1);
                    metrics::histogram!("relay_bus_publish_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    metrics::counter!("relay_bus_publish_dropped_total").increment(1);
                    tracing::warn!(error = %e, "bus publish failed");
                    self.mark_gap(now_ms());
                }
            }
        }
    }

    /// Deliveries of one user's subject to this node's devices.
    async fn forward(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let Some(plain) = wire::open(&self.keyring, &msg.subject, &msg.payload) else {
                metrics::counter!("relay_bus_rejected_total").increment(1);
                continue;
            };
            let Some(d) = Delivery::decode(&plain) else {
                metrics::counter!("relay_bus_rejected_total").increment(1);
                continue;
            };
            if d.origin == self.instance {
                continue;
            }
            metrics::counter!("relay_bus_received_total").increment(1);
            metrics::histogram!("relay_bus_delivery_duration_seconds")
                .record(now_us().saturating_sub(d.sent_us) as f64 / 1e6);
            self.hub.deliver(&d.devices, &d.entry);
        }
    }

    async fn control(
        self: Arc<Self>,
        mut control: async_nats::Subscriber,
        mut snapshots: async_nats::Subscriber,
        mut events: mpsc::UnboundedReceiver<async_nats::Event>,
    ) {
        loop {
            tokio::select! {
                Some(msg) = control.next() => self.on_control(&msg.subject, &msg.payload),
                Some(msg) = snapshots.next() => self.on_control(&msg.subject, &msg.payload),
                Some(event) = events.recv() => self.on_event(event).await,
                else => return,
            }
        }
    }

    fn on_control(&self, subject: &str, payload: &[u8]) {
        let Some(msg) = wire::open(&self.keyring, subject, payload)
            .and_then(|plain| serde_json::from_slice::<Control>(&plain).ok())
        else {
            metrics::counter!("relay_bus_rejected_total").increment(1);
            return;
        };
        let now = Instant::now();
        match msg {
            Control::Online {
                instance,
                user,
                device,
                since,
            } if instance != self.instance => {
                let d = DeviceRef::new(&user, &device);
                if self.hub.displace_older(&d, since, instance > self.instance) {
                    tracing::info!(user = %d.user, device = %d.device, "displaced by a newer connection on another node");
                }
                self.directory.online(d.clone(), instance, since, now);
                // A device this node's store may not know yet (first connection anywhere).
                if let Some(store) = self.store.get() {
                    store.device_seen(d);
                }
            }
            Control::Offline {
                instance,
                user,
                device,
                since,
            } if instance != self.instance => {
                self.directory
                    .offline(&DeviceRef::new(&user, &device), instance, since);
            }
            Control::Heartbeat {
                instance,
                node_id,
                devices,
                leaving,
                unpublished,
            } if instance != self.instance => {
                if node_id == self.node_id.load(Ordering::Relaxed) && !leaving {
                    metrics::counter!("relay_cluster_node_id_conflicts_total").increment(1);
                    tracing::error!(
                        node_id,
                        "another live node has this node_id: sequence numbers may collide; give every node its own"
                    );
                }
                if leaving {
                    tracing::info!(node_id, "node left the cluster");
                }
                if self
                    .directory
                    .heartbeat(instance, node_id, devices, leaving, unpublished, now)
                    == HeartbeatOutcome::NeedSnapshot
                {
                    self.publish_control(
                        "sync",
                        &Control::SyncRequest {
                            instance: self.instance,
                        },
                    );
                }
            }
            Control::SyncRequest { instance } if instance != self.instance => {
                self.send_snapshot(instance);
            }
            Control::Snapshot {
                instance,
                node_id,
                part,
                devices,
            } if instance != self.instance => {
                self.directory
                    .snapshot(instance, node_id, part, devices, now);
            }
            Control::Logout {
                instance,
                user,
                device,
                except,
                reason,
                signal,
                at,
            } if instance != self.instance => {
                let target = Target::from_parts(&user, device, except);
                let n = self.hub.logout(&target, &reason, signal, at);
                if n > 0 {
                    tracing::info!(user = %user, sessions = n, "logged out by another node");
                }
            }
            Control::Resync { instance, floor } if instance != self.instance => {
                metrics::counter!("relay_bus_resyncs_total").increment(1);
                self.hub.catch_up(floor);
            }
            _ => {} // our own announcements, echoed back
        }
    }

    fn send_snapshot(&self, to: u64) {
        let devices: Vec<(String, String, u64)> = self
            .hub
            .devices()
            .into_iter()
            .map(|(d, since)| (d.user.to_string(), d.device.to_string(), since))
            .collect();
        let subject = self.subjects.snapshot(to);
        let mut parts: Vec<&[(String, String, u64)]> = devices.chunks(SNAPSHOT_PART).collect();
        if parts.is_empty() {
            parts.push(&[]);
        }
        for (part, chunk) in parts.into_iter().enumerate() {
            let msg = Control::Snapshot {
                instance: self.instance,
                node_id: self.node_id.load(Ordering::Relaxed),
                part: part as u32,
                devices: chunk.to_vec(),
            };
            if let Ok(plain) = serde_json::to_vec(&msg) {
                self.publish(subject.clone(), plain);
            }
        }
    }

    async fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                tracing::info!("bus connected");
                // Subscriptions are restored by the client; confirm before reading inboxes.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
                self.connected.store(true, Ordering::SeqCst);
                metrics::gauge!("relay_bus_connected").set(1.0);
                self.heartbeat();
                self.publish_control(
                    "sync",
                    &Control::SyncRequest {
                        instance: self.instance,
                    },
                );
                self.resync();
            }
            async_nats::Event::Disconnected => {
                tracing::warn!(
                    "bus disconnected: deliveries to other nodes fall back to inbox checks"
                );
                self.disconnects.fetch_add(1, Ordering::SeqCst);
                self.connected.store(false, Ordering::SeqCst);
                metrics::gauge!("relay_bus_connected").set(0.0);
                metrics::counter!("relay_bus_disconnects_total").increment(1);
                self.mark_gap(now_ms());
            }
            async_nats::Event::SlowConsumer(_) => {
                metrics::counter!("relay_bus_slow_consumer_total").increment(1);
                tracing::warn!(
                    "bus subscription fell behind; deliveries were dropped, inboxes re-read"
                );
                self.hub
                    .catch_up(seq_floor(now_ms().saturating_sub(GAP_MARGIN_MS)));
            }
            other => tracing::info!(event = %other, "bus event"),
        }
    }

    /// Everyone re-reads from where this node may have missed or dropped deliveries; this
    /// node too, in case the resync itself is lost.
    fn resync(&self) {
        let floor = self.gap.swap(0, Ordering::Relaxed);
        if floor > 0 {
            self.hub.catch_up(floor);
            self.publish_control(
                "resync",
                &Control::Resync {
                    instance: self.instance,
                    floor,
                },
            );
        }
    }

    /// Heartbeats, dead-node expiry, and inbox checks while the bus is down; with the bus up, a
    /// resync for publications dropped meanwhile (a full queue, a failed publish).
    async fn ticker(self: Arc<Self>, stop: CancellationToken) {
        let mut beat = tokio::time::interval(self.config.heartbeat.0);
        let mut check = tokio::time::interval(self.config.inbox_check.0);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = beat.tick() => {
                    self.heartbeat();
                    for lost in self.directory.expire(Instant::now(), self.config.node_timeout.0) {
                        metrics::counter!("relay_cluster_nodes_lost_total").increment(1);
                        tracing::warn!(node_id = lost.node_id, devices = lost.devices, "node silent: its devices count as offline; sessions re-read their inboxes");
                        // A node that died between storing messages and publishing them left
                        // them only in the inboxes: every session here re-reads from before it
                        // fell silent, and from the oldest message it was still storing then
                        // (a slow database's batch, or a retry under its first number).
                        let silent_ms = lost.silent.as_millis() as u64;
                        let before = seq_floor(now_ms().saturating_sub(silent_ms + GAP_MARGIN_MS));
                        self.hub.catch_up(lost.unpublished.map_or(before, |u| u.min(before)));
                    }
                    metrics::gauge!("relay_presence_remote_devices").set(self.directory.len() as f64);
                    metrics::gauge!("relay_cluster_nodes").set((self.directory.peers().len() + 1) as f64);
                }
                _ = check.tick() => {
                    let floor = self.gap.load(Ordering::Relaxed);
                    if !self.bus_connected() && floor > 0 {
                        metrics::counter!("relay_bus_inbox_checks_total").increment(1);
                        self.hub.catch_up(floor);
                    } else if floor > 0 {
                        self.resync();
                    }
                }
            }
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl DeliverySink for Cluster {
    fn storing(&self, oldest: Option<u64>) {
        self.unpublished.storing(oldest);
    }

    fn deliver(&self, devices: &[DeviceRef], entry: &InboxEntry) {
        self.hub.deliver(devices, entry);
        let sent_us = now_us();
        let mut by_user: Vec<&[DeviceRef]> = Vec::new();
        // Devices arrive grouped by user (the store appends per recipient user).
        let mut start = 0;
        for i in 1..=devices.len() {
            if i == devices.len() || devices[i].user != devices[start].user {
                by_user.push(&devices[start..i]);
                start = i;
            }
        }
        for group in by_user {
            let delivery = Delivery {
                origin: self.instance,
                sent_us,
                devices: group.to_vec(),
                entry: entry.clone(),
            };
            self.publish(self.subjects.user(&group[0].user), delivery.encode());
        }
    }
}

impl LiveLogout for Cluster {
    fn sign_out(&self, target: &Target, reason: &str, signal: uuid::Uuid, at: u64) {
        self.hub.logout(target, reason, signal, at);
        self.tell_others_to_logout(target, reason, signal, at);
    }

    fn logouts_taken(&self) -> Option<u64> {
        // The bus's state first: seen up again after a disconnection, that one is counted.
        if !self.connected.load(Ordering::SeqCst) {
            return None;
        }
        let disconnects = self.disconnects.load(Ordering::SeqCst);
        Some(self.hub.logouts_taken()?.wrapping_add(disconnects))
    }
}

impl Presence for Cluster {
    fn is_online(&self, device: &DeviceRef) -> bool {
        self.hub.is_online(device) || self.directory.is_online(device)
    }
}
