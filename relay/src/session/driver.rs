//! Drives one WebSocket session: the IO around [`State`]. It feeds the state the device's
//! frames, deadlines, inbox pages, live deliveries and the store's answers, and carries out what
//! the state decides against the socket, the store and the hub. Every write has the write
//! timeout (`write`); in a running session one that fails closes the device as a slow
//! consumer (`Io::send`).
//!
//! Replay reads a page bounded in entries and bytes, paid for from the node's replay memory
//! before it is read, and writes it a frame or so at a time, each write within the write timeout,
//! reading the device's frames (its acks) in between: a slow reader is slow, never cut off.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::SessionContext;
use super::budget::{Held, REPLAY_PAGE_BYTES, ReplayMemory};
use super::socket::{Incoming, ReadError, Socket};
use super::state::{Action, Answer, Appended, Phase, State, Timeout};
use crate::access::{Opening, Start};
use crate::auth::Identity;
use crate::fanout::Registration;
use crate::protocol::{self, RejectCode, ServerFrame, close};
use crate::store::{Accepted, AppendTicket, DeviceRef, MessageStore, StoreError};

/// Most inbox entries read per replay step (pages end sooner at [`REPLAY_PAGE_BYTES`]).
const REPLAY_PAGE: usize = 128;
/// Frames written per write, beyond the first: each write has the whole write timeout.
const WRITE_CHUNK_BYTES: usize = 64 * 1024;
/// Live deliveries taken from the queue at once.
const LIVE_BATCH: usize = 64;
/// Longest wait for the peer's answer to our close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);
/// Longest time a session trusts its token's `exp` for (ten years).
const MAX_TOKEN_LEFT_S: u64 = 10 * 365 * 86_400;

/// What a frame is answered with.
enum Reply {
    Frame(String),
    /// Saved (or removed) first: its answer says whether it was.
    PushToken(Option<push::DeviceToken>),
}

/// Why a session ended, for logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// Close code sent, if any.
    pub code: Option<u16>,
    /// Short reason.
    pub reason: &'static str,
}

type Ws<S> = Socket<S>;

/// Room in the node's replay memory being waited for; kept across loop turns so the session keeps
/// its place in line while it reads frames.
type Reserving<'a> = Option<Pin<Box<dyn Future<Output = Held> + Send + 'a>>>;

/// A device admitted at its upgrade: its token's identity, and the access read its session may
/// start on. Passed by one reference, as every open connection's task holds what it is given.
pub struct Admission {
    /// Who the token says the device is.
    pub identity: Identity,
    /// From the upgrade's access check.
    pub opening: Option<Opening>,
    /// The check found the device seen lately, with its token's organisation: its connect is
    /// not recorded ([`crate::access::seen_lately`]).
    pub seen_lately: bool,
}

