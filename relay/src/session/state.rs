//! Protocol state of one session, free of IO and clocks: the driver passes `now` in, feeds it
//! the device's frames, inbox pages, live deliveries and the store's answers, and carries out
//! what it returns. Everything a device can get wrong, and every ordering the protocol promises
//! (replay then live, each sequence once, answers in send order, deadlines), is decided here and
//! tested without sockets (the two-sided harness at the bottom).
//!
//! Replay protocol: the session registers with the hub *before* reading the inbox, so a message
//! committed during replay is either read from the store or queued live (or both: the cursor
//! drops the second copy). Live deliveries wait in the hub's bounded queue until the replay
//! catches up with the store; a catch-up (deliveries lost on the cluster bus) replays again from
//! a floor.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::fanout::{Outbound, deliver_frame};
use crate::protocol::{
    self, ClientFrame, FrameError, MAX_ACKS_PER_FRAME, RejectCode, ServerFrame, close,
};
use crate::store::{Accepted, DeviceRef, InboxEntry, NewMessage, StoreError};

/// Per-session limits, from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest decoded body.
    pub max_body_bytes: usize,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Sustained sends per second.
    pub send_rate_per_s: f64,
    /// Burst above the rate.
    pub send_burst: u32,
    /// Protocol errors tolerated per minute.
    pub max_errors_per_minute: u32,
    /// Urgent messages a device may send per minute (when its token allows them at all).
    pub urgent_per_minute: u32,
    /// Refused sends (too large, bad recipients, rate limited) tolerated per minute.
    pub max_refused_per_minute: u32,
    /// Sustained bytes per second read from the device; beyond, the relay reads slower.
    pub inbound_bytes_per_s: f64,
    /// Bytes the device may send at once above that rate.
    pub inbound_burst_bytes: f64,
    /// Ping interval.
    pub ping_interval: Duration,
    /// Inactivity logoff.
    pub idle_timeout: Duration,
    /// Sends handed to the store and not answered yet; at this many, the device's frames wait.
    pub max_pipelined_sends: usize,
}

/// Whether the session is reading its inbox from the store or forwarding live deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the inbox page by page; live deliveries wait in the hub's queue.
    Replaying,
    /// Caught up: live deliveries go out as they come.
    Live,
}

/// What a page of the inbox gives the session.
#[derive(Debug, Default)]
pub struct Page {
    /// `deliver` frames to write, in order.
    pub frames: Vec<Utf8Bytes>,
    /// Entries accepted before this login: off the inbox (the archive keeps them), never
    /// delivered.
    pub before_login: Vec<u64>,
    /// The page was not full: the replay has caught up with the store, and the driver hands
    /// over what waited in the live queue ([`State::handle_caught_up`]).
    pub caught_up: bool,
}

/// The end of a session's first replay: the `synced` frame, written after every delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    /// The `synced` frame.
    pub frame: Utf8Bytes,
    /// Messages delivered by the replay.
    pub messages: u64,
    /// Since the session began.
    pub took: Duration,
}

/// How the store answered a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Durable (`duplicate`: the id was accepted before; nothing new stored).
    Accepted {
        /// The id was accepted before.
        duplicate: bool,
    },
    /// Not stored; the device may resend under the same id.
    Rejected(RejectCode),
}

/// The answer to a send, in send order.
#[derive(Debug)]
pub struct Answer {
    /// The `accepted` or `rejected` frame.
    pub frame: String,
    /// How it went.
    pub outcome: Appended,
    /// From the send to the store's answer.
    pub took: Duration,
    /// Quota bytes to give back: a send that stored nothing new costs nothing.
    pub refund: u64,
}

/// A send handed to the store, awaiting its answer.
#[derive(Debug)]
struct Outstanding {
    id: Uuid,
    started: Instant,
    bytes: u64,
}

/// What the driver must do after a frame.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Nothing to do.
    None,
    /// Store and fan out this message, then answer `accepted`/`rejected`.
    Append(NewMessage),
    /// Answer `rejected`.
    Reject(Uuid, RejectCode),
    /// Remove these entries from the inbox.
    Ack(Vec<u64>),
    /// Save (or, with `None`, remove) the device's push registration, then confirm.
    SetPushToken(Option<push::DeviceToken>),
    /// Answer an `error` frame (with the message id when known).
    Error(FrameError, String, Option<Uuid>),
    /// Close the connection.
    Close(u16, &'static str),
}

/// What a deadline asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Timeout {
    /// Nothing yet.
    None,
    /// Send a WebSocket ping.
    Ping,
    /// Inactivity logoff: send `session_expired`, then close.
    IdleLogoff,
    /// Close with this code.
    Close(u16, &'static str),
}

/// State of one authenticated session.
#[derive(Debug)]
pub struct State {
    device: DeviceRef,
    /// Shared by every session of the node (a copy would be ~100 bytes per connection).
    limits: Arc<Limits>,
    last_activity: Instant,
    last_heard: Instant,
    next_ping: Instant,
    token_expiry: Instant,
    /// Sends.
    sends: Bucket,
    /// Whether the token allows urgent messages, and their own budget.
    may_page: bool,
    urgent: Bucket,
    /// Protocol errors, and refused sends, in the current minute.
    errors: PerMinute,
    refused: PerMinute,
    /// Bytes read from the device.
    inbound: Bucket,
    delivered: Delivered,
    /// Sequences below this were accepted before this login (see [`State::start_at`]).
    login_floor: u64,
    phase: Phase,
    /// Where the inbox read continues; moved back by a catch-up.
    replay_from: u64,
    /// Sequences above this were delivered live (known once the first replay ends).
    live_after: Option<u64>,
    started: Instant,
    replayed: u64,
    /// Sends handed to the store, oldest first: answered in this order.
    outstanding: VecDeque<Outstanding>,
}

/// The window of [`PerMinute`].
const WINDOW: Duration = Duration::from_secs(60);

