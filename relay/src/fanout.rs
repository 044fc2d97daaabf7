//! The hub of live connections on this node: which device is connected, and its outbound queue.
//!
//! The store calls [`Hub::deliver`] after each durable commit, in sequence order. The `deliver`
//! frame is the same for every recipient device, so it is serialized once and shared, by the
//! first session that writes it: not on the store's single writer thread.
//!
//! **Invariant:** the hub never blocks and never buffers without bound. A full queue marks the
//! connection as overflowed; the session then catches up from the store (during replay) or
//! disconnects the device as a slow consumer (live), and the message stays in the inbox.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::access::model::{Target, covers};
use crate::protocol::{self, ServerFrame, close};
use crate::store::{DeliverySink, DeviceRef, InboxEntry};

/// A `deliver` frame with its sequence number, queued for one connection.
pub type Outbound = (u64, LiveFrame);

/// A committed message on its way to the connections of its recipients: its `deliver` frame
/// is built once, when a session first takes it.
#[derive(Debug, Clone)]
pub struct LiveFrame(Arc<(InboxEntry, OnceLock<Utf8Bytes>)>);

impl LiveFrame {
    /// The message, its frame not built yet.
    pub fn new(entry: InboxEntry) -> Self {
        LiveFrame(Arc::new((entry, OnceLock::new())))
    }

    /// The `deliver` frame (shared by every connection it was queued for).
    pub fn frame(&self) -> Utf8Bytes {
        let (entry, frame) = &*self.0;
        frame.get_or_init(|| deliver_frame(entry)).clone()
    }
}

/// One connection's bounded outbound queue and the signals it shares with the hub.
///
/// A `VecDeque` behind a mutex rather than a channel: it allocates nothing until the first
/// delivery, which matters when most connections sit idle. One [`Notify`] carries every
/// signal (a delivery, an eviction, a catch-up): an idle session waits on it alone, which keeps
/// its task small and spares each turn of its loop a wait on a token shared by every session.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: Mutex<VecDeque<Outbound>>,
    capacity: usize,
    /// Woken when deliveries are queued, the session is evicted, or the hub asks for a
    /// catch-up: the session looks at which.
    pub wake: Notify,
    /// Set when a delivery found the queue full.
    pub overflowed: AtomicBool,
    /// The close code of an eviction; 0 while the session may go on.
    evict_code: AtomicU16,
    /// Set before an eviction with [`close::LOGGED_OUT`]: the reason and the signal. Boxed:
    /// rare, and every connection's outbox would hold its room.
    pub logout: Mutex<Option<Box<(String, uuid::Uuid)>>>,
}

impl Outbox {
    fn new(capacity: usize) -> Self {
        Outbox {
            capacity: capacity.max(1),
            ..Default::default()
        }
    }

    /// Makes the session close with `code`; a logout, once asked for, is never replaced.
    fn evict(&self, code: u16) {
        let _ = self
            .evict_code
            .fetch_update(Ordering::Release, Ordering::Relaxed, |old| {
                (old != close::LOGGED_OUT).then_some(code)
            });
        self.wake.notify_one();
    }

    /// The close code, once the hub evicted the session.
    pub fn evicted(&self) -> Option<u16> {
        match self.evict_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    fn push(&self, item: Outbound) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            drop(q);
            self.overflowed.store(true, Ordering::Relaxed);
            metrics::counter!("relay_outbound_overflows_total").increment(1);
            return;
        }
        q.push_back(item);
        drop(q);
        self.wake.notify_one();
    }

    /// Takes up to `max` queued deliveries, oldest first. Frees the queue's memory once empty.
    pub fn take(&self, max: usize) -> Vec<Outbound> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = q.len().min(max);
        let batch: Vec<Outbound> = q.drain(..n).collect();
        if q.is_empty() {
            *q = VecDeque::new();
        } else {
            self.wake.notify_one(); // more to take: come back
        }
        batch
    }
}

struct Conn {
    id: u64,
    since: u64,
    /// The session token's `iat`, Unix seconds: a logout closes only what it revokes.
    issued_at: u64,
    outbox: Arc<Outbox>,
}

