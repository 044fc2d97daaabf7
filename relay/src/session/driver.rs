//! Drives one WebSocket session: feeds frames and deadlines to [`State`], carries out its
//! actions against the store and the socket, replays the inbox, then forwards live deliveries.
//!
//! Replay protocol: the session registers with the hub *before* reading the inbox, so a message
//! committed during replay is either read from the store or queued live (or both: the cursor
//! drops the second copy). Live deliveries wait in the bounded queue until replay ends.
//!
//! Replay reads a page bounded in entries and bytes, paid for from the node's replay memory
//! before it is read, and writes it a frame or so at a time, each write within the write timeout,
//! reading the device's frames (its acks) in between: a slow reader is slow, never cut off.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::SessionContext;
use super::budget::{Held, REPLAY_PAGE_BYTES, ReplayMemory};
use super::state::{Action, State, Timeout};
use crate::access::Start;
use crate::auth::Identity;
use crate::fanout::{Registration, deliver_frame};
use crate::protocol::{self, RejectCode, ServerFrame, close};
use crate::store::{AppendTicket, DeviceRef, MessageStore, StoreError};

/// Most inbox entries read per replay step (pages end sooner at [`REPLAY_PAGE_BYTES`]).
const REPLAY_PAGE: usize = 128;
/// Frames written per write, beyond the first: each write has the whole write timeout.
const WRITE_CHUNK_BYTES: usize = 64 * 1024;
/// Live deliveries taken from the queue at once.
const LIVE_BATCH: usize = 64;
/// Longest time a session trusts its token's `exp` for (ten years).
const MAX_TOKEN_LEFT_S: u64 = 10 * 365 * 86_400;
/// Close code when the store cannot serve the replay: try again later.
const TRY_AGAIN_LATER: u16 = 1013;

/// Why a session ended, for logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// Close code sent, if any.
    pub code: Option<u16>,
    /// Short reason.
    pub reason: &'static str,
}

enum Phase {
    Replaying,
    Live,
}

type Ws<S> = WebSocketStream<S>;

/// A send awaiting durability: its id, the store's answer, when it came, and the quota it holds.
struct Pending {
    id: Uuid,
    ticket: AppendTicket,
    started: Instant,
    bytes: u64,
}

/// Room in the node's replay memory being waited for; kept across loop turns so the session keeps
/// its place in line while it reads frames.
type Reserving<'a> = Option<Pin<Box<dyn Future<Output = Held> + Send + 'a>>>;

/// Runs a session to its end. Never panics on network input; every exit path closes the socket.
pub async fn run<S>(
    mut ws: Ws<S>,
    ctx: Arc<SessionContext>,
    identity: Identity,
    shutdown: CancellationToken,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let device = identity.device.clone();
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
        .register(&device, ctx.outbound_queue, identity.issued_at);
    if let Some(pager) = &ctx.pager {
        pager.online(&device);
    }

    let ended = match ctx.store.register_device(device.clone()).await {
        Ok(()) => {
            if let Some(cluster) = &ctx.cluster {
                cluster.attach(&device, reg.since).await;
            }
            let ended = match ctx.access.session_start(&device, identity.issued_at).await {
                Ok(Start::Open { floor_ms }) => {
                    seen(
                        &ctx,
                        &device,
                        identity.org.clone().map(|o| (o, identity.issued_at)),
                    );
                    state.start_at(crate::store::seq_floor(floor_ms));
                    session(&mut ws, &ctx, &mut state, &mut reg, &shutdown).await
                }
                Ok(Start::LoggedOut(r)) => {
                    logout_phase(&mut ws, &ctx, &device, &r.reason, r.signal, "live").await
                }
                Ok(Start::Locked) => Ended {
                    code: Some(close::LOGGED_OUT),
                    reason: "account locked",
                },
                Err(e) => {
                    tracing::warn!(error = %e, "access check at registration failed");
                    Ended {
                        code: Some(TRY_AGAIN_LATER),
                        reason: "store unavailable",
                    }
                }
            };
            if let Some(cluster) = &ctx.cluster {
                cluster.detach(&device, reg.since).await;
            }
            ended
        }
        Err(e) => {
            tracing::warn!(error = %e, "device registration failed");
            Ended {
                code: Some(TRY_AGAIN_LATER),
                reason: "store unavailable",
            }
        }
    };
    ctx.hub.unregister(&device, reg.id);
    seen(&ctx, &device, None);
    if let Some(code) = ended.code {
        close_with(&mut ws, code, ended.reason, ctx.write_timeout).await;
    }
    ended
}