/// Events counted in fixed one-minute windows.
#[derive(Debug)]
struct PerMinute {
    n: u32,
    since: Instant,
}

impl PerMinute {
    fn new(now: Instant) -> Self {
        PerMinute { n: 0, since: now }
    }

    /// Counts one event at `now`; how many there were in this window, this one included.
    fn count(&mut self, now: Instant) -> u32 {
        if now >= self.since + WINDOW {
            *self = PerMinute::new(now);
        }
        self.n = self.n.saturating_add(1);
        self.n
    }
}

/// A bucket's refill: `per_s` tokens a second, at most `burst` saved up. The node's limits
/// hold it; each session's buckets hold only their level.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_s: f64,
    burst: f64,
}

impl Limits {
    fn send_rate(&self) -> Rate {
        Rate {
            per_s: self.send_rate_per_s,
            burst: f64::from(self.send_burst),
        }
    }

    fn urgent_rate(&self) -> Rate {
        Rate {
            per_s: f64::from(self.urgent_per_minute) / 60.0,
            burst: f64::from(self.urgent_per_minute),
        }
    }

    fn inbound_rate(&self) -> Rate {
        Rate {
            per_s: self.inbound_bytes_per_s,
            burst: self.inbound_burst_bytes,
        }
    }
}

/// A token bucket's level, refilled at its [`Rate`].
#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Bucket {
            level: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.level = (self.level + elapsed * rate.per_s).min(rate.burst);
    }

    /// Takes one token, if there is one.
    fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        let ok = self.level >= 1.0;
        if ok {
            self.level -= 1.0;
        }
        ok
    }

    /// Spends `n`, into debt if need be; in debt, the instant it is paid off.
    fn spend(&mut self, rate: Rate, now: Instant, n: f64) -> Option<Instant> {
        self.refill(rate, now);
        self.level -= n;
        (self.level < 0.0).then(|| now + Duration::from_secs_f64(-self.level / rate.per_s))
    }
}

/// Sequences delivered in this session, for deduplication.
///
/// With one node, sequences reach a device in increasing order and a high-water mark would do.
/// In a cluster every node issues sequences, and a message stored by a slower node can arrive
/// after a higher sequence from a faster one; so the session remembers the last
/// [`DEDUP_WINDOW`] sequences it delivered, and treats anything at or below the oldest
/// remembered one as delivered (it stays in the inbox for the next connection if not).
#[derive(Debug, Default)]
struct Delivered {
    recent: BTreeSet<u64>,
    floor: u64,
    /// Delivered in this session and not acknowledged yet (at most [`DEDUP_WINDOW`]): the only
    /// sequences an `ack` can remove, so a device's acks cost the store no more than what it
    /// was delivered, whatever it sends.
    unacked: BTreeSet<u64>,
}

/// Sequences a session remembers having delivered.
pub const DEDUP_WINDOW: usize = 1024;

/// What a frame counts for in the inbound byte budget at the least: reading, parsing and
/// answering any frame costs the relay about what a kilobyte of payload does, so a flood of
/// tiny frames is read no faster than about 4,000 a second at the default budget.
pub const MIN_FRAME_BYTES: usize = 1024;

/// The shortest pause of a reader over its byte budget: paused until just its last frame is
/// paid for, a flood of small frames woke the reader once per frame, which cost more than
/// reading the frame. The budget is the same; the frames come in bursts.
pub const MIN_PAUSE: Duration = Duration::from_millis(10);

impl State {
    /// A session for `device` whose token expires at `token_expiry`.
    pub fn new(
        device: DeviceRef,
        limits: Arc<Limits>,
        now: Instant,
        token_expiry: Instant,
    ) -> Self {
        State {
            device,
            sends: Bucket::full(limits.send_rate(), now),
            may_page: false,
            urgent: Bucket::full(limits.urgent_rate(), now),
            inbound: Bucket::full(limits.inbound_rate(), now),
            next_ping: now + limits.ping_interval,
            limits,
            last_activity: now,
            last_heard: now,
            token_expiry,
            errors: PerMinute::new(now),
            refused: PerMinute::new(now),
            delivered: Delivered::default(),
            login_floor: 0,
            phase: Phase::Replaying,
            replay_from: 0,
            live_after: None,
            started: now,
            replayed: 0,
            outstanding: VecDeque::new(),
        }
    }

    /// The authenticated device.
    pub fn device(&self) -> &DeviceRef {
        &self.device
    }

    /// Highest sequence delivered in this session.
    pub fn cursor(&self) -> u64 {
        let d = &self.delivered;
        d.recent.last().copied().unwrap_or(d.floor)
    }

    /// Records that `seq` is about to be delivered; false when it already was (live traffic that
    /// the replay covered, a bus redelivery), in which case it must be skipped.
    pub fn advance(&mut self, seq: u64) -> bool {
        if self.before_login(seq) {
            return false;
        }
        let d = &mut self.delivered;
        if seq <= d.floor || !d.recent.insert(seq) {
            return false;
        }
        d.unacked.insert(seq);
        if d.unacked.len() > DEDUP_WINDOW {
            d.unacked.pop_first(); // stays in the inbox: delivered again next session
        }
        if d.recent.len() > DEDUP_WINDOW
            && let Some(oldest) = d.recent.pop_first()
        {
            d.floor = oldest;
        }
        true
    }

    /// Replaying or live.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Where the next inbox page starts (after this sequence).
    pub fn replay_from(&self) -> u64 {
        self.replay_from
    }

    /// A page read from the inbox after [`State::replay_from`]; `full` when the read stopped at
    /// its size limits (more may follow).
    pub fn handle_page(&mut self, entries: &[InboxEntry], full: bool) -> Page {
        let mut page = Page {
            caught_up: !full,
            ..Page::default()
        };
        self.replay_from = entries.last().map_or(self.replay_from, |e| e.seq);
        for entry in entries {
            if self.before_login(entry.seq) {
                page.before_login.push(entry.seq);
            } else if self.advance(entry.seq) {
                page.frames.push(deliver_frame(entry));
            }
        }
        self.replayed += page.frames.len() as u64;
        page
    }