/// A session's handle on its registration.
pub struct Registration {
    /// Unique id of this connection on this node.
    pub id: u64,
    /// When it registered, ms since the Unix epoch (newer connections of a device win).
    pub since: u64,
    /// Live deliveries and signals.
    pub outbox: Arc<Outbox>,
    /// Changes when deliveries may have been lost (cluster bus trouble, a node died): the
    /// session re-reads its inbox from [`Registration::next_catch_up`].
    pub catch_up: watch::Receiver<CatchUps>,
    /// How many of the hub's catch-ups this session has taken in.
    catch_ups_seen: u64,
}

impl Registration {
    /// The lowest floor of the catch-ups asked for since the last call, if any: a session busy
    /// replaying while several came must re-read from the lowest, not from the newest.
    pub fn next_catch_up(&mut self) -> Option<u64> {
        let c = self.catch_up.borrow_and_update();
        let missed = c.asked - self.catch_ups_seen;
        self.catch_ups_seen = c.asked;
        match missed {
            0 => None,
            n if n > c.recent.len() as u64 => Some(0), // more than are kept: the whole inbox
            n => c.recent.iter().rev().take(n as usize).min().copied(),
        }
    }
}

/// The hub's most recent catch-up floors.
#[derive(Debug, Default)]
pub struct CatchUps {
    /// Catch-ups asked for since the hub began.
    asked: u64,
    /// The newest floors, oldest first (at most [`CATCH_UPS_KEPT`]).
    recent: std::collections::VecDeque<u64>,
}

/// Catch-up floors the hub keeps for sessions that have not read them yet.
const CATCH_UPS_KEPT: usize = 32;

/// Where a stored logout reaches live sessions: the hub closes this node's, the cluster closes
/// this node's and tells the other nodes. The access service calls it once per logout.
pub trait LiveLogout: Send + Sync + 'static {
    /// Closes the sessions `target` covers whose token the revocation at `at` (ms) revokes.
    fn sign_out(&self, target: &Target, reason: &str, signal: uuid::Uuid, at: u64);

    /// A count that moves whenever this node takes a logout, or may have missed one (a bus
    /// catch-up); `None` while it may be missing them unseen (the bus is down). A session
    /// admitted on an access read made after one reading, and registered before a second
    /// equal one, missed no logout: any stored meanwhile reaches it live.
    fn logouts_taken(&self) -> Option<u64>;
}

impl LiveLogout for Hub {
    fn sign_out(&self, target: &Target, reason: &str, signal: uuid::Uuid, at: u64) {
        self.logout(target, reason, signal, at);
    }

    fn logouts_taken(&self) -> Option<u64> {
        Some(self.logouts.load(Ordering::SeqCst))
    }
}

/// Whether a device is connected (to this node, or anywhere in a cluster).
pub trait Presence: Send + Sync + 'static {
    /// Whether `device` has a live connection.
    fn is_online(&self, device: &DeviceRef) -> bool;
}

/// Live connections of this node, by device.
pub struct Hub {
    conns: DashMap<DeviceRef, Conn>,
    next_id: AtomicU64,
    catch_up: watch::Sender<CatchUps>,
    /// The close code every session gets once the relay stops; 0 before.
    closing: AtomicU16,
    /// Logouts and catch-ups taken ([`LiveLogout::logouts_taken`]). Counted before the
    /// sessions are looked at, so a session that registers while a logout runs is either
    /// closed by it or sees the count move.
    logouts: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            conns: DashMap::new(),
            next_id: AtomicU64::new(0),
            catch_up: watch::Sender::new(CatchUps::default()),
            closing: AtomicU16::new(0),
            logouts: AtomicU64::new(0),
        }
    }
}