/// Runs a session to its end. Never panics on network input; every exit path closes the socket.
pub async fn run<S>(ws: &mut Ws<S>, ctx: &SessionContext, admission: &Admission) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let identity = &admission.identity;
    let device = &identity.device;
    let now = Instant::now();
    // Bounded so that no `exp` can overflow the clock (the verifier caps lifetimes too).
    let token_left = Duration::from_secs(
        identity
            .expires_at
            .saturating_sub(crate::store::now_ms() / 1000)
            .min(MAX_TOKEN_LEFT_S),
    );
    let mut state = State::new(device.clone(), ctx.limits.clone(), now, now + token_left);
    if identity.may_page {
        state.allow_urgent();
    }
    let mut reg = ctx
        .hub
        .register(device, ctx.outbound_queue, identity.issued_at);
    if let Some(pager) = &ctx.pager {
        pager.online(device);
    }

    // Labeled blocks rather than matches over awaited results: a match's scrutinee would live
    // across the session's await, in every connection's memory.
    let ended = 'registered: {
        if let Err(e) = ctx.store.register_device(device.clone()).await {
            tracing::warn!(error = %e, "device registration failed");
            break 'registered store_unavailable();
        }
        if let Some(cluster) = &ctx.cluster {
            cluster.attach(device, reg.since).await;
        }
        let ended = 'started: {
            // The revocation is boxed out of the awaited result, so that neither lives across
            // the logout's await (nor takes room beside the session's).
            let start = match ctx
                .access
                .session_start(device, identity.issued_at, admission.opening)
                .await
            {
                Ok(Start::Open { floor_ms }) => Ok(floor_ms),
                Ok(Start::LoggedOut(r)) => Err(Box::new(r)),
                Ok(Start::Locked) => {
                    break 'started Ended {
                        code: Some(close::LOGGED_OUT),
                        reason: "account locked",
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "access check at registration failed");
                    break 'started store_unavailable();
                }
            };
            let floor_ms = match start {
                Ok(floor_ms) => floor_ms,
                Err(r) => {
                    break 'started logout_phase(ws, ctx, device, &r.reason, r.signal, "live")
                        .await;
                }
            };
            if !admission.seen_lately {
                ctx.last_seen.record(
                    device,
                    identity
                        .org
                        .as_deref()
                        .map(|o| (o.into(), identity.issued_at)),
                );
            }
            state.start_at(crate::store::seq_floor(floor_ms));
            session(ws, ctx, &mut state, &mut reg).await
        };
        if let Some(cluster) = &ctx.cluster {
            cluster.detach(device, reg.since).await;
        }
        // Only here, past the registration: a last-seen time tells the ScyllaDB store the
        // device is registered (`Change::Seen`).
        ctx.last_seen.record(device, None);
        ended
    };
    ctx.hub.unregister(device, reg.id);
    if let Some(code) = ended.code {
        close_with(ws, code, ended.reason, ctx.write_timeout).await;
    }
    ended
}

/// A session past its access check: `hello`, the replay, then live traffic until it ends.
async fn session<S>(
    ws: &mut Ws<S>,
    ctx: &SessionContext,
    state: &mut State,
    reg: &mut Registration,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Serialized in a block of its own: the frame need not live across the write.
    let hello = {
        let frame = ServerFrame::Hello {
            v: protocol::VERSION,
            user: &state.device().user,
            device: &state.device().device,
            idle_timeout_s: ctx.limits.idle_timeout.as_secs(),
            max_body_bytes: ctx.limits.max_body_bytes,
            max_recipients: ctx.limits.max_recipients,
        };
        Utf8Bytes::from(frame.to_json())
    };
    let mut io = Io {
        acks: Acks::new(&ctx.store, &ctx.tasks, state.device().clone()),
        ws,
        ctx,
        state,
        tickets: VecDeque::new(),
        out: VecDeque::from([hello]),
        page_held: None,
    };
    // The first page joins `hello` when its memory is free now: one write for `hello`, the
    // page and, for most connects, `synced`. Otherwise `hello` goes out first, as the loop
    // writes whatever waits before it waits for memory.
    let first = ctx
        .replay_memory
        .try_reserve(page_estimate(ctx), REPLAY_PAGE);
    let ended = match first {
        Some(held) => match io.replay_page(reg, held).await {
            Ok(()) => None,
            // As when `hello` went out on its own: the device has it before the close.
            Err(ended) => {
                let hello = io.out.pop_front().into_iter().collect();
                Some(io.send(hello).await.err().unwrap_or(ended))
            }
        },
        None => None,
    };
    match ended {
        Some(ended) => ended,
        None => match io.run(reg).await {
            Ok(never) => match never {},
            Err(ended) => ended,
        },
    }
}

/// What one replay page may hold: its bodies and at least one message of the largest size.
fn page_estimate(ctx: &SessionContext) -> usize {
    REPLAY_PAGE_BYTES + ctx.limits.max_body_bytes
}

/// The IO of a running session: the socket, the store's tickets and acks, and the frames
/// waiting to be written. Every decision is the [`State`]'s.
struct Io<'a, S> {
    ws: &'a mut Ws<S>,
    ctx: &'a SessionContext,
    state: &'a mut State,
    /// The store's answers to outstanding sends, in send order (the state holds their ids).
    tickets: VecDeque<AppendTicket>,
    acks: Acks<'a>,
    /// Frames not written yet, and the replay memory the replayed ones hold.
    out: VecDeque<Utf8Bytes>,
    page_held: Option<Held>,
}