    /// The replay caught up with the store: what waited in the live queue is newer or a
    /// duplicate. `overflowed`: deliveries were dropped on the full queue meanwhile; they are in
    /// the store, so the replay reads on. Otherwise the session goes live, and the first time
    /// it does, [`Synced`] follows the deliveries.
    pub fn handle_caught_up(
        &mut self,
        now: Instant,
        queued: Vec<Outbound>,
        overflowed: bool,
    ) -> (Vec<Utf8Bytes>, Option<Synced>) {
        let frames = self.handle_live(queued);
        self.replayed += frames.len() as u64;
        if overflowed {
            return (frames, None);
        }
        self.phase = Phase::Live;
        if self.live_after.is_some() {
            return (frames, None);
        }
        let cursor = self.cursor();
        self.live_after = Some(cursor);
        let synced = Synced {
            frame: ServerFrame::Synced { seq: cursor }.to_json().into(),
            messages: self.replayed,
            took: now.saturating_duration_since(self.started),
        };
        (frames, Some(synced))
    }

    /// Live deliveries from the hub's queue: the frames not delivered yet.
    pub fn handle_live(&mut self, queued: Vec<Outbound>) -> Vec<Utf8Bytes> {
        queued
            .into_iter()
            .filter(|(seq, _)| self.advance(*seq))
            .map(|(_, frame)| frame.frame())
            .collect()
    }

    /// Deliveries from other nodes may have been lost (cluster bus trouble): read the inbox
    /// again from `floor`. Only while live; a replay under way reads on by itself.
    pub fn handle_catch_up(&mut self, floor: u64) {
        if self.phase == Phase::Live {
            self.replay_from = floor.min(self.replay_from);
            self.phase = Phase::Replaying;
        }
    }