impl Hub {
    /// Registers a connection for `device` (token issued at `issued_at`), displacing (closing)
    /// an older one of the same device.
    pub fn register(&self, device: &DeviceRef, queue: usize, issued_at: u64) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(queue));
        // Strictly increasing per node, so a reconnect within the same millisecond is newer.
        let since = crate::store::now_ms().max(self.conns.get(device).map_or(0, |c| c.since + 1));
        let conn = Conn {
            id,
            since,
            issued_at,
            outbox: outbox.clone(),
        };
        if let Some(old) = self.conns.insert(device.clone(), conn) {
            old.outbox.evict(close::DISPLACED);
            metrics::counter!("relay_connections_displaced_total").increment(1);
        }
        metrics::gauge!("relay_devices_online").set(self.conns.len() as f64);
        // After the insert: a close either finds this connection or is seen here.
        match self.closing.load(Ordering::SeqCst) {
            0 => {}
            code => outbox.evict(code),
        }
        let catch_up = self.catch_up.subscribe();
        let catch_ups_seen = catch_up.borrow().asked;
        Registration {
            id,
            since,
            outbox,
            catch_up,
            catch_ups_seen,
        }
    }

    /// A connection of `device` that began at `since` on another node: closes this node's
    /// connection of the device if it is older (`theirs_wins` breaks a tie).
    pub fn displace_older(&self, device: &DeviceRef, since: u64, theirs_wins: bool) -> bool {
        let Some(conn) = self.conns.get(device) else {
            return false;
        };
        if conn.since < since || (conn.since == since && theirs_wins) {
            conn.outbox.evict(close::DISPLACED);
            metrics::counter!("relay_connections_displaced_total").increment(1);
            true
        } else {
            false
        }
    }

    /// Every connected device with its connection time.
    pub fn devices(&self) -> Vec<(DeviceRef, u64)> {
        self.conns
            .iter()
            .map(|c| (c.key().clone(), c.since))
            .collect()
    }

    /// Asks every session to re-read its inbox from `floor`.
    pub fn catch_up(&self, floor: u64) {
        // What the bus lost may include a logout.
        self.logouts.fetch_add(1, Ordering::SeqCst);
        self.catch_up.send_modify(|c| {
            c.asked += 1;
            if c.recent.len() == CATCH_UPS_KEPT {
                c.recent.pop_front();
            }
            c.recent.push_back(floor);
        });
        for conn in self.conns.iter() {
            conn.outbox.wake.notify_one();
        }
    }

    /// Closes every session with `code` at once, and any that registers from now on: the relay
    /// is stopping.
    pub fn close(&self, code: u16) {
        self.closing.store(code, Ordering::SeqCst);
        for conn in self.conns.iter() {
            conn.outbox.evict(code);
        }
    }

    /// Closes every connection with `code`, spread evenly over `spread` in random order, so
    /// the devices do not all reconnect elsewhere at once.
    pub async fn drain(&self, code: u16, spread: std::time::Duration) {
        let mut outboxes: Vec<Arc<Outbox>> = self.conns.iter().map(|c| c.outbox.clone()).collect();
        fastrand::shuffle(&mut outboxes);
        let start = tokio::time::Instant::now();
        let n = outboxes.len().max(1) as u32;
        for (i, outbox) in outboxes.into_iter().enumerate() {
            let at = start + spread * (i as u32) / n;
            if at > tokio::time::Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            outbox.evict(code);
        }
    }

    /// Logs out this node's connections that `target` covers and whose token the revocation
    /// at `at` (ms) revokes: each session sends the `logout` frame, waits briefly for
    /// `logout_ack`, and closes with [`close::LOGGED_OUT`]. A session of a newer login is left
    /// alone, so a stale or replayed logout signal cannot end it.
    pub fn logout(&self, target: &Target, reason: &str, signal: uuid::Uuid, at: u64) -> usize {
        self.logouts.fetch_add(1, Ordering::SeqCst);
        let mut n = 0;
        for conn in self.conns.iter() {
            let revoked = covers(at, conn.issued_at);
            if revoked && &*conn.key().user == target.user() && target.includes(&conn.key().device)
            {
                *conn.outbox.logout.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Box::new((reason.to_string(), signal)));
                conn.outbox.evict(close::LOGGED_OUT);
                n += 1;
            }
        }
        n
    }

    /// Removes the registration `id` of `device`, unless a newer connection replaced it.
    pub fn unregister(&self, device: &DeviceRef, id: u64) {
        self.conns.remove_if(device, |_, c| c.id == id);
        metrics::gauge!("relay_devices_online").set(self.conns.len() as f64);
    }

    /// When this node's connection of `device` registered (ms), if it has one.
    pub fn connected_since(&self, device: &DeviceRef) -> Option<u64> {
        self.conns.get(device).map(|c| c.since)
    }

    /// Devices connected to this node.
    pub fn online(&self) -> usize {
        self.conns.len()
    }

    /// Whether `device` is connected to this node.
    pub fn is_online(&self, device: &DeviceRef) -> bool {
        self.conns.contains_key(device)
    }
}

