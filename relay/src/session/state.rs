//! Protocol state of one session, free of IO and clocks: the driver passes `now` in and carries
//! out the [`Action`]s. Everything a device can get wrong is decided here and unit-tested
//! without sockets.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use crate::protocol::{self, ClientFrame, FrameError, MAX_ACKS_PER_FRAME, RejectCode, close};
use crate::store::{DeviceRef, NewMessage};

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
    limits: Limits,
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
}

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
        if now >= self.since + Duration::from_secs(60) {
            *self = PerMinute::new(now);
        }
        self.n = self.n.saturating_add(1);
        self.n
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn full(rate: f64, burst: f64, now: Instant) -> Self {
        Bucket {
            level: burst,
            at: now,
            rate,
            burst,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.level = (self.level + elapsed * self.rate).min(self.burst);
    }

    /// Takes one token, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        let ok = self.level >= 1.0;
        if ok {
            self.level -= 1.0;
        }
        ok
    }

    /// Spends `n`, into debt if need be; in debt, the instant it is paid off.
    fn spend(&mut self, now: Instant, n: f64) -> Option<Instant> {
        self.refill(now);
        self.level -= n;
        (self.level < 0.0).then(|| now + Duration::from_secs_f64(-self.level / self.rate))
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

impl State {
    /// A session for `device` whose token expires at `token_expiry`.
    pub fn new(device: DeviceRef, limits: Limits, now: Instant, token_expiry: Instant) -> Self {
        State {
            device,
            sends: Bucket::full(limits.send_rate_per_s, f64::from(limits.send_burst), now),
            may_page: false,
            urgent: Bucket::full(
                f64::from(limits.urgent_per_minute) / 60.0,
                f64::from(limits.urgent_per_minute),
                now,
            ),
            inbound: Bucket::full(limits.inbound_bytes_per_s, limits.inbound_burst_bytes, now),
            next_ping: now + limits.ping_interval,
            limits,
            last_activity: now,
            last_heard: now,
            token_expiry,
            errors: PerMinute::new(now),
            refused: PerMinute::new(now),
            delivered: Delivered::default(),
            login_floor: 0,
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

    /// Reads `len` more bytes from the device at `now`: when it has sent more than its byte
    /// budget, the instant until which the driver stops reading (TCP then slows the sender).
    pub fn inbound(&mut self, now: Instant, len: usize) -> Option<Instant> {
        self.inbound.spend(now, len as f64)
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
        if !self.sends.take(now) || (urgent && !self.urgent.take(now)) {
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
        let mut s = state(now);
        s.sends = Bucket::full(1.0, 100.0, now);
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
    fn reading_pauses_when_the_byte_budget_is_spent() {
        let now = Instant::now();
        let mut s = state(now);
        assert_eq!(s.inbound(now, 1500), None);
        let until = s.inbound(now, 1000).expect("over budget");
        assert_eq!(until, now + Duration::from_millis(500));
        // Refilled by then.
        assert_eq!(s.inbound(until + Duration::from_secs(1), 500), None);
    }

    fn state(now: Instant) -> State {
        State::new(
            DeviceRef::new("alice", "phone"),
            limits(),
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
            limits(),
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
}