    /// How `seq` reached the device, for the delivery-time metric: `live` or `replay`.
    pub fn delivery_path(&self, seq: u64) -> &'static str {
        if self.live_after.is_some_and(|c| seq > c) {
            "live"
        } else {
            "replay"
        }
    }

    /// Whether the driver may read the device's next frame: not while
    /// [`Limits::max_pipelined_sends`] sends await the store.
    pub fn may_read(&self) -> bool {
        self.outstanding.len() < self.limits.max_pipelined_sends
    }

    /// The driver handed the send `id` (`bytes` of body) to the store at `now`.
    pub fn appending(&mut self, now: Instant, id: Uuid, bytes: u64) {
        self.outstanding.push_back(Outstanding {
            id,
            started: now,
            bytes,
        });
    }

    /// The store answered the oldest outstanding send; `None` when none is outstanding.
    pub fn handle_appended(
        &mut self,
        now: Instant,
        result: Result<Accepted, StoreError>,
    ) -> Option<Answer> {
        let sent = self.outstanding.pop_front()?;
        let took = now.saturating_duration_since(sent.started);
        let (frame, outcome) = match result {
            Ok(a) => (
                ServerFrame::Accepted {
                    id: sent.id,
                    seq: a.seq,
                    ts: a.ts,
                    duplicate: a.duplicate,
                },
                Appended::Accepted {
                    duplicate: a.duplicate,
                },
            ),
            Err(e) => {
                let code = match e {
                    StoreError::Closed => RejectCode::ShuttingDown,
                    _ => RejectCode::Unavailable,
                };
                let frame = ServerFrame::Rejected {
                    id: sent.id,
                    code,
                    retry: true,
                };
                (frame, Appended::Rejected(code))
            }
        };
        let refund = match outcome {
            Appended::Accepted { duplicate: false } => 0,
            _ => sent.bytes,
        };
        Some(Answer {
            frame: frame.to_json(),
            outcome,
            took,
            refund,
        })
    }

    /// Lets this session send urgent messages (its token's `urgent` claim).
    pub fn allow_urgent(&mut self) {
        self.may_page = true;
    }

    /// Starts this login afresh at `seq`: nothing accepted before it is delivered (a new
    /// login of a device id after a logout).
    pub fn start_at(&mut self, seq: u64) {
        self.login_floor = seq;
    }

    /// Whether `seq` was accepted before this login began (see [`State::start_at`]).
    pub fn before_login(&self, seq: u64) -> bool {
        seq < self.login_floor
    }

    /// The earliest instant at which [`State::poll_timeout`] has something to do.
    pub fn next_deadline(&self) -> Instant {
        let silent_limit = self.last_heard + 2 * self.limits.ping_interval;
        self.next_ping
            .min(silent_limit)
            .min(self.last_activity + self.limits.idle_timeout)
            .min(self.token_expiry)
    }

    /// What is due at `now`.
    pub fn poll_timeout(&mut self, now: Instant) -> Timeout {
        if now >= self.token_expiry {
            return Timeout::Close(close::TOKEN_EXPIRED, "token expired");
        }
        if now >= self.last_activity + self.limits.idle_timeout {
            return Timeout::IdleLogoff;
        }
        if now >= self.last_heard + 2 * self.limits.ping_interval {
            return Timeout::Close(close::UNRESPONSIVE, "no pong");
        }
        if now >= self.next_ping {
            self.next_ping = now + self.limits.ping_interval;
            return Timeout::Ping;
        }
        Timeout::None
    }

    /// Any frame from the device (including pongs) proves the connection is alive.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// A binary frame: not part of the protocol.
    pub fn handle_binary(&mut self, now: Instant) -> Action {
        self.heard(now);
        self.error(
            now,
            FrameError::BinaryNotSupported,
            "use text frames".into(),
            None,
        )
    }

    /// A text frame.
    pub fn handle_text(&mut self, now: Instant, text: &str) -> Action {
        self.heard(now);
        match protocol::parse_client_frame(text) {
            Err((code, detail)) => self.error(now, code, detail, None),
            Ok(ClientFrame::Active) => {
                self.last_activity = now;
                Action::None
            }
            Ok(ClientFrame::Ack { seqs }) => {
                if seqs.len() > MAX_ACKS_PER_FRAME {
                    return self.error(
                        now,
                        FrameError::BadRequest,
                        format!("at most {MAX_ACKS_PER_FRAME} seqs per ack"),
                        None,
                    );
                }
                let d = &mut self.delivered;
                let seqs: Vec<u64> = seqs.into_iter().filter(|s| d.unacked.remove(s)).collect();
                if seqs.is_empty() {
                    Action::None
                } else {
                    Action::Ack(seqs)
                }
            }
            Ok(ClientFrame::PushToken {
                platform,
                token,
                environment,
                app_id,
            }) => {
                let token = push::DeviceToken {
                    platform,
                    token,
                    environment,
                    app_id,
                };
                match token.validate() {
                    Ok(()) => Action::SetPushToken(Some(token)),
                    Err(e) => self.error(now, FrameError::BadRequest, e.to_string(), None),
                }
            }
            Ok(ClientFrame::PushTokenRemove) => Action::SetPushToken(None),
            // Meaningful only to a logged-out session (see `driver::logged_out`).
            Ok(ClientFrame::LogoutAck { .. }) => Action::None,
            Ok(ClientFrame::Send {
                id,
                to,
                body,
                urgent,
            }) => {
                // Sending is what a user does: it counts as activity.
                self.last_activity = now;
                self.send(now, id, to, &body, urgent)
            }
        }
    }

    /// Reads a frame of `len` bytes from the device at `now`: when it has sent more than its
    /// byte budget, the instant until which the driver stops reading (TCP then slows the
    /// sender). A frame counts as at least [`MIN_FRAME_BYTES`].
    pub fn inbound(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let cost = len.max(MIN_FRAME_BYTES) as f64;
        let paid = self.inbound.spend(self.limits.inbound_rate(), now, cost)?;
        Some(paid.max(now + MIN_PAUSE))
    }

    /// Cheap checks first (size, recipients, rate), the base64 decode last: a refused send
    /// costs its JSON parse and no more.
    fn send(
        &mut self,
        now: Instant,
        id: Uuid,
        to: Vec<String>,
        body: &str,
        urgent: bool,
    ) -> Action {
        if protocol::decoded_len(body) > self.limits.max_body_bytes {
            return self.refuse(now, id, RejectCode::TooLarge);
        }
        if to.is_empty() || to.len() > self.limits.max_recipients {
            return self.refuse(now, id, RejectCode::BadRecipients);
        }
        if !to.iter().all(|u| protocol::valid_id(u)) {
            return self.error(
                now,
                FrameError::BadRequest,
                "recipient ids are 1-128 characters of [A-Za-z0-9._:@+-]".into(),
                Some(id),
            );
        }
        if urgent && !self.may_page {
            return self.refuse(now, id, RejectCode::UrgentNotAllowed);
        }
        if !self.sends.take(self.limits.send_rate(), now)
            || (urgent && !self.urgent.take(self.limits.urgent_rate(), now))
        {
            return self.refuse(now, id, RejectCode::RateLimited);
        }
        let Some(body) = protocol::decode_body(body) else {
            return self.error(
                now,
                FrameError::BadBase64,
                "body is not standard base64".into(),
                Some(id),
            );
        };
        let mut to = to;
        to.sort_unstable();
        to.dedup();
        Action::Append(NewMessage {
            id,
            from: self.device.clone(),
            to,
            body: Bytes::from(body),
            urgent,
        })
    }

    /// A refused send; one that keeps sending what is refused is closed with 1008.
    fn refuse(&mut self, now: Instant, id: Uuid, code: RejectCode) -> Action {
        if self.refused.count(now) > self.limits.max_refused_per_minute {
            return Action::Close(close::POLICY, "too many refused sends");
        }
        Action::Reject(id, code)
    }

    fn error(
        &mut self,
        now: Instant,
        code: FrameError,
        detail: String,
        id: Option<Uuid>,
    ) -> Action {
        if self.errors.count(now) > self.limits.max_errors_per_minute {
            return Action::Close(close::POLICY, "too many protocol errors");
        }
        Action::Error(code, detail, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::LiveFrame;

    fn limits() -> Limits {
        Limits {
            max_body_bytes: 16,
            max_recipients: 2,
            send_rate_per_s: 1.0,
            send_burst: 2,
            max_errors_per_minute: 3,
            urgent_per_minute: 2,
            max_refused_per_minute: 5,
            inbound_bytes_per_s: 1000.0,
            inbound_burst_bytes: 2000.0,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(7200),
            max_pipelined_sends: 4,
        }
    }

    #[test]
    fn urgent_messages_need_the_claim_and_have_a_budget_of_their_own() {
        let now = Instant::now();
        let urgent = |s: &mut State, t| {
            s.handle_text(
                t,
                &format!(
                    r#"{{"type":"send","id":"{}","to":["bob"],"body":"aGk=","urgent":true}}"#,
                    Uuid::new_v4()
                ),
            )
        };
        let mut s = state(now);
        assert!(matches!(
            urgent(&mut s, now),
            Action::Reject(_, RejectCode::UrgentNotAllowed)
        ));
        // Sends themselves not rate-limited here: only the urgent budget is.
        let mut s = State::new(
            DeviceRef::new("alice", "phone"),
            Arc::new(Limits {
                send_burst: 100,
                ..limits()
            }),
            now,
            now + Duration::from_secs(3600),
        );
        s.allow_urgent();
        assert!(matches!(urgent(&mut s, now), Action::Append(m) if m.urgent));
        assert!(matches!(urgent(&mut s, now), Action::Append(_)));
        assert!(matches!(
            urgent(&mut s, now),
            Action::Reject(_, RejectCode::RateLimited)
        ));
        // Normal messages are not held back by the urgent budget.
        assert!(matches!(
            s.handle_text(now, &send(r#""bob""#, "aGk=")),
            Action::Append(m) if !m.urgent
        ));
        // Two a minute: one more after 30 s.
        assert!(matches!(
            urgent(&mut s, now + Duration::from_secs(31)),
            Action::Append(_)
        ));
    }

    #[test]
    fn a_device_that_keeps_sending_what_is_refused_is_closed() {
        let now = Instant::now();
        let mut s = state(now);
        let too_big = protocol::encode_body(&[0u8; 17]);
        for _ in 0..5 {
            assert!(matches!(
                s.handle_text(now, &send(r#""bob""#, &too_big)),
                Action::Reject(_, RejectCode::TooLarge)
            ));
        }
        assert_eq!(
            s.handle_text(now, &send(r#""bob""#, &too_big)),
            Action::Close(close::POLICY, "too many refused sends")
        );
        // A minute later the count starts again.
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            s.handle_text(later, &send(r#""bob""#, &too_big)),
            Action::Reject(..)
        ));
    }

    #[test]
    fn a_rate_limited_send_is_refused_before_its_body_is_decoded() {
        let now = Instant::now();
        let mut s = state(now);
        for _ in 0..2 {
            assert!(matches!(
                s.handle_text(now, &send(r#""bob""#, "aGk=")),
                Action::Append(_)
            ));
        }
        // Invalid base64 would be an `error` if it were decoded; the rate limit answers first.
        assert!(matches!(
            s.handle_text(now, &send(r#""bob""#, "!!!!")),
            Action::Reject(_, RejectCode::RateLimited)
        ));
    }

    #[test]
    fn a_small_frame_costs_what_any_frame_costs() {
        let now = Instant::now();
        let mut s = state(now);
        assert_eq!(s.inbound(now, 10), None);
        // A second 10-byte frame at once is over the 2,000-byte burst.
        assert!(s.inbound(now, 10).is_some());
    }

    #[test]
    fn reading_pauses_when_the_byte_budget_is_spent() {
        let now = Instant::now();
        let mut s = state(now);
        assert_eq!(s.inbound(now, 1500), None);
        let until = s.inbound(now, 1100).expect("over budget");
        assert_eq!(until, now + Duration::from_millis(600));
        // Refilled by then.
        assert_eq!(s.inbound(until + Duration::from_secs(2), 1500), None);
    }

    #[test]
    fn once_over_budget_reading_pauses_long_enough_for_several_frames() {
        // At 1 MB/s a frame's debt is paid in about a millisecond; waking the reader once per
        // frame costs more than reading it, so a pause lasts at least `MIN_PAUSE`.
        let now = Instant::now();
        let mut limits = limits();
        (limits.inbound_bytes_per_s, limits.inbound_burst_bytes) = (1_000_000.0, 100_000.0);
        let mut s = State::new(DeviceRef::new("alice", "phone"), Arc::new(limits), now, now);
        let until = (0..100)
            .find_map(|_| s.inbound(now, 10))
            .expect("over budget");
        assert_eq!(until, now + MIN_PAUSE);
        // What refilled meanwhile is read without a pause.
        let frames = (0..100)
            .take_while(|_| s.inbound(until, 10).is_none())
            .count();
        assert!(frames >= 8, "{frames} frames read at the wake");
    }

    fn state(now: Instant) -> State {
        State::new(
            DeviceRef::new("alice", "phone"),
            Arc::new(limits()),
            now,
            now + Duration::from_secs(86_400),
        )
    }

    fn send(to: &str, body: &str) -> String {
        format!(
            r#"{{"type":"send","id":"{}","to":[{to}],"body":"{body}"}}"#,
            Uuid::new_v4()
        )
    }

    #[test]
    fn valid_send_becomes_append_with_deduplicated_recipients() {
        let now = Instant::now();
        let mut s = state(now);
        match s.handle_text(now, &send(r#""bob","bob""#, "aGk=")) {
            Action::Append(m) => {
                assert_eq!(m.to, vec!["bob".to_string()]);
                assert_eq!(&m.body[..], b"hi");
                assert_eq!(m.from, DeviceRef::new("alice", "phone"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sends_are_checked() {
        let now = Instant::now();
        let mut s = state(now);
        let too_big = protocol::encode_body(&[0u8; 17]);
        assert!(matches!(
            s.handle_text(now, &send(r#""bob""#, &too_big)),
            Action::Reject(_, RejectCode::TooLarge)
        ));
        assert!(matches!(
            s.handle_text(now, &send(r#""a","b","c""#, "aGk=")),
            Action::Reject(_, RejectCode::BadRecipients)
        ));
        assert!(matches!(
            s.handle_text(now, &send("", "aGk=")),
            Action::Reject(_, RejectCode::BadRecipients)
        ));
        assert!(matches!(
            s.handle_text(now, &send(r#""bob""#, "!!!")),
            Action::Error(FrameError::BadBase64, _, Some(_))
        ));
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let now = Instant::now();
        let mut s = state(now);
        let ok = |a: Action| matches!(a, Action::Append(_));
        assert!(ok(s.handle_text(now, &send(r#""bob""#, "aGk="))));
        assert!(ok(s.handle_text(now, &send(r#""bob""#, "aGk="))));
        assert!(matches!(
            s.handle_text(now, &send(r#""bob""#, "aGk=")),
            Action::Reject(_, RejectCode::RateLimited)
        ));
        let later = now + Duration::from_secs(1);
        assert!(ok(s.handle_text(later, &send(r#""bob""#, "aGk="))));
    }

    #[test]
    fn isolated_errors_survive_repeated_abuse_closes() {
        let now = Instant::now();
        let mut s = state(now);
        for _ in 0..3 {
            assert!(matches!(
                s.handle_text(now, "nope"),
                Action::Error(FrameError::BadJson, _, None)
            ));
        }
        assert_eq!(
            s.handle_text(now, "nope"),
            Action::Close(close::POLICY, "too many protocol errors")
        );
        // A new minute starts a new budget.
        let mut s = state(now);
        for i in 0..6 {
            let t = now + Duration::from_secs(30 * i);
            assert!(matches!(s.handle_binary(t), Action::Error(..)));
        }
    }

    #[test]
    fn only_what_was_delivered_and_not_yet_acked_is_acknowledged() {
        let now = Instant::now();
        let mut s = state(now);
        for seq in [10, 11, 12] {
            assert!(s.advance(seq));
        }
        assert_eq!(
            s.handle_text(now, r#"{"type":"ack","seqs":[11,12,13,999999,11]}"#),
            Action::Ack(vec![11, 12])
        );
        // Acked already, or never delivered here: nothing for the store to do.
        assert_eq!(
            s.handle_text(now, r#"{"type":"ack","seqs":[11,12,13]}"#),
            Action::None
        );
        assert_eq!(
            s.handle_text(now, r#"{"type":"ack","seqs":[10]}"#),
            Action::Ack(vec![10])
        );
        // The set is bounded: the oldest unacked fall out (they replay next session).
        for seq in 100..100 + DEDUP_WINDOW as u64 + 5 {
            s.advance(seq);
        }
        assert_eq!(s.delivered.unacked.len(), DEDUP_WINDOW);
        assert_eq!(
            s.handle_text(now, r#"{"type":"ack","seqs":[100]}"#),
            Action::None
        );
    }

    #[test]
    fn idle_logoff_counts_user_activity_not_pings_or_acks() {
        let now = Instant::now();
        let mut s = state(now);
        let idle = limits().idle_timeout;
        // Pongs and acks keep the connection alive but are not user activity.
        let mut t = now;
        while t < now + idle - Duration::from_secs(20) {
            t += Duration::from_secs(20);
            s.heard(t);
            assert_eq!(
                s.handle_text(t, r#"{"type":"ack","seqs":[]}"#),
                Action::None
            );
            let _ = s.poll_timeout(t);
        }
        assert_eq!(s.poll_timeout(now + idle), Timeout::IdleLogoff);

        let mut s = state(now);
        let halfway = now + idle / 2;
        s.heard(halfway);
        assert_eq!(s.handle_text(halfway, r#"{"type":"active"}"#), Action::None);
        s.heard(now + idle);
        assert_ne!(s.poll_timeout(now + idle), Timeout::IdleLogoff);
    }

    #[test]
    fn pings_and_silence() {
        let now = Instant::now();
        let mut s = state(now);
        let p = limits().ping_interval;
        assert_eq!(s.next_deadline(), now + p);
        assert_eq!(s.poll_timeout(now + p), Timeout::Ping);
        assert_eq!(
            s.poll_timeout(now + 2 * p),
            Timeout::Close(close::UNRESPONSIVE, "no pong")
        );
    }

    #[test]
    fn token_expiry_closes() {
        let now = Instant::now();
        let mut s = State::new(
            DeviceRef::new("a", "b"),
            Arc::new(limits()),
            now,
            now + Duration::from_secs(5),
        );
        assert_eq!(s.next_deadline(), now + Duration::from_secs(5));
        assert_eq!(
            s.poll_timeout(now + Duration::from_secs(5)),
            Timeout::Close(close::TOKEN_EXPIRED, "token expired")
        );
    }

    #[test]
    fn already_delivered_sequences_are_skipped() {
        let mut s = state(Instant::now());
        assert!(s.advance(5));
        assert!(!s.advance(5));
        assert!(s.advance(6));
        assert_eq!(s.cursor(), 6);
        // Another node's lower sequence arriving late is still delivered, once.
        assert!(s.advance(3));
        assert!(!s.advance(3));
        assert_eq!(s.cursor(), 6);
    }

    #[test]
    fn dedup_memory_is_bounded() {
        let mut s = state(Instant::now());
        for seq in 1..=(DEDUP_WINDOW as u64 + 10) {
            assert!(s.advance(seq * 2));
        }
        assert_eq!(s.delivered.recent.len(), DEDUP_WINDOW);
        assert!(!s.advance(2), "below the window counts as delivered");
        assert!(!s.advance(20));
        assert!(
            s.advance(2 * DEDUP_WINDOW as u64 + 19),
            "inside the window, never delivered"
        );
    }

    /// The two-sided harness (after quinn-proto's `Pair`): a session's [`State`] on one side;
    /// on the other, in memory, the device (what it was sent), the store (the device's inbox)
    /// and the hub's bounded live queue, with the clock in the test's hands. [`Pair::step`] is
    /// one turn of the driver's loop.
    struct Pair {
        state: State,
        now: Instant,
        inbox: std::collections::BTreeMap<u64, InboxEntry>,
        queue: Vec<Outbound>,
        queue_cap: usize,
        overflowed: bool,
        page: usize,
        /// Frames the device received in this session.
        received: Vec<serde_json::Value>,
        /// Every `deliver` the device received, over all sessions.
        delivered: Vec<u64>,
        sessions: usize,
    }

    fn entry(seq: u64) -> InboxEntry {
        InboxEntry {
            seq,
            ts: seq,
            id: Uuid::from_u64_pair(0, seq),
            from: DeviceRef::new("bob", "phone"),
            urgent: false,
            body: Bytes::from_static(b"sealed"),
        }
    }

    impl Pair {
        fn new(page: usize, queue_cap: usize) -> Pair {
            let now = Instant::now();
            Pair {
                state: state(now),
                now,
                inbox: Default::default(),
                queue: Vec::new(),
                queue_cap,
                overflowed: false,
                page,
                received: Vec::new(),
                delivered: Vec::new(),
                sessions: 1,
            }
        }

        /// A message for the device is committed: stored, and queued live unless `lost` (the
        /// cluster bus dropped it). A full queue drops it and says so.
        fn commit(&mut self, seq: u64, lost: bool) {
            self.inbox.insert(seq, entry(seq));
            if lost {
                return;
            }
            if self.queue.len() < self.queue_cap {
                self.queue.push((seq, LiveFrame::new(entry(seq))));
            } else {
                self.overflowed = true;
            }
        }

        fn receive(&mut self, frames: Vec<Utf8Bytes>) {
            for f in frames {
                let v: serde_json::Value = serde_json::from_str(&f).expect("JSON frame");
                if v["type"] == "deliver" {
                    self.delivered.push(v["seq"].as_u64().expect("seq"));
                }
                self.received.push(v);
            }
        }

        /// One turn of the driver: a page while replaying, the live queue while live. False
        /// when there was nothing to do. A live session whose queue overflowed is closed (slow
        /// consumer) and the device reconnects.
        fn step(&mut self) -> bool {
            match self.state.phase() {
                Phase::Replaying => {
                    let from = self.state.replay_from();
                    let entries: Vec<InboxEntry> = self
                        .inbox
                        .range(from + 1..)
                        .take(self.page)
                        .map(|(_, e)| e.clone())
                        .collect();
                    let full = entries.len() == self.page;
                    let page = self.state.handle_page(&entries, full);
                    for seq in &page.before_login {
                        self.inbox.remove(seq);
                    }
                    self.receive(page.frames);
                    if page.caught_up {
                        let queued = std::mem::take(&mut self.queue);
                        let overflowed = std::mem::take(&mut self.overflowed);
                        let (frames, synced) =
                            self.state.handle_caught_up(self.now, queued, overflowed);
                        self.receive(frames);
                        self.receive(synced.map(|s| s.frame).into_iter().collect());
                    }
                    true
                }
                Phase::Live if self.overflowed => {
                    self.reconnect();
                    true
                }
                Phase::Live if self.queue.is_empty() => false,
                Phase::Live => {
                    let queued = std::mem::take(&mut self.queue);
                    let frames = self.state.handle_live(queued);
                    self.receive(frames);
                    true
                }
            }
        }

        /// Steps until nothing is left to do.
        fn settle(&mut self) {
            let mut turns = 0;
            while self.step() {
                turns += 1;
                assert!(turns < 10_000, "the session never settles");
            }
        }

        /// The device acks everything it was delivered in this session; the store applies it.
        fn ack_all(&mut self) {
            let seqs: Vec<u64> = self
                .received
                .iter()
                .filter(|f| f["type"] == "deliver")
                .filter_map(|f| f["seq"].as_u64())
                .collect();
            let frame = serde_json::json!({"type": "ack", "seqs": seqs}).to_string();
            if let Action::Ack(seqs) = self.state.handle_text(self.now, &frame) {
                for s in seqs {
                    self.inbox.remove(&s);
                }
            }
        }

        /// The session ends and the device connects again: a new state, the same inbox, and a
        /// live queue that starts empty.
        fn reconnect(&mut self) {
            self.state = state(self.now);
            self.queue.clear();
            self.overflowed = false;
            self.received.clear();
            self.sessions += 1;
        }

        /// The `synced` frames of this session, with their positions among its frames.
        fn synced(&self) -> Vec<(usize, u64)> {
            self.received
                .iter()
                .enumerate()
                .filter(|(_, f)| f["type"] == "synced")
                .map(|(i, f)| (i, f["seq"].as_u64().expect("seq")))
                .collect()
        }
    }

    #[test]
    fn a_message_committed_during_replay_is_delivered_once_whether_read_or_queued() {
        let mut pair = Pair::new(2, 100);
        for seq in 1..=3 {
            pair.commit(seq, true); // before the session: stored only
        }
        assert!(pair.step()); // page 1-2 (full)
        pair.commit(4, false); // stored and queued live while the replay reads
        pair.commit(5, false);
        pair.settle();
        assert_eq!(pair.delivered, [1, 2, 3, 4, 5]);
        let synced = pair.synced();
        assert_eq!(synced.len(), 1, "{:?}", pair.received);
        assert_eq!(synced[0], (5, 5), "synced follows everything replayed");
        // Later ones go live.
        pair.commit(6, false);
        pair.settle();
        assert_eq!(pair.delivered, [1, 2, 3, 4, 5, 6]);
        assert_eq!(pair.state.delivery_path(6), "live");
        assert_eq!(pair.state.delivery_path(5), "replay");
    }

    #[test]
    fn a_catch_up_replays_what_the_bus_lost_and_nothing_twice() {
        let mut pair = Pair::new(3, 100);
        pair.settle();
        assert_eq!(pair.synced(), [(0, 0)]);
        pair.commit(1, false);
        pair.commit(2, true); // lost on the bus
        pair.commit(3, false);
        pair.settle();
        assert_eq!(pair.delivered, [1, 3]);
        pair.state.handle_catch_up(0);
        assert_eq!(pair.state.phase(), Phase::Replaying);
        pair.settle();
        assert_eq!(pair.delivered, [1, 3, 2], "2 found, 1 and 3 not again");
        assert_eq!(pair.synced().len(), 1, "synced is sent once per session");
        // While replaying, a catch-up changes nothing (the replay reads on by itself).
        pair.state.handle_catch_up(0);
        pair.commit(4, true);
        pair.state.handle_catch_up(3);
        pair.settle();
        assert_eq!(pair.delivered, [1, 3, 2, 4]);
    }

    #[test]
    fn what_was_accepted_before_this_login_is_taken_off_the_inbox_and_never_delivered() {
        let mut pair = Pair::new(2, 100);
        for seq in [10, 20, 30, 40] {
            pair.commit(seq, true);
        }
        pair.state.start_at(25);
        pair.settle();
        assert_eq!(pair.delivered, [30, 40]);
        assert_eq!(pair.inbox.keys().copied().collect::<Vec<_>>(), [30, 40]);
        assert_eq!(pair.synced(), [(2, 40)]);
    }

    #[test]
    fn a_queue_that_overflowed_during_replay_is_read_from_the_store_again() {
        let mut pair = Pair::new(1, 1);
        pair.commit(1, true);
        assert!(pair.step()); // page [1], full: more may follow
        pair.commit(2, false); // queued
        pair.commit(3, false); // the queue is full: dropped, but stored
        assert!(pair.step()); // page [2], full
        assert!(pair.step()); // page [3], full
        assert!(pair.step()); // empty page: caught up, but the queue overflowed: read on
        assert_eq!(pair.state.phase(), Phase::Replaying);
        pair.settle();
        assert_eq!(pair.delivered, [1, 2, 3]);
        assert_eq!(pair.synced().len(), 1);
    }

    /// Any interleaving of commits (some lost on the bus, some overflowing the queue), driver
    /// turns, acks and catch-ups delivers every message exactly once (acked at once, so a
    /// reconnect has nothing to redeliver), in order within a session unless the bus lost one,
    /// with one `synced` per session that no earlier message follows.
    #[test]
    fn every_interleaving_delivers_each_message_once() {
        for seed in 1..=400u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut pair = Pair::new(1 + (next() % 4) as usize, 1 + (next() % 5) as usize);
            let mut seq = 0;
            let mut lost_any = false;
            for _ in 0..(next() % 6) {
                seq += 1;
                pair.commit(seq, true);
            }
            let check_session = |pair: &Pair, lost_any: bool| {
                let synced = pair.synced();
                assert!(synced.len() <= 1, "seed {seed}: {:?}", pair.received);
                let seqs: Vec<u64> = pair
                    .received
                    .iter()
                    .filter(|f| f["type"] == "deliver")
                    .filter_map(|f| f["seq"].as_u64())
                    .collect();
                if !lost_any {
                    assert!(
                        seqs.windows(2).all(|w| w[0] < w[1]),
                        "seed {seed}: {seqs:?}"
                    );
                }
                if let Some(&(at, cursor)) = synced.first() {
                    for f in &pair.received[..at] {
                        assert!(
                            f["seq"].as_u64().is_some_and(|s| s <= cursor),
                            "seed {seed}"
                        );
                    }
                }
            };
            for _ in 0..60 {
                match next() % 6 {
                    0 | 1 => {
                        seq += 1;
                        let lost = next() % 5 == 0;
                        lost_any |= lost;
                        pair.commit(seq, lost);
                    }
                    2 | 3 => {
                        let sessions = pair.sessions;
                        check_session(&pair, lost_any);
                        pair.step();
                        if pair.sessions != sessions {
                            lost_any = false;
                        }
                    }
                    4 => pair.ack_all(),
                    _ => pair.state.handle_catch_up(next() % (seq + 1)),
                }
                pair.ack_all();
            }
            pair.settle();
            check_session(&pair, lost_any);
            pair.state.handle_catch_up(0); // whatever the bus lost, found by a last catch-up
            pair.settle();
            pair.ack_all();
            let mut delivered = pair.delivered.clone();
            delivered.sort_unstable();
            assert_eq!(
                delivered,
                (1..=seq).collect::<Vec<_>>(),
                "seed {seed}: each message exactly once"
            );
            assert!(pair.inbox.is_empty(), "seed {seed}: acked all");
        }
    }

    #[test]
    fn sends_are_answered_in_order_and_reading_waits_at_the_pipeline_limit() {
        let mut now = Instant::now();
        let mut st = state(now);
        let mut ids = Vec::new();
        for _ in 0..4 {
            assert!(st.may_read());
            now += Duration::from_secs(1); // within the send rate
            let Action::Append(msg) = st.handle_text(now, &send("\"bob\"", "aGk=")) else {
                panic!("not an append");
            };
            st.appending(now, msg.id, msg.body.len() as u64);
            ids.push(msg.id);
        }
        assert!(!st.may_read(), "four sends await the store");
        let later = now + Duration::from_millis(5);
        let answers: Vec<Answer> = [
            Ok(Accepted {
                seq: 7,
                ts: 1,
                duplicate: false,
            }),
            Ok(Accepted {
                seq: 3,
                ts: 1,
                duplicate: true,
            }),
            Err(StoreError::Unavailable("down".into())),
            Err(StoreError::Closed),
        ]
        .into_iter()
        .map(|r| st.handle_appended(later, r).expect("outstanding"))
        .collect();
        assert!(st.may_read());
        assert!(st.handle_appended(later, Err(StoreError::Closed)).is_none());
        let frames: Vec<serde_json::Value> = answers
            .iter()
            .map(|a| serde_json::from_str(&a.frame).expect("json"))
            .collect();
        for (f, id) in frames.iter().zip(&ids) {
            assert_eq!(f["id"], id.to_string(), "answers in send order");
        }
        assert_eq!(frames[0]["type"], "accepted");
        assert_eq!(frames[1]["duplicate"], true);
        assert_eq!(
            (frames[2]["code"].clone(), frames[2]["retry"].clone()),
            (serde_json::json!("unavailable"), serde_json::json!(true))
        );
        assert_eq!(frames[3]["code"], "shutting_down");
        // Only what stored something new keeps its quota.
        let refunds: Vec<u64> = answers.iter().map(|a| a.refund).collect();
        assert_eq!(refunds, [0, 2, 2, 2]);
        let took: Vec<Duration> = answers.iter().map(|a| a.took).collect();
        let ms = Duration::from_millis;
        assert_eq!(took, [ms(3005), ms(2005), ms(1005), ms(5)]);
    }
}