fn slow_consumer(reason: &'static str) -> Ended {
    Ended {
        code: Some(close::SLOW_CONSUMER),
        reason,
    }
}

fn store_unavailable() -> Ended {
    Ended {
        code: Some(close::TRY_AGAIN_LATER),
        reason: "store unavailable",
    }
}

impl<'a, S> Io<'a, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Runs until the session ends; the `Err` says how.
    async fn run(&mut self, reg: &mut Registration) -> Result<Infallible, Ended> {
        let ctx = self.ctx;
        let mut reserving: Reserving<'a> = None;
        let page_estimate = page_estimate(ctx);
        // The outbox woke the session for deliveries not taken yet (taken once it is live and
        // its writes are done: the queue's bound is the backpressure).
        let mut live_waiting = false;
        loop {
            let deadline = tokio::time::Instant::from_std(self.state.next_deadline());
            let replaying = self.state.phase() == Phase::Replaying;
            let reading = self.state.may_read();
            // A catch-up asked for during the replay waits for its end.
            if !replaying
                && reg.catch_up.has_changed().unwrap_or(false)
                && let Some(floor) = reg.next_catch_up()
            {
                self.state.handle_catch_up(floor);
                continue;
            }
            tokio::select! {
                biased;
                // Every signal of the hub: an eviction (displaced, logged out, the relay
                // stopping), a delivery, a catch-up (seen above, on the next turn).
                _ = reg.outbox.wake.notified() => {
                    if reg.outbox.evicted().is_some() {
                        // Boxed: rare, and larger than the idle wait every connection holds.
                        return Err(Box::pin(self.evicted(reg)).await);
                    }
                    live_waiting = true;
                }
                result = self.acks.applied() => result.map_err(|_| store_unavailable())?,
                result = next_reply(&mut self.tickets) => {
                    self.tickets.pop_front();
                    self.answer(result).await?;
                }
                incoming = self.ws.next(), if reading => self.on_frame(incoming).await?,
                _ = tokio::time::sleep_until(deadline) => self.on_deadline().await?,
                _ = std::future::ready(()), if !self.out.is_empty() => {
                    self.write_out(!replaying && reg.outbox.overflowed.load(Ordering::Relaxed)).await?;
                }
                held = reserve(&mut reserving, &ctx.replay_memory, page_estimate), if replaying && self.out.is_empty() => {
                    self.replay_page(reg, held).await?;
                }
                _ = std::future::ready(()), if live_waiting && !replaying && self.out.is_empty() => {
                    live_waiting = false;
                    let frames = self.state.handle_live(reg.outbox.take(LIVE_BATCH));
                    metrics::counter!("relay_messages_delivered_total", "path" => "live").increment(frames.len() as u64);
                    self.out.extend(frames);
                }
            }
        }
    }

    /// Writes frames within the write timeout; a device that does not read them is closed.
    /// Not an `async fn`, for the reason `write` is not.
    fn send(&mut self, frames: Vec<Utf8Bytes>) -> impl Future<Output = Result<(), Ended>> + '_ {
        write(self.ws, frames, self.ctx.write_timeout)
            .map(|r| r.map_err(|()| slow_consumer("write timed out")))
    }

    /// The hub evicted the session: displaced, logged out, or the relay stopping.
    async fn evicted(&mut self, reg: &Registration) -> Ended {
        self.finish_pending().await;
        let code = reg.outbox.evicted().unwrap_or(close::RESTART);
        let logout = reg
            .outbox
            .logout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|b| *b);
        if let (close::LOGGED_OUT, Some((reason, signal))) = (code, logout) {
            let device = self.state.device().clone();
            return logout_phase(self.ws, self.ctx, &device, &reason, signal, "live").await;
        }
        let reason = if code == close::RESTART {
            "relay restarting"
        } else {
            "displaced by a newer connection"
        };
        Ended {
            code: Some(code),
            reason,
        }
    }

    /// The store answered the oldest outstanding send. The answers to the sends after it that
    /// the same commit settled go out in the same write: one syscall per commit, not per send.
    async fn answer(&mut self, result: Result<Accepted, StoreError>) -> Result<(), Ended> {
        let now = Instant::now();
        let mut frames = Vec::new();
        let mut next = Some(result);
        while let Some(result) = next.take() {
            if let Some(answer) = self.state.handle_appended(now, result) {
                frames.push(self.settle(answer).into());
            }
            if let Some(ready) = self.tickets.front_mut().and_then(|t| t.now_or_never()) {
                self.tickets.pop_front();
                next = Some(ready.unwrap_or(Err(StoreError::Closed)));
            }
        }
        if frames.is_empty() {
            return Ok(());
        }
        self.send(frames).await
    }

    /// Quota and metrics of an answered send; its frame.
    fn settle(&self, answer: Answer) -> String {
        if answer.refund > 0 {
            let user = &self.state.device().user;
            self.ctx
                .quota
                .refund(user, answer.refund, crate::store::now_ms());
        }
        match answer.outcome {
            Appended::Accepted { duplicate } => {
                metrics::histogram!("relay_accept_duration_seconds")
                    .record(answer.took.as_secs_f64());
                if duplicate {
                    metrics::counter!("relay_messages_duplicate_total").increment(1);
                } else {
                    metrics::counter!("relay_messages_accepted_total").increment(1);
                }
            }
            Appended::Rejected(code) => {
                metrics::counter!("relay_messages_rejected_total", "code" => code.code())
                    .increment(1);
            }
        }
        answer.frame
    }

    /// On shutdown: the store finishes every queued append; tell the device how each ended.
    async fn finish_pending(&mut self) {
        let mut frames = Vec::new();
        while let Some(mut ticket) = self.tickets.pop_front() {
            let result = (&mut ticket).await.unwrap_or(Err(StoreError::Closed));
            if let Some(answer) = self.state.handle_appended(Instant::now(), result) {
                frames.push(self.settle(answer).into());
            }
        }
        let _ = write(self.ws, frames, self.ctx.write_timeout).await;
    }

    /// One message (or the end) from the device. An `async` block (as is `reply`), not an
    /// `async fn`, which would keep its argument twice: the largest future the session's loop
    /// awaits sizes every connection's task, idle or not.
    #[allow(clippy::manual_async_fn)] // deliberately not an `async fn`: see above
    fn on_frame(
        &mut self,
        incoming: Option<Result<Incoming, ReadError>>,
    ) -> impl Future<Output = Result<(), Ended>> {
        async move {
            let now = Instant::now();
            let rejected = |reason: &'static str, code: u16, why: &'static str| {
                metrics::counter!("relay_frames_rejected_total", "reason" => reason).increment(1);
                Ended {
                    code: Some(code),
                    reason: why,
                }
            };
            let (action, pause_until) = match incoming {
                None => {
                    return Err(Ended {
                        code: None,
                        reason: "connection closed",
                    });
                }
                Some(Err(ReadError::TooBig(_))) => {
                    return Err(rejected("too_big", close::TOO_BIG, "frame too big"));
                }
                Some(Err(ReadError::Utf8)) => {
                    return Err(rejected(
                        "invalid_utf8",
                        close::INVALID_DATA,
                        "text frame is not utf-8",
                    ));
                }
                Some(Err(ReadError::Protocol(_))) => {
                    return Err(rejected(
                        "protocol_error",
                        close::PROTOCOL_ERROR,
                        "websocket protocol error",
                    ));
                }
                Some(Err(ReadError::Io(_))) => {
                    return Err(Ended {
                        code: None,
                        reason: "io error",
                    });
                }
                Some(Ok(Incoming::Text(text))) => {
                    let pause = self.state.inbound(now, text.len());
                    (self.state.handle_text(now, &text), pause)
                }
                Some(Ok(Incoming::Binary(len))) => {
                    let pause = self.state.inbound(now, len);
                    (self.state.handle_binary(now), pause)
                }
                Some(Ok(Incoming::Close)) => {
                    // The socket queued the close reply; push it out.
                    let _ = tokio::time::timeout(self.ctx.write_timeout, self.ws.flush()).await;
                    return Err(Ended {
                        code: None,
                        reason: "client closed",
                    });
                }
                Some(Ok(Incoming::Ping | Incoming::Pong | Incoming::Fragment)) => {
                    self.state.heard(now); // a ping is answered by the socket
                    // A control frame's payload is at most 125 bytes, and a fragment's bytes
                    // count with its message's: each counts as the least a frame does.
                    (Action::None, self.state.inbound(now, 0))
                }
            };
            // Over its byte budget: stop reading for a moment (until paid for, and at least
            // `MIN_PAUSE`); TCP slows the sender, and nobody else waits for it.
            if let Some(until) = pause_until {
                metrics::counter!("relay_inbound_paused_total").increment(1);
                tokio::time::sleep_until(until.into()).await;
            }
            // The answer's temporaries end with this statement, not across the write.
            let reply = match self.act(now, action)? {
                None => return Ok(()),
                Some(reply) => reply,
            };
            self.reply(reply).await
        }
    }

    /// Carries out what the state decided about a frame, up to the answer to write. Not `async`:
    /// an action is large, and what a session awaits is part of every connection's memory.
    fn act(&mut self, now: Instant, action: Action) -> Result<Option<Reply>, Ended> {
        let ctx = self.ctx;
        // The account's daily storage quota is shared by its sessions: checked here.
        let action = match action {
            Action::Append(msg)
                if !ctx.quota.reserve(
                    &msg.from.user,
                    msg.body.len() as u64,
                    crate::store::now_ms(),
                ) =>
            {
                Action::Reject(msg.id, RejectCode::QuotaExceeded)
            }
            action => action,
        };
        let frame = match action {
            Action::None => return Ok(None),
            Action::Close(code, reason) => {
                return Err(Ended {
                    code: Some(code),
                    reason,
                });
            }
            Action::Append(msg) => {
                self.state.appending(now, msg.id, msg.body.len() as u64);
                self.tickets.push_back(ctx.store.append(msg));
                return Ok(None);
            }
            Action::Ack(seqs) => {
                metrics::counter!("relay_messages_acked_total").increment(seqs.len() as u64);
                // The accept time is in the seq: accept → device ack, the delivery SLO.
                let now_ms = crate::store::now_ms();
                for &seq in &seqs {
                    let accepted = crate::store::seq_time_ms(seq);
                    if accepted <= now_ms {
                        let path = self.state.delivery_path(seq);
                        metrics::histogram!("relay_delivery_duration_seconds", "path" => path)
                            .record((now_ms - accepted) as f64 / 1000.0);
                    }
                }
                self.acks.add(seqs);
                return Ok(None);
            }
            Action::Reject(id, code) => {
                metrics::counter!("relay_messages_rejected_total", "code" => code.code())
                    .increment(1);
                ServerFrame::Rejected {
                    id,
                    code,
                    retry: code.retryable(),
                }
                .to_json()
            }
            Action::SetPushToken(token) => return Ok(Some(Reply::PushToken(token))),
            Action::Error(code, detail, id) => {
                metrics::counter!("relay_frames_rejected_total", "reason" => code.code())
                    .increment(1);
                ServerFrame::Error {
                    code,
                    message: &detail,
                    id,
                }
                .to_json()
            }
        };
        Ok(Some(Reply::Frame(frame)))
    }

    /// Writes the answer to a frame (saving a push token first).
    #[allow(clippy::manual_async_fn)] // not an `async fn`: see `on_frame`
    fn reply(&mut self, reply: Reply) -> impl Future<Output = Result<(), Ended>> {
        async move {
            let frame = match reply {
                Reply::Frame(frame) => frame,
                Reply::PushToken(token) => {
                    match set_push_token(self.ctx, self.state.device(), token).await {
                        Ok(registered) => ServerFrame::PushTokenSaved { registered }.to_json(),
                        Err((code, detail)) => ServerFrame::Error {
                            code,
                            message: &detail,
                            id: None,
                        }
                        .to_json(),
                    }
                }
            };
            self.send(vec![frame.into()]).await
        }
    }

    /// A deadline of the state's came due.
    async fn on_deadline(&mut self) -> Result<(), Ended> {
        match self.state.poll_timeout(Instant::now()) {
            Timeout::None => Ok(()),
            Timeout::Ping => {
                self.ws.feed_ping();
                self.send(Vec::new()).await
            }
            Timeout::IdleLogoff => {
                metrics::counter!("relay_idle_logoffs_total").increment(1);
                let frame = ServerFrame::SessionExpired {
                    idle_timeout_s: self.ctx.limits.idle_timeout.as_secs(),
                };
                let _ = self.send(vec![frame.to_json().into()]).await;
                Err(Ended {
                    code: Some(close::SESSION_EXPIRED),
                    reason: "session expired",
                })
            }
            Timeout::Close(code, reason) => Err(Ended {
                code: Some(code),
                reason,
            }),
        }
    }

    /// Replayed and live frames, a frame or so per write, each write within the timeout. Live
    /// deliveries dropped on a full queue (`overflowed`) are lost to this session: it must
    /// reconnect and replay them (during replay they are read from the store again).
    async fn write_out(&mut self, overflowed: bool) -> Result<(), Ended> {
        let mut frames = Vec::new();
        let mut bytes = 0;
        while let Some(frame) = self.out.front() {
            if !frames.is_empty() && bytes + frame.len() > WRITE_CHUNK_BYTES {
                break;
            }
            bytes += frame.len();
            frames.extend(self.out.pop_front());
        }
        if self.send(frames).await.is_err() || overflowed {
            metrics::counter!("relay_slow_consumer_disconnects_total").increment(1);
            return Err(slow_consumer("slow consumer"));
        }
        if self.out.is_empty() {
            drop(self.page_held.take()); // the page is written: its memory goes back
            // And the room it was queued in (a replay page is up to 128 frames): an idle session
            // holds none; the next delivery allocates what it needs.
            self.out = VecDeque::new();
        }
        Ok(())
    }

    /// Reads the next inbox page (its memory `held`) and queues what it delivers.
    async fn replay_page(&mut self, reg: &Registration, mut held: Held) -> Result<(), Ended> {
        let device = self.state.device().clone();
        let from = self.state.replay_from();
        let entries = self
            .ctx
            .store
            .inbox_page(device, from, REPLAY_PAGE, REPLAY_PAGE_BYTES)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "inbox replay failed");
                store_unavailable()
            })?;
        let bodies: usize = entries.iter().map(|e| e.body.len()).sum();
        let full = entries.len() == REPLAY_PAGE || bodies >= REPLAY_PAGE_BYTES;
        let page = self.state.handle_page(&entries, full);
        drop(entries);
        self.acks.add(page.before_login);
        let mut frames = page.frames;
        let mut synced = None;
        if page.caught_up {
            let queued = reg.outbox.take(usize::MAX);
            // Deliveries dropped on a full queue during replay are in the store: read again.
            let overflowed = reg.outbox.overflowed.swap(false, Ordering::Relaxed);
            let live;
            (live, synced) = self
                .state
                .handle_caught_up(Instant::now(), queued, overflowed);
            frames.extend(live);
        }
        metrics::counter!("relay_messages_delivered_total", "path" => "replay")
            .increment(frames.len() as u64);
        if let Some(done) = synced {
            metrics::histogram!("relay_replay_duration_seconds").record(done.took.as_secs_f64());
            metrics::histogram!("relay_replay_messages").record(done.messages as f64);
            frames.push(done.frame);
        }
        self.out.extend(frames);
        held.shrink(self.out.iter().map(|f| f.len()).sum());
        if !self.out.is_empty() {
            self.page_held.replace(held);
        }
        Ok(())
    }
}