impl Presence for Hub {
    fn is_online(&self, device: &DeviceRef) -> bool {
        Hub::is_online(self, device)
    }
}

/// Builds the `deliver` frame for a stored message.
pub fn deliver_frame(entry: &InboxEntry) -> Utf8Bytes {
    let body = protocol::encode_body(&entry.body);
    ServerFrame::Deliver {
        id: entry.id,
        seq: entry.seq,
        ts: entry.ts,
        from: protocol::Sender {
            user: &entry.from.user,
            device: &entry.from.device,
        },
        body: &body,
        urgent: entry.urgent,
    }
    .to_json()
    .into()
}

impl DeliverySink for Hub {
    fn deliver(&self, devices: &[DeviceRef], entry: &InboxEntry) {
        let mut frame: Option<LiveFrame> = None;
        for device in devices {
            let Some(conn) = self.conns.get(device) else {
                continue;
            };
            let frame = frame
                .get_or_insert_with(|| LiveFrame::new(entry.clone()))
                .clone();
            conn.outbox.push((entry.seq, frame));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(seq: u64) -> InboxEntry {
        InboxEntry {
            seq,
            ts: 1,
            id: uuid::Uuid::nil(),
            from: DeviceRef::new("a", "a1"),
            urgent: false,
            body: Bytes::from_static(b"hi"),
        }
    }

    /// The count a session start compares moves with every logout (whoever it covers) and
    /// every catch-up (the bus may have lost one).
    #[test]
    fn logouts_and_catch_ups_move_the_count_a_session_start_compares() {
        let hub = Hub::default();
        let first = hub.logouts_taken();
        hub.register(&DeviceRef::new("u", "d"), 4, 1);
        assert_eq!(hub.logouts_taken(), first, "a registration is no logout");
        hub.logout(
            &Target::Device(DeviceRef::new("v", "d")),
            "admin",
            uuid::Uuid::nil(),
            5,
        );
        let second = hub.logouts_taken();
        assert_ne!(second, first);
        hub.catch_up(7);
        assert_ne!(hub.logouts_taken(), second);
    }

    #[test]
    fn catch_ups_a_busy_session_missed_add_up_to_the_lowest_floor() {
        let hub = Hub::default();
        hub.catch_up(7); // before the session: its replay covers it
        let mut reg = hub.register(&DeviceRef::new("u", "d"), 4, 1);
        assert_eq!(reg.next_catch_up(), None);
        // Replaying, the session reads none of these; the newest is not the lowest.
        hub.catch_up(100);
        hub.catch_up(50);
        hub.catch_up(300);
        assert_eq!(reg.next_catch_up(), Some(50));
        assert_eq!(reg.next_catch_up(), None);
        hub.catch_up(400);
        assert_eq!(reg.next_catch_up(), Some(400));
        for floor in 1_000..1_100 {
            hub.catch_up(floor);
        }
        assert_eq!(
            reg.next_catch_up(),
            Some(0),
            "more missed than are kept: the whole inbox"
        );
    }

    #[test]
    fn newer_connection_displaces_older() {
        let hub = Hub::default();
        let d = DeviceRef::new("u", "d");
        let first = hub.register(&d, 4, 1);
        let second = hub.register(&d, 4, 1);
        assert_eq!(first.outbox.evicted(), Some(close::DISPLACED));
        // The displaced session's cleanup must not remove the newer registration.
        hub.unregister(&d, first.id);
        assert!(hub.is_online(&d));
        hub.unregister(&d, second.id);
        assert!(!hub.is_online(&d));
    }

    #[test]
    fn a_logout_closes_only_sessions_whose_token_it_revokes() {
        let hub = Hub::default();
        let target = Target::User {
            user: "u".into(),
            except: Some("laptop".into()),
        };
        let old = hub.register(&DeviceRef::new("u", "phone"), 4, 100);
        // Issued before the logout by an account service whose clock runs a second ahead.
        let ahead = hub.register(&DeviceRef::new("u", "watch"), 4, 101);
        let newer = hub.register(&DeviceRef::new("u", "tablet"), 4, 103);
        let spared = hub.register(&DeviceRef::new("u", "laptop"), 4, 1);
        let other = hub.register(&DeviceRef::new("v", "phone"), 4, 1);
        assert_eq!(
            hub.logout(&target, "lost_device", uuid::Uuid::nil(), 100_500),
            2
        );
        for gone in [old, ahead] {
            assert_eq!(gone.outbox.evicted(), Some(close::LOGGED_OUT));
        }
        for kept in [newer, spared, other] {
            assert_eq!(kept.outbox.evicted(), None);
        }
    }

    #[test]
    fn a_closed_hub_evicts_every_session_and_any_that_registers_later() {
        let hub = Hub::default();
        let before = hub.register(&DeviceRef::new("u", "a"), 4, 1);
        hub.close(close::RESTART);
        // An upgrade in flight when the relay began to stop registers after the close.
        let late = hub.register(&DeviceRef::new("u", "b"), 4, 1);
        for reg in [before, late] {
            assert_eq!(reg.outbox.evicted(), Some(close::RESTART));
        }
    }

    #[test]
    fn a_logout_asked_for_is_not_replaced_by_a_later_eviction() {
        let hub = Hub::default();
        let d = DeviceRef::new("u", "d");
        let reg = hub.register(&d, 4, 1);
        hub.logout(
            &Target::Device(d.clone()),
            "lost_device",
            uuid::Uuid::nil(),
            100_000,
        );
        // The session has not acted on it yet when a newer connection or a stop comes.
        let _newer = hub.register(&d, 4, 1);
        hub.close(close::RESTART);
        assert_eq!(reg.outbox.evicted(), Some(close::LOGGED_OUT));
    }

    #[tokio::test]
    async fn one_wake_reaches_a_session_for_a_delivery_an_eviction_or_a_catch_up() {
        let hub = Hub::default();
        let d = DeviceRef::new("u", "d");
        let mut reg = hub.register(&d, 4, 1);
        let woken = |reg: &Registration| {
            futures_util::FutureExt::now_or_never(reg.outbox.wake.notified()).is_some()
        };
        assert!(!woken(&reg));
        hub.deliver(std::slice::from_ref(&d), &entry(1));
        assert!(woken(&reg), "a delivery wakes the session");
        hub.catch_up(0);
        assert!(woken(&reg), "a catch-up wakes the session");
        assert_eq!(reg.next_catch_up(), Some(0));
        assert_eq!(reg.outbox.evicted(), None);
        hub.logout(
            &Target::Device(d.clone()),
            "lost_device",
            uuid::Uuid::nil(),
            100_000,
        );
        assert!(woken(&reg), "an eviction wakes the session");
        assert_eq!(reg.outbox.evicted(), Some(close::LOGGED_OUT));
    }

    #[test]
    fn a_delivery_is_serialized_once_for_every_device_it_reaches() {
        let hub = Hub::default();
        let (a, b) = (DeviceRef::new("u", "a"), DeviceRef::new("u", "b"));
        let (ra, rb) = (hub.register(&a, 4, 1), hub.register(&b, 4, 1));
        hub.deliver(&[a, b], &entry(7));
        let (sa, fa) = ra.outbox.take(1).remove(0);
        let (sb, fb) = rb.outbox.take(1).remove(0);
        assert_eq!((sa, sb), (7, 7));
        assert_eq!(fa.frame(), deliver_frame(&entry(7)));
        // One frame, built by whichever session took it first, shared by the other.
        assert_eq!(fa.frame().as_str().as_ptr(), fb.frame().as_str().as_ptr());
    }

    #[test]
    fn full_queue_marks_overflow_without_blocking() {
        let hub = Hub::default();
        let d = DeviceRef::new("u", "d");
        let reg = hub.register(&d, 2, 1);
        for seq in 1..=3 {
            hub.deliver(std::slice::from_ref(&d), &entry(seq));
        }
        assert!(reg.outbox.overflowed.load(Ordering::Relaxed));
        let taken: Vec<u64> = reg.outbox.take(10).into_iter().map(|(s, _)| s).collect();
        assert_eq!(taken, vec![1, 2]);
        assert!(reg.outbox.take(10).is_empty());
    }
}
