//! Drives one WebSocket session: feeds frames and deadlines to [`State`], carries out its
//! actions against the store and the socket, replays the inbox, then forwards live deliveries.
//!
//! Replay protocol: the session registers with the hub *before* reading the inbox, so a message
//! committed during replay is either read from the store or queued live (or both: the cursor
//! drops the second copy). Live deliveries wait in the bounded queue until replay ends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::SessionContext;
use super::state::{Action, State, Timeout};
use crate::access::Start;
use crate::auth::Identity;
use crate::fanout::{Registration, deliver_frame};
use crate::protocol::{self, RejectCode, ServerFrame, close};
use crate::store::{AppendTicket, StoreError};

/// Inbox entries read per replay step.
const REPLAY_PAGE: usize = 128;
/// Live deliveries written per flush.
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
    let mut pending: VecDeque<(Uuid, AppendTicket, Instant)> = VecDeque::new();
    let replay_started = Instant::now();
    let mut replayed = 0u64;

    loop {
        let deadline = tokio::time::Instant::from_std(state.next_deadline());
        let replaying = matches!(phase, Phase::Replaying);
        let reading = pending.len() < ctx.max_pipelined;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                finish_pending(ws, &mut pending, ctx).await;
                return Ended { code: Some(close::RESTART), reason: "relay restarting" };
            }
            _ = reg.outbox.evict.cancelled() => {
                finish_pending(ws, &mut pending, ctx).await;
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
            (id, result, started) = next_reply(&mut pending) => {
                pending.pop_front();
                let frame = reply_frame(id, result, started);
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
                match action {
                    Action::None => {}
                    Action::Append(msg) => {
                        let id = msg.id;
                        pending.push_back((id, ctx.store.append(msg), now));
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
                        if ctx.store.ack(state.device().clone(), seqs).await.is_err() {
                            return Ended { code: Some(TRY_AGAIN_LATER), reason: "store unavailable" };
                        }
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
            _ = std::future::ready(()), if replaying => {
                let page = match ctx.store.inbox_page(state.device().clone(), replay_from, REPLAY_PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox replay failed");
                        return Ended { code: Some(TRY_AGAIN_LATER), reason: "store unavailable" };
                    }
                };
                let full = page.len() == REPLAY_PAGE;
                replay_from = page.last().map_or(replay_from, |e| e.seq);
                let mut frames = Vec::with_capacity(page.len());
                let mut before_login = Vec::new();
                for entry in &page {
                    if state.before_login(entry.seq) {
                        before_login.push(entry.seq);
                    } else if state.advance(entry.seq) {
                        frames.push(Message::Text(deliver_frame(entry)));
                    }
                }
                // Not for this login: off the inbox (the archive keeps them), never delivered.
                if !before_login.is_empty() && ctx.store.ack(state.device().clone(), before_login).await.is_err() {
                    return Ended { code: Some(TRY_AGAIN_LATER), reason: "store unavailable" };
                }
                if !full {
                    // Caught up with the store: whatever is queued live is newer or a duplicate.
                    for (seq, frame) in reg.outbox.take(usize::MAX) {
                        if state.advance(seq) {
                            frames.push(Message::Text(frame));
                        }
                    }
                }
                replayed += frames.len() as u64;
                // Deliveries dropped on a full queue during replay are in the store: read again.
                let overflowed = !full && reg.outbox.overflowed.swap(false, Ordering::Relaxed);
                if !full && !overflowed {
                    phase = Phase::Live;
                    if live_after.is_none() {
                        live_after = Some(state.cursor());
                        frames.push(ServerFrame::Synced { seq: state.cursor() }.to_json().into());
                        metrics::histogram!("relay_replay_duration_seconds").record(replay_started.elapsed().as_secs_f64());
                        metrics::histogram!("relay_replay_messages").record(replayed as f64);
                    }
                }
                metrics::counter!("relay_messages_delivered_total", "path" => "replay").increment(frames.len() as u64);
                if write(ws, frames, ctx.write_timeout).await.is_err() {
                    return Ended { code: Some(close::SLOW_CONSUMER), reason: "write timed out" };
                }
            }
            _ = reg.outbox.ready.notified(), if !replaying => {
                let frames: Vec<Message> = reg
                    .outbox
                    .take(LIVE_BATCH)
                    .into_iter()
                    .filter(|(seq, _)| state.advance(*seq))
                    .map(|(_, frame)| Message::Text(frame))
                    .collect();
                metrics::counter!("relay_messages_delivered_total", "path" => "live").increment(frames.len() as u64);
                if write(ws, frames, ctx.write_timeout).await.is_err()
                    || reg.outbox.overflowed.load(Ordering::Relaxed)
                {
                    metrics::counter!("relay_slow_consumer_disconnects_total").increment(1);
                    return Ended { code: Some(close::SLOW_CONSUMER), reason: "slow consumer" };
                }
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

/// Resolves with the oldest pending append's outcome; pending forever when there is none.
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

async fn next_reply(
    pending: &mut VecDeque<(Uuid, AppendTicket, Instant)>,
) -> (Uuid, Result<crate::store::Accepted, StoreError>, Instant) {
    match pending.front_mut() {
        Some((id, ticket, started)) => {
            let result = ticket.await.unwrap_or(Err(StoreError::Closed));
            (*id, result, *started)
        }
        None => std::future::pending().await,
    }
}

fn reply_frame(
    id: Uuid,
    result: Result<crate::store::Accepted, StoreError>,
    started: Instant,
) -> String {
    match result {
        Ok(a) => {
            metrics::histogram!("relay_accept_duration_seconds")
                .record(started.elapsed().as_secs_f64());
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
    pending: &mut VecDeque<(Uuid, AppendTicket, Instant)>,
    ctx: &SessionContext,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut frames = Vec::new();
    while let Some((id, ticket, started)) = pending.pop_front() {
        let result = ticket.await.unwrap_or(Err(StoreError::Closed));
        frames.push(Message::Text(reply_frame(id, result, started).into()));
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