/// A session of revoked credentials that the device has not confirmed yet: the `logout` frame
/// first, then the close. Nothing else: no inbox, no live deliveries, no sends.
pub async fn logged_out<S>(
    ws: &mut Ws<S>,
    ctx: &SessionContext,
    identity: &Identity,
    revocation: &crate::access::Revocation,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ended = logout_phase(
        ws,
        ctx,
        &identity.device,
        &revocation.reason,
        revocation.signal,
        "reconnect",
    )
    .await;
    if let Some(code) = ended.code {
        close_with(ws, code, ended.reason, ctx.write_timeout).await;
    }
    ended
}

/// Sends `logout`, waits (bounded) for `logout_ack`, records the confirmation.
async fn logout_phase<S>(
    ws: &mut Ws<S>,
    ctx: &SessionContext,
    device: &crate::store::DeviceRef,
    reason: &str,
    signal: Uuid,
    via: &str,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ended = Ended {
        code: Some(close::LOGGED_OUT),
        reason: "logged out",
    };
    let frame = ServerFrame::Logout { reason, signal }.to_json();
    if write(ws, vec![frame.into()], ctx.write_timeout)
        .await
        .is_err()
    {
        return ended;
    }
    metrics::counter!("relay_logouts_delivered_total", "via" => if via == "live" { "live" } else { "reconnect" }).increment(1);
    ctx.access.audit.record(crate::audit::Event {
        via: Some(via.into()),
        signal: Some(signal),
        ..crate::audit::Event::new(crate::audit::EventKind::LogoutDelivered).device(device)
    });
    let wait = async {
        while let Some(Ok(msg)) = ws.next().await {
            let Incoming::Text(text) = msg else {
                if matches!(msg, Incoming::Close) {
                    return false;
                }
                continue;
            };
            if let Ok(protocol::ClientFrame::LogoutAck { signal: acked }) =
                protocol::parse_client_frame(&text)
                && acked == signal
            {
                return true;
            }
        }
        false
    };
    if tokio::time::timeout(ctx.access.ack_wait, wait).await == Ok(true)
        && let Err(e) = ctx.access.confirm(device, signal).await
    {
        tracing::warn!(error = %e, "logout confirmation not stored; the device confirms again on reconnect");
    }
    ended
}