async fn session<S>(
    ws: &mut Ws<S>,
    ctx: &SessionContext,
    state: &mut State,
    reg: &mut Registration,
    shutdown: &CancellationToken,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hello = ServerFrame::Hello {
        v: protocol::VERSION,
        user: &state.device().user,
        device: &state.device().device,
        idle_timeout_s: ctx.limits.idle_timeout.as_secs(),
        max_body_bytes: ctx.limits.max_body_bytes,
        max_recipients: ctx.limits.max_recipients,
    };
    if write(ws, vec![hello.to_json().into()], ctx.write_timeout)
        .await
        .is_err()
    {
        return Ended {
            code: None,
            reason: "write failed",
        };
    }

    let mut phase = Phase::Replaying;
    // Where the inbox read continues; moved back when the cluster asks for a catch-up.
    let mut replay_from = 0u64;
    // Sequences above this were delivered live (known once the first replay ends).
    let mut live_after: Option<u64> = None;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let replay_started = Instant::now();
    let mut replayed = 0u64;
    // Replayed frames not written yet, and the replay memory they hold.
    let mut out: VecDeque<Message> = VecDeque::new();
    let mut page_held: Option<Held> = None;
    let mut reserving: Reserving<'_> = None;
    let mut acks = Acks::new(&ctx.store, state.device().clone());
    let page_estimate = REPLAY_PAGE_BYTES + ctx.limits.max_body_bytes;

    loop {
        let deadline = tokio::time::Instant::from_std(state.next_deadline());
        let replaying = matches!(phase, Phase::Replaying);
        let reading = pending.len() < ctx.max_pipelined;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                finish_pending(ws, &mut pending, ctx, state.device()).await;
                return Ended { code: Some(close::RESTART), reason: "relay restarting" };
            }
            _ = reg.outbox.evict.cancelled() => {
                finish_pending(ws, &mut pending, ctx, state.device()).await;
                let code = reg.outbox.evict_code.load(Ordering::Relaxed);
                let logout = reg.outbox.logout.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let (close::LOGGED_OUT, Some((reason, signal))) = (code, logout) {
                    return logout_phase(ws, ctx, state.device(), &reason, signal, "live").await;
                }
                let reason = if code == close::RESTART { "relay restarting" } else { "displaced by a newer connection" };
                return Ended { code: Some(code), reason };
            }
            Ok(()) = reg.catch_up.changed(), if !replaying => {
                // Deliveries from other nodes may have been lost on the bus: re-read the inbox.
                replay_from = (*reg.catch_up.borrow_and_update()).min(replay_from);
                phase = Phase::Replaying;
            }
            result = acks.applied() => {
                if result.is_err() {
                    return Ended { code: Some(TRY_AGAIN_LATER), reason: "store unavailable" };
                }
            }
            result = next_reply(&mut pending) => {
                let Some(p) = pending.pop_front() else { continue };
                let frame = reply(ctx, state.device(), p, result);
                if write(ws, vec![frame.into()], ctx.write_timeout).await.is_err() {
                    return Ended { code: Some(close::SLOW_CONSUMER), reason: "write timed out" };
                }
            }
            incoming = ws.next(), if reading => {
                let now = Instant::now();
                let mut pause_until = None;
                let action = match incoming {
                    None => return Ended { code: None, reason: "connection closed" },
                    Some(Err(WsError::Capacity(_))) => {
                        metrics::counter!("relay_frames_rejected_total", "reason" => "too_big").increment(1);
                        return Ended { code: Some(close::TOO_BIG), reason: "frame too big" };
                    }
                    Some(Err(WsError::Utf8(_))) => {
                        metrics::counter!("relay_frames_rejected_total", "reason" => "invalid_utf8").increment(1);
                        return Ended { code: Some(close::INVALID_DATA), reason: "text frame is not utf-8" };
                    }
                    Some(Err(WsError::Protocol(_))) => {
                        metrics::counter!("relay_frames_rejected_total", "reason" => "protocol_error").increment(1);
                        return Ended { code: Some(close::PROTOCOL_ERROR), reason: "websocket protocol error" };
                    }
                    Some(Err(_)) => return Ended { code: None, reason: "io error" },
                    Some(Ok(Message::Text(text))) => {
                        pause_until = state.inbound(now, text.len());
                        state.handle_text(now, &text)
                    }
                    Some(Ok(Message::Binary(b))) => {
                        pause_until = state.inbound(now, b.len());
                        state.handle_binary(now)
                    }
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the close reply; push it out.
                        let _ = tokio::time::timeout(ctx.write_timeout, ws.flush()).await;
                        return Ended { code: None, reason: "client closed" };
                    }
                    Some(Ok(_)) => { state.heard(now); Action::None } // ping, pong
                };
                // Over its byte budget: stop reading for a moment (at most about one frame's
                // worth of time); TCP slows the sender, and nobody else waits for it.
                if let Some(until) = pause_until {
                    metrics::counter!("relay_inbound_paused_total").increment(1);
                    tokio::time::sleep_until(until.into()).await;
                }
                // The account's daily storage quota is shared by its sessions: checked here.
                let action = match action {
                    Action::Append(msg) if !ctx.quota.reserve(&msg.from.user, msg.body.len() as u64, crate::store::now_ms()) => {
                        Action::Reject(msg.id, RejectCode::QuotaExceeded)
                    }
                    action => action,
                };
                match action {
                    Action::None => {}
                    Action::Append(msg) => {
                        let (id, bytes) = (msg.id, msg.body.len() as u64);
                        pending.push_back(Pending { id, ticket: ctx.store.append(msg), started: now, bytes });
                    }
                    Action::Reject(id, code) => {
                        metrics::counter!("relay_messages_rejected_total", "code" => code.code()).increment(1);
                        let frame = ServerFrame::Rejected { id, code, retry: code.retryable() }.to_json();
                        if write(ws, vec![frame.into()], ctx.write_timeout).await.is_err() {
                            return Ended { code: Some(close::SLOW_CONSUMER), reason: "write timed out" };
                        }
                    }
                    Action::Ack(seqs) => {
                        metrics::counter!("relay_messages_acked_total").increment(seqs.len() as u64);
                        // The accept time is in the seq: accept → device ack, the delivery SLO.
                        let now = crate::store::now_ms();
                        for &seq in &seqs {
                            let accepted = crate::store::seq_time_ms(seq);
                            let path = if live_after.is_some_and(|c| seq > c) { "live" } else { "replay" };
                            if accepted <= now {
                                metrics::histogram!("relay_delivery_duration_seconds", "path" => path)
                                    .record((now - accepted) as f64 / 1000.0);
                            }
                        }
                        acks.add(seqs);
                    }
                    Action::SetPushToken(token) => {
                        let frame = match set_push_token(ctx, state.device(), token).await {
                            Ok(registered) => ServerFrame::PushTokenSaved { registered }.to_json(),
                            Err((code, detail)) => ServerFrame::Error { code, message: &detail, id: None }.to_json(),
                        };
                        if write(ws, vec![frame.into()], ctx.write_timeout).await.is_err() {
                            return Ended { code: Some(close::SLOW_CONSUMER), reason: "write timed out" };
                        }
                    }
                    Action::Error(code, detail, id) => {
                        metrics::counter!("relay_frames_rejected_total", "reason" => code.code()).increment(1);
                        let frame = ServerFrame::Error { code, message: &detail, id }.to_json();
                        if write(ws, vec![frame.into()], ctx.write_timeout).await.is_err() {
                            return Ended { code: Some(close::SLOW_CONSUMER), reason: "write timed out" };
                        }
                    }
                    Action::Close(code, reason) => return Ended { code: Some(code), reason },
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                match state.poll_timeout(Instant::now()) {
                    Timeout::None => {}
                    Timeout::Ping => {
                        if write(ws, vec![Message::Ping(Default::default())], ctx.write_timeout).await.is_err() {
                            return Ended { code: Some(close::SLOW_CONSUMER), reason: "write timed out" };
                        }
                    }
                    Timeout::IdleLogoff => {
                        metrics::counter!("relay_idle_logoffs_total").increment(1);
                        let frame = ServerFrame::SessionExpired { idle_timeout_s: ctx.limits.idle_timeout.as_secs() };
                        let _ = write(ws, vec![frame.to_json().into()], ctx.write_timeout).await;
                        return Ended { code: Some(close::SESSION_EXPIRED), reason: "session expired" };
                    }
                    Timeout::Close(code, reason) => return Ended { code: Some(code), reason },
                }
            }
            // Replayed and live frames, a frame or so per write, each write within the timeout.
            _ = std::future::ready(()), if !out.is_empty() => {
                let mut frames = Vec::new();
                let mut bytes = 0;
                while let Some(frame) = out.front() {
                    if !frames.is_empty() && bytes + frame.len() > WRITE_CHUNK_BYTES {
                        break;
                    }
                    bytes += frame.len();
                    frames.extend(out.pop_front());
                }
                // Live deliveries dropped on a full queue are lost to this session: it must
                // reconnect and replay them (during replay they are read from the store again).
                if write(ws, frames, ctx.write_timeout).await.is_err()
                    || (!replaying && reg.outbox.overflowed.load(Ordering::Relaxed))
                {
                    metrics::counter!("relay_slow_consumer_disconnects_total").increment(1);
                    return Ended { code: Some(close::SLOW_CONSUMER), reason: "slow consumer" };
                }
                if out.is_empty() {
                    drop(page_held.take()); // the page is written: its memory goes back
                }
            }
            mut held = reserve(&mut reserving, &ctx.replay_memory, page_estimate), if replaying && out.is_empty() => {
                let page = match ctx.store.inbox_page(state.device().clone(), replay_from, REPLAY_PAGE, REPLAY_PAGE_BYTES).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox replay failed");
                        return Ended { code: Some(TRY_AGAIN_LATER), reason: "store unavailable" };
                    }
                };
                let bodies: usize = page.iter().map(|e| e.body.len()).sum();
                let full = page.len() == REPLAY_PAGE || bodies >= REPLAY_PAGE_BYTES;
                replay_from = page.last().map_or(replay_from, |e| e.seq);
                let mut before_login = Vec::new();
                for entry in &page {
                    if state.before_login(entry.seq) {
                        before_login.push(entry.seq);
                    } else if state.advance(entry.seq) {
                        out.push_back(Message::Text(deliver_frame(entry)));
                    }
                }
                drop(page);
                // Not for this login: off the inbox (the archive keeps them), never delivered.
                acks.add(before_login);
                if !full {
                    // Caught up with the store: whatever is queued live is newer or a duplicate.
                    for (seq, frame) in reg.outbox.take(usize::MAX) {
                        if state.advance(seq) {
                            out.push_back(Message::Text(frame));
                        }
                    }
                }
                replayed += out.len() as u64;
                metrics::counter!("relay_messages_delivered_total", "path" => "replay").increment(out.len() as u64);
                // Deliveries dropped on a full queue during replay are in the store: read again.
                let overflowed = !full && reg.outbox.overflowed.swap(false, Ordering::Relaxed);
                if !full && !overflowed {
                    phase = Phase::Live;
                    if live_after.is_none() {
                        live_after = Some(state.cursor());
                        out.push_back(ServerFrame::Synced { seq: state.cursor() }.to_json().into());
                        metrics::histogram!("relay_replay_duration_seconds").record(replay_started.elapsed().as_secs_f64());
                        metrics::histogram!("relay_replay_messages").record(replayed as f64);
                    }
                }
                held.shrink(out.iter().map(Message::len).sum());
                if !out.is_empty() {
                    page_held.replace(held);
                }
            }
            _ = reg.outbox.ready.notified(), if !replaying && out.is_empty() => {
                let before = out.len();
                out.extend(
                    reg.outbox
                        .take(LIVE_BATCH)
                        .into_iter()
                        .filter(|(seq, _)| state.advance(*seq))
                        .map(|(_, frame)| Message::Text(frame)),
                );
                metrics::counter!("relay_messages_delivered_total", "path" => "live").increment((out.len() - before) as u64);
            }
        }
    }
}