/// Stores a push registration after the relay-side checks the state machine cannot make.
async fn set_push_token(
    ctx: &SessionContext,
    device: &crate::store::DeviceRef,
    token: Option<push::DeviceToken>,
) -> Result<bool, (protocol::FrameError, String)> {
    if let Some(t) = &token {
        if !ctx.push_apps.is_empty() && !ctx.push_apps.contains(&t.app_id) {
            return Err((
                protocol::FrameError::BadRequest,
                "app_id is not configured on this relay".into(),
            ));
        }
        metrics::counter!("relay_push_registrations_total", "platform" => t.platform.name())
            .increment(1);
    }
    let registered = token.is_some();
    match ctx.store.set_push_token(device.clone(), token).await {
        Ok(()) => Ok(registered),
        Err(e) => {
            tracing::warn!(error = %e, "push token not saved");
            Err((
                protocol::FrameError::Unavailable,
                "push token not saved; send it again".into(),
            ))
        }
    }
}

/// A session's acknowledgements: one request in flight on the store's ack lane, the rest
/// gathered meanwhile and sent together when it is applied.
struct Acks<'a> {
    store: &'a Arc<dyn MessageStore>,
    tasks: &'a TaskTracker,
    device: DeviceRef,
    waiting: Vec<u64>,
    /// Owns what it needs, so a session that ends can leave it to a task.
    in_flight: Option<BoxFuture<'static, Result<(), StoreError>>>,
}

impl<'a> Acks<'a> {
    fn new(store: &'a Arc<dyn MessageStore>, tasks: &'a TaskTracker, device: DeviceRef) -> Self {
        Acks {
            store,
            tasks,
            device,
            waiting: Vec::new(),
            in_flight: None,
        }
    }

    fn add(&mut self, seqs: Vec<u64>) {
        self.waiting.extend(seqs);
        if self.in_flight.is_none() {
            self.send_next();
        }
    }

    fn send_next(&mut self) {
        if !self.waiting.is_empty() {
            let n = self.waiting.len().min(protocol::MAX_ACKS_PER_FRAME);
            let seqs = self.waiting.drain(..n).collect();
            let (store, device) = (self.store.clone(), self.device.clone());
            self.in_flight = Some(Box::pin(async move { store.ack(device, seqs).await }));
        }
    }

    /// Resolves when the request in flight is applied (and sends the next); pending while none is.
    async fn applied(&mut self) -> Result<(), StoreError> {
        let Some(in_flight) = &mut self.in_flight else {
            return std::future::pending().await;
        };
        let result = in_flight.await;
        self.in_flight = None;
        if result.is_ok() {
            self.send_next();
        }
        result
    }
}

impl Drop for Acks<'_> {
    /// A session that ends leaves its acks to a task: the one in flight may not have reached the
    /// store's lane yet (a lost ack is only a redelivery, but one that need not happen).
    fn drop(&mut self) {
        if let Some(in_flight) = self.in_flight.take() {
            self.tasks.spawn(in_flight);
        }
        if !self.waiting.is_empty() {
            let (store, device) = (self.store.clone(), self.device.clone());
            let seqs = std::mem::take(&mut self.waiting);
            self.tasks.spawn(async move {
                let _ = store.ack(device, seqs).await;
            });
        }
    }
}