/// Records the device's last-seen time (and its user's organisation) in the background.
fn seen(ctx: &Arc<SessionContext>, device: &crate::store::DeviceRef, org: Option<(String, u64)>) {
    let (store, device) = (ctx.store.clone(), device.clone());
    tokio::spawn(async move {
        let change = crate::access::Change::Seen {
            at: crate::store::now_ms(),
            org,
        };
        let (user, dev) = (device.user.to_string(), device.device.to_string());
        if let Err(e) = store.update_access(user, dev, change).await {
            tracing::debug!(error = %e, "last-seen time not recorded");
        }
    });
}

/// A session of revoked credentials that the device has not confirmed yet: the `logout` frame
/// first, then the close. Nothing else: no inbox, no live deliveries, no sends.
pub async fn logged_out<S>(
    mut ws: Ws<S>,
    ctx: Arc<SessionContext>,
    identity: Identity,
    revocation: crate::access::Revocation,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ended = logout_phase(
        &mut ws,
        &ctx,
        &identity.device,
        &revocation.reason,
        revocation.signal,
        "reconnect",
    )
    .await;
    if let Some(code) = ended.code {
        close_with(&mut ws, code, ended.reason, ctx.write_timeout).await;
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
        ..crate::audit::Event::new("logout_delivered").device(device)
    });
    let wait = async {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else {
                if matches!(msg, Message::Close(_)) {
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
    device: DeviceRef,
    waiting: Vec<u64>,
    /// Owns what it needs, so a session that ends can leave it to a task.
    in_flight: Option<BoxFuture<'static, Result<(), StoreError>>>,
}

impl<'a> Acks<'a> {
    fn new(store: &'a Arc<dyn MessageStore>, device: DeviceRef) -> Self {
        Acks {
            store,
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
            tokio::spawn(in_flight);
        }
        if !self.waiting.is_empty() {
            let (store, device) = (self.store.clone(), self.device.clone());
            let seqs = std::mem::take(&mut self.waiting);
            tokio::spawn(async move {
                let _ = store.ack(device, seqs).await;
            });
        }
    }
}

/// Resolves with the oldest pending append's outcome; pending forever when there is none.
async fn next_reply(pending: &mut VecDeque<Pending>) -> Result<crate::store::Accepted, StoreError> {
    match pending.front_mut() {
        Some(p) => (&mut p.ticket).await.unwrap_or(Err(StoreError::Closed)),
        None => std::future::pending().await,
    }
}

/// Waits for room in the node's replay memory for one page, keeping its place in line in `slot`.
async fn reserve<'a>(slot: &mut Reserving<'a>, memory: &'a ReplayMemory, bodies: usize) -> Held {
    let waiting = slot.get_or_insert_with(|| Box::pin(memory.reserve(bodies, REPLAY_PAGE)));
    let held = waiting.as_mut().await;
    *slot = None;
    held
}

/// The frame that answers a send; a message that stored nothing new gives its quota back.
fn reply(
    ctx: &SessionContext,
    device: &crate::store::DeviceRef,
    p: Pending,
    result: Result<crate::store::Accepted, StoreError>,
) -> String {
    if !matches!(result, Ok(a) if !a.duplicate) {
        ctx.quota
            .refund(&device.user, p.bytes, crate::store::now_ms());
    }
    let id = p.id;
    match result {
        Ok(a) => {
            metrics::histogram!("relay_accept_duration_seconds")
                .record(p.started.elapsed().as_secs_f64());
            if a.duplicate {
                metrics::counter!("relay_messages_duplicate_total").increment(1);
            } else {
                metrics::counter!("relay_messages_accepted_total").increment(1);
            }
            ServerFrame::Accepted {
                id,
                seq: a.seq,
                ts: a.ts,
                duplicate: a.duplicate,
            }
            .to_json()
        }
        Err(e) => {
            let code = match e {
                StoreError::Closed => RejectCode::ShuttingDown,
                _ => RejectCode::Unavailable,
            };
            metrics::counter!("relay_messages_rejected_total", "code" => code.code()).increment(1);
            ServerFrame::Rejected {
                id,
                code,
                retry: true,
            }
            .to_json()
        }
    }
}

/// On shutdown: the store finishes every queued append; tell the device how each ended.
async fn finish_pending<S>(
    ws: &mut Ws<S>,
    pending: &mut VecDeque<Pending>,
    ctx: &SessionContext,
    device: &crate::store::DeviceRef,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut frames = Vec::new();
    while let Some(mut p) = pending.pop_front() {
        let result = (&mut p.ticket).await.unwrap_or(Err(StoreError::Closed));
        frames.push(Message::Text(reply(ctx, device, p, result).into()));
    }
    let _ = write(ws, frames, ctx.write_timeout).await;
}

/// Writes frames and flushes once, within `limit`.
async fn write<S>(ws: &mut Ws<S>, frames: Vec<Message>, limit: Duration) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = async {
        for frame in frames {
            ws.feed(frame).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(limit, io).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

async fn close_with<S>(ws: &mut Ws<S>, code: u16, reason: &'static str, limit: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    };
    // Complete the closing handshake: read (and discard) until the peer's Close. Closing a socket
    // with unread input makes the kernel send a RST, which can destroy the close frame in flight.
    let handshake = async {
        ws.close(Some(frame)).await?;
        while let Some(msg) = ws.next().await {
            if matches!(msg?, Message::Close(_)) {
                break;
            }
        }
        Ok::<(), WsError>(())
    };
    let _ = tokio::time::timeout(limit.min(Duration::from_secs(2)), handshake).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Keyring;
    use crate::store::embedded::{EmbeddedStore, Memory};
    use crate::store::{DeliverySink, InboxEntry, NewMessage};

    struct Nowhere;
    impl DeliverySink for Nowhere {
        fn deliver(&self, _: &[DeviceRef], _: &InboxEntry) {}
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_session_that_ends_leaves_every_ack_it_took_to_the_store() {
        let dir = tempfile::tempdir().expect("dir");
        let ring =
            Keyring::parse(&format!("k:{}", Keyring::generate_key_b64()), "k").expect("ring");
        let memory = Memory {
            cache_bytes: 1 << 20,
            memtable_bytes: 1 << 20,
            idle_flush: Duration::from_secs(30),
        };
        let store: Arc<dyn MessageStore> = Arc::new(
            EmbeddedStore::open(dir.path(), memory, Arc::new(ring), Arc::new(Nowhere))
                .expect("open"),
        );
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
        let mut acks = Acks::new(&store, bob.clone());
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