/// Resolves with the oldest outstanding append's outcome (the caller pops it); pending forever
/// when there is none.
async fn next_reply(tickets: &mut VecDeque<AppendTicket>) -> Result<Accepted, StoreError> {
    match tickets.front_mut() {
        Some(ticket) => ticket.await.unwrap_or(Err(StoreError::Closed)),
        None => std::future::pending().await,
    }
}

/// Waits for room in the node's replay memory for one page, keeping its place in line in `slot`.
fn reserve<'s, 'a>(
    slot: &'s mut Reserving<'a>,
    memory: &'a ReplayMemory,
    bodies: usize,
) -> impl Future<Output = Held> + 's {
    std::future::poll_fn(move |cx| {
        let waiting = slot.get_or_insert_with(|| Box::pin(memory.reserve(bodies, REPLAY_PAGE)));
        let held = std::task::ready!(waiting.as_mut().poll(cx));
        *slot = None;
        std::task::Poll::Ready(held)
    })
}

/// Writes frames and flushes once, within `limit`. Not an `async fn`: the frames are fed to
/// the socket now, so the future holds only the flush and its timer (every session awaits one,
/// inside most of what it awaits).
fn write<'w, S>(
    ws: &'w mut Ws<S>,
    frames: Vec<Utf8Bytes>,
    limit: Duration,
) -> impl Future<Output = Result<(), ()>> + 'w
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for frame in &frames {
        ws.feed_text(frame);
    }
    drop(frames);
    tokio::time::timeout(limit, ws.flush()).map(|r| match r {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    })
}

async fn close_with<S>(ws: &mut Ws<S>, code: u16, reason: &'static str, limit: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Complete the closing handshake: read (and discard) until the peer's Close. Closing a socket
    // with unread input makes the kernel send a RST, which can destroy the close frame in flight.
    let handshake = async {
        ws.close(code, reason).await?;
        while let Some(msg) = ws.next().await {
            if matches!(msg?, Incoming::Close) {
                break;
            }
        }
        Ok::<(), ReadError>(())
    };
    let _ = tokio::time::timeout(limit.min(CLOSE_HANDSHAKE), handshake).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewMessage;
    use crate::store::embedded::open_for_tests;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_session_that_ends_leaves_every_ack_it_took_to_the_store() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open_for_tests(dir.path());
        let bob = DeviceRef::new("bob", "phone");
        store.register_device(bob.clone()).await.expect("register");
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let msg = NewMessage {
                id: Uuid::new_v4(),
                from: DeviceRef::new("alice", "phone"),
                to: vec!["bob".into()],
                body: bytes::Bytes::from_static(b"x"),
                urgent: false,
            };
            seqs.push(
                store
                    .append(msg)
                    .await
                    .expect("ticket")
                    .expect("append")
                    .seq,
            );
        }

        // One ack taken and the session gone before its loop came round to send it (the ack lane
        // was full, or the close frame was read first), one gathered behind it.
        let tasks = TaskTracker::new();
        let mut acks = Acks::new(&store, &tasks, bob.clone());
        acks.add(vec![seqs[0]]);
        acks.add(vec![seqs[1]]);
        drop(acks);

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<u64> = store
                .inbox_page(bob.clone(), 0, 10, 1 << 20)
                .await
                .expect("inbox")
                .iter()
                .map(|e| e.seq)
                .collect();
            if left == [seqs[2]] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "acks lost with the session: {left:?} left of {seqs:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
