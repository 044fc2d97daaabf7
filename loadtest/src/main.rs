//! `loadtest`: drives a relay through the real protocol and measures what SREs care about.
//!
//! Every connection is a device of its own user; device `i` sends to user `i+1` (a ring), so
//! every accepted message has exactly one intended recipient device. The send time (wall clock)
//! and the message's (sender, index) travel inside the opaque body, so end-to-end latency needs
//! no clock sync on one machine, and the total-queue check at the end compares, per sender, the
//! messages answered `accepted` with the ones delivered: loss and duplicates, exactly.
//!
//! Scenarios (presets; flags override):
//! - `steady`: open loop at `--rate` messages/s in total, or closed loop (`--rate 0`) with
//!   `--window` sends in flight per connection;
//! - `storm`: connections opened at `--handshake-rate` per second, then held;
//! - `churn`: steady traffic while devices go offline for `--offline` s every ~`--churn-every` s,
//!   and drain their queues on reconnect;
//! - `soak`: long, lower-rate steady traffic;
//! - `idle`: connect, sync, hold; reports the relay's memory per connection (`--relay-pid`).
//!
//! Past one process's file limit, `--workers K` runs K worker processes (this binary again),
//! each with its share of the connections and its own loopback source address (127.0.0.2, …).
//!
//! `--burst N` makes open-loop arrivals bursty (N sends within 2 ms, every N/rate seconds);
//! `--protocol centrifugo` drives Centrifugo instead of the relay (wire.rs), for the side-by-side
//! of `scripts/bench peer`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use relay::auth::{Claims, Minter};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

mod wire;
use wire::{Event, Protocol};

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Steady,
    Storm,
    Churn,
    Soak,
    Idle,
}

#[derive(Parser, Clone)]
#[command(about = "Load generator for the relay")]
struct Args {
    /// Relay WebSocket URL (ws:// or wss://); several (comma-separated or repeated) spread the
    /// connections over the nodes of a cluster, connection `i` starting on URL `i mod n`.
    #[arg(
        long,
        default_value = "ws://127.0.0.1:8080/v1/ws",
        value_delimiter = ','
    )]
    url: Vec<String>,
    /// When the relay closes a connection or it breaks, reconnect (to the next URL, after a
    /// random 0-500 ms) and resend the unanswered messages under the same ids.
    #[arg(long)]
    reconnect: bool,
    /// The server's protocol: the relay's, or Centrifugo's (the peer `scripts/bench peer`
    /// compares against; see wire.rs).
    #[arg(long, value_enum, default_value = "relay")]
    protocol: Protocol,
    /// Centrifugo: the HMAC secret to sign its HS256 connection tokens with.
    #[arg(long, env = "LOADTEST_HMAC_SECRET")]
    hmac_secret: Option<String>,
    /// Token-signing private key (PKCS#8 PEM) to mint device tokens with.
    #[arg(long, required_unless_present_any = ["tokens", "hmac_secret"])]
    key: Option<PathBuf>,
    /// Or: a file of device tokens, one per line (at least --connections of them).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// CA certificate (PEM) to trust for wss:// (besides nothing else: tests use their own CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Token audience.
    #[arg(long, default_value = "relay")]
    audience: String,
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// Connections (one device, one user each).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Total messages per second, open loop; 0 = closed loop. Default: 1000 (soak: 200).
    #[arg(long)]
    rate: Option<u64>,
    /// Open loop, bursty arrivals: sends come in bursts of this many within 2 ms (every
    /// burst/rate seconds) instead of evenly spaced.
    #[arg(long)]
    burst: Option<u32>,
    /// Sends in flight per connection in closed loop.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Seconds of sending (or holding). Default: 10 (churn: 20, soak: 600).
    #[arg(long)]
    duration: Option<u64>,
    /// Body size in bytes (at least 24).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Fraction of messages marked urgent.
    #[arg(long, default_value_t = 0.0)]
    urgent: f64,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Storm: connections opened per second (0 = as fast as possible).
    #[arg(long, default_value_t = 2000)]
    handshake_rate: u64,
    /// Churn: a device goes offline about this often (seconds).
    #[arg(long, default_value_t = 5)]
    churn_every: u64,
    /// Churn: seconds a device stays offline.
    #[arg(long, default_value_t = 2)]
    offline: u64,
    /// Worker processes; each takes a share of the connections and its own source address.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Relay process id, to report its memory (idle and storm).
    #[arg(long)]
    relay_pid: Option<u32>,
    /// User-id prefix, so runs do not share inboxes.
    #[arg(long, default_value = "lt")]
    prefix: String,
    /// Send to another run's users (this prefix) instead of the ring, to fill the inboxes of
    /// devices that are offline: send `k` of connection `c` goes to user `(c + k·connections) mod
    /// --to-users`. Their delivery is checked by the run that reconnects them
    /// (`delivered_from_other_runs`), not by this one's loss count.
    #[arg(long)]
    to_prefix: Option<String>,
    /// With --to-prefix: how many users that run has (default: --connections).
    #[arg(long)]
    to_users: Option<usize>,
    /// Organisation the minted tokens name (`org` claim): the relay then also writes each
    /// connect into that org's access report partitions, as with real tokens.
    #[arg(long)]
    org: Option<String>,
    /// Issue time (Unix seconds) of the minted tokens, by default now: runs given the same one
    /// connect with the same tokens, as devices reconnecting with the tokens they hold.
    #[arg(long)]
    iat: Option<u64>,
    /// Write the JSON report here as well.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Exit non-zero if end-to-end p99 exceeds this many milliseconds.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Exit non-zero if more than this fraction of accepted messages is lost.
    #[arg(long, default_value_t = 0.0)]
    max_loss: f64,
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long, hide = true)]
    run_id: Option<u64>,
    #[arg(long, hide = true)]
    start_at_ms: Option<u64>,
}

impl Args {
    fn rate(&self) -> u64 {
        self.rate.unwrap_or(if self.scenario == Scenario::Soak {
            200
        } else {
            1000
        })
    }
    fn duration(&self) -> u64 {
        self.duration.unwrap_or(match self.scenario {
            Scenario::Churn => 20,
            Scenario::Soak => 600,
            _ => 10,
        })
    }
    fn sends(&self) -> bool {
        matches!(
            self.scenario,
            Scenario::Steady | Scenario::Churn | Scenario::Soak
        )
    }
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant digits: construction cannot fail with these bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// What one worker saw; merged by the parent.
#[derive(Serialize, Deserialize, Default)]
struct WorkerReport {
    connect_seconds: f64,
    connected: u64,
    connection_errors: u64,
    closed_by_relay: BTreeMap<u16, u64>,
    rejected: BTreeMap<String, u64>,
    /// Per sender: message indices answered `accepted`.
    accepted: HashMap<u32, Vec<u32>>,
    /// Per sender: message indices delivered, with the sequence each came with (and repeats).
    delivered: HashMap<u32, Vec<(u32, u64)>>,
    /// Deliveries of messages an earlier run sent (--to-prefix), with repeats.
    from_other_runs: u64,
    reconnects: u64,
    /// Reconnect (after a drop) to `synced`, µs.
    resync: String,
    handshake: String,
    accept: String,
    end_to_end: String,
    send_seconds: f64,
}

fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(B64.encode(buf))
}

fn decode(s: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = B64.decode(s)?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

#[derive(Serialize)]
struct Latency {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    samples: u64,
}

fn summarize(h: &Histogram<u64>) -> Latency {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Latency {
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
        samples: h.len(),
    }
}

#[derive(Serialize)]
struct Report {
    scenario: Scenario,
    connections: usize,
    workers: usize,
    payload_bytes: usize,
    target_rate: u64,
    connect_seconds: f64,
    handshakes_per_s: f64,
    handshake: Latency,
    send_seconds: f64,
    accepted: u64,
    rejected: u64,
    rejected_by_code: BTreeMap<String, u64>,
    accepted_per_s: f64,
    delivered: u64,
    delivered_per_s: f64,
    /// Messages sent by earlier runs (--to-prefix) and delivered to this run's devices, with
    /// repeats: the replay of what waited for them.
    delivered_from_other_runs: u64,
    /// Of the messages to this run's own devices (none with --to-prefix).
    lost: u64,
    /// Messages stored more than once (one send, several sequence numbers): must be 0.
    duplicates: u64,
    /// Deliveries of a message already delivered (at-least-once; clients drop them by id).
    redeliveries: u64,
    reconnects: u64,
    /// Reconnect after a drop until `synced` (the replay of everything missed).
    resync: Option<Latency>,
    connection_errors: u64,
    closed_by_relay: BTreeMap<u16, u64>,
    end_to_end: Option<Latency>,
    accept: Option<Latency>,
    relay_rss_before_kib: Option<u64>,
    relay_rss_after_kib: Option<u64>,
    relay_rss_per_conn_bytes: Option<f64>,
    kernel_per_conn_bytes: Option<f64>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Kernel memory that grows with sockets: slab plus TCP buffer pages (system-wide, so both ends
/// of a loopback connection).
fn kernel_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let slab_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("Slab:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let fields: Vec<&str> = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))?
        .split_whitespace()
        .collect();
    let pages: u64 = fields
        .iter()
        .position(|f| *f == "mem")
        .and_then(|i| fields.get(i + 1))
        .and_then(|v| v.parse().ok())?;
    Some(slab_kib * 1024 + pages * 4096)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Ws = WebSocketStream<Box<dyn Io>>;

/// Shared by every connection of one worker.
struct Ctx {
    args: Args,
    run_id: u64,
    tokens: Vec<(String, String)>,
    source: Option<IpAddr>,
    targets: Vec<(SocketAddr, String)>,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    sending: AtomicBool,
    draining: AtomicBool,
    in_flight: AtomicU64,
    last_delivery_us: AtomicU64,
    accepted: AtomicU64,
    delivered: AtomicU64,
    other_runs: AtomicU64,
    report: Mutex<WorkerReport>,
    handshake: Mutex<Histogram<u64>>,
    accept: Mutex<Histogram<u64>>,
    end_to_end: Mutex<Histogram<u64>>,
    resync: Mutex<Histogram<u64>>,
    reconnects: AtomicU64,
}

impl Ctx {
    fn record_delivery(
        &self,
        body: &str,
        seq: u64,
        local: &mut Vec<(u32, u32, u64)>,
        e2e: &mut Histogram<u64>,
    ) -> anyhow::Result<()> {
        let b = B64.decode(body)?;
        if b.len() < 24 || u64::from_be_bytes(b[16..24].try_into()?) != self.run_id {
            // Another run's message: acked, counted apart.
            self.other_runs.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let sent_us = u64::from_be_bytes(b[..8].try_into()?);
        let sender = u32::from_be_bytes(b[8..12].try_into()?);
        let k = u32::from_be_bytes(b[12..16].try_into()?);
        e2e.saturating_record(wall_us().saturating_sub(sent_us).max(1));
        local.push((sender, k, seq));
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.last_delivery_us.store(wall_us(), Ordering::Relaxed);
        Ok(())
    }
}

async fn open(ctx: &Ctx, conn: usize, attempt: usize) -> anyhow::Result<Ws> {
    let (target, url) = &ctx.targets[(conn + attempt) % ctx.targets.len()];
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = ctx.source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(*target).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match &ctx.tls {
        Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
        None => Box::new(tcp),
    };
    let mut req = url.as_str().into_client_request()?;
    if ctx.args.protocol == Protocol::Relay {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", ctx.tokens[conn].1).parse()?,
        );
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(config)).await?;
    let (user, token) = &ctx.tokens[conn];
    if let Some(hello) = ctx.args.protocol.hello(user, token) {
        ws.send(Message::text(hello)).await?;
    }
    Ok(ws)
}

/// Connects and syncs: replayed messages are counted as deliveries and acknowledged.
async fn connect(
    ctx: &Ctx,
    conn: usize,
    attempt: usize,
    local: &mut Vec<(u32, u32, u64)>,
    e2e: &mut Histogram<u64>,
) -> anyhow::Result<Ws> {
    let started = Instant::now();
    let mut ws = open(ctx, conn, attempt).await?;
    let mut acks = Vec::new();
    loop {
        let Some(msg) = ws.next().await else {
            bail!("closed during sync")
        };
        let Message::Text(t) = msg? else { continue };
        let mut synced = false;
        for event in ctx.args.protocol.events(&t)? {
            match event {
                Event::Synced => synced = true,
                Event::Deliver { body, seq } => {
                    ctx.record_delivery(&body, seq, local, e2e)?;
                    acks.push(seq);
                }
                Event::Ping => ws.send(Message::text("{}")).await?,
                Event::Accepted | Event::Rejected(_) | Event::Other => {}
            }
        }
        if synced {
            break;
        }
    }
    let h = if attempt > 0 {
        &ctx.resync
    } else {
        &ctx.handshake
    };
    h.lock()
        .await
        .saturating_record(started.elapsed().as_micros() as u64);
    for frame in acks.chunks(1024).filter_map(|c| ctx.args.protocol.ack(c)) {
        ws.send(Message::text(frame)).await?;
    }
    Ok(ws)
}

/// The id of send `k` of connection `conn`: the same when it is resent after a reconnect.
fn message_id(ctx: &Ctx, conn: usize, k: u32) -> uuid::Uuid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&ctx.run_id.to_be_bytes());
    b[8..12].copy_from_slice(&(conn as u32).to_be_bytes());
    b[12..].copy_from_slice(&k.to_be_bytes());
    uuid::Builder::from_custom_bytes(b).into_uuid()
}

fn send_frame(ctx: &Ctx, conn: usize, k: u32) -> String {
    let mut b = vec![0xA5u8; ctx.args.payload.max(24)];
    b[..8].copy_from_slice(&wall_us().to_be_bytes());
    b[8..12].copy_from_slice(&(conn as u32).to_be_bytes());
    b[12..16].copy_from_slice(&k.to_be_bytes());
    b[16..24].copy_from_slice(&ctx.run_id.to_be_bytes());
    let urgent = ctx.args.urgent > 0.0 && (k as f64 * 0.618_034).fract() < ctx.args.urgent;
    let a = &ctx.args;
    let elsewhere;
    let to = match &a.to_prefix {
        Some(prefix) => {
            let users = a.to_users.unwrap_or(a.connections).max(1);
            elsewhere = format!("{prefix}-{}", (conn + k as usize * a.connections) % users);
            &elsewhere
        }
        None => &ctx.tokens[(conn + 1) % ctx.tokens.len()].0,
    };
    a.protocol
        .send(message_id(ctx, conn, k), k, to, &B64.encode(b), urgent)
}

/// One device for the whole run: sessions, churn, reconnects, sends, receipts, acks.
async fn device(ctx: Arc<Ctx>, conn: usize, mut ws: Ws, interval: Option<Duration>) {
    let mut accepted: Vec<u32> = Vec::new();
    let mut local: Vec<(u32, u32, u64)> = Vec::new();
    let mut e2e = histogram();
    let mut acc_h = histogram();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut closed: BTreeMap<u16, u64> = BTreeMap::new();
    let mut error = false;
    let mut k = 0u32;
    let mut attempt = 0usize;
    // Sends not yet answered; with --reconnect they are resent, same ids, after a drop.
    let mut outstanding: VecDeque<(u32, Instant)> = VecDeque::new();
    let churn = ctx.args.scenario == Scenario::Churn;
    let result: anyhow::Result<()> = async {
        loop {
            // One session.
            let mut acks: Vec<u64> = Vec::new();
            let mut tick = interval.map(|i| {
                let offset = match ctx.args.burst {
                    // Devices in groups of `burst`: a group's sends fall within 2 ms, one group
                    // every burst/rate seconds.
                    Some(b) if b > 0 => {
                        let b = b as usize;
                        let period = i.mul_f64(b as f64 / ctx.args.connections as f64);
                        let group = (conn / b) as f64;
                        let within = Duration::from_micros(2_000 * (conn % b) as u64 / b as u64);
                        (period.mul_f64(group) + within).min(i)
                    }
                    _ => i.mul_f64((conn % 97) as f64 / 97.0),
                };
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut ack_tick = tokio::time::interval(Duration::from_millis(20));
            let churn_at = churn.then(|| {
                let spread = (conn as u64 * 7919) % (ctx.args.churn_every * 1000);
                tokio::time::Instant::now() + Duration::from_millis(ctx.args.churn_every * 500 + spread)
            });
            let session: anyhow::Result<bool> = async {
            // After a reconnect: what was not answered goes again, under the same ids (a node
            // killed meanwhile fails this like any other write of the session).
            for &(idx, _) in &outstanding {
                ws.feed(Message::text(send_frame(&ctx, conn, idx))).await?;
            }
            ws.flush().await?;
            loop {
                let sending = ctx.sending.load(Ordering::Relaxed);
                if ctx.draining.load(Ordering::Relaxed) && outstanding.is_empty() && acks.is_empty() {
                    break Ok(false);
                }
                let closed_loop = sending && interval.is_none() && outstanding.len() < ctx.args.window;
                tokio::select! {
                    _ = async { tick.as_mut().expect("tick").tick().await }, if tick.is_some() && sending => {
                        ctx.in_flight.fetch_add(1, Ordering::Relaxed);
                        outstanding.push_back((k, Instant::now()));
                        ws.send(Message::text(send_frame(&ctx, conn, k))).await?;
                        k += 1;
                    }
                    _ = std::future::ready(()), if closed_loop => {
                        ctx.in_flight.fetch_add(1, Ordering::Relaxed);
                        outstanding.push_back((k, Instant::now()));
                        ws.feed(Message::text(send_frame(&ctx, conn, k))).await?;
                        k += 1;
                        if outstanding.len() >= ctx.args.window { ws.flush().await?; }
                    }
                    _ = async { tokio::time::sleep_until(churn_at.expect("churn")).await }, if churn_at.is_some() && sending => {
                        break Ok(true);
                    }
                    _ = ack_tick.tick() => {
                        ws.flush().await?;
                        if let Some(frame) = ctx.args.protocol.ack(&acks) {
                            ws.send(Message::text(frame)).await?;
                        }
                        acks.clear();
                    }
                    msg = ws.next() => {
                        let msg = match msg {
                            None => bail!("connection {conn} closed"),
                            Some(Ok(Message::Close(frame))) => {
                                *closed.entry(frame.map_or(1005, |f| u16::from(f.code))).or_default() += 1;
                                bail!("connection {conn} closed by the relay");
                            }
                            Some(m) => m?,
                        };
                        let Message::Text(text) = msg else { continue };
                        for event in ctx.args.protocol.events(&text)? { match event {
                            Event::Accepted => {
                                if let Some((idx, t)) = outstanding.pop_front() {
                                    acc_h.saturating_record(t.elapsed().as_micros() as u64);
                                    accepted.push(idx);
                                }
                                ctx.in_flight.fetch_sub(1, Ordering::Relaxed);
                                ctx.accepted.fetch_add(1, Ordering::Relaxed);
                            }
                            Event::Rejected(code) => {
                                outstanding.pop_front();
                                ctx.in_flight.fetch_sub(1, Ordering::Relaxed);
                                *rejected.entry(code).or_default() += 1;
                            }
                            Event::Deliver { body, seq } => {
                                ctx.record_delivery(&body, seq, &mut local, &mut e2e)?;
                                acks.push(seq);
                                if acks.len() >= 256 {
                                    if let Some(frame) = ctx.args.protocol.ack(&acks) {
                                        ws.send(Message::text(frame)).await?;
                                    }
                                    acks.clear();
                                }
                            }
                            Event::Ping => ws.send(Message::text("{}")).await?,
                            Event::Synced | Event::Other => {}
                        }}
                    }
                }
            }}.await;
            let go_offline = match session {
                Ok(go_offline) => go_offline,
                Err(e) if ctx.args.reconnect => {
                    // Dropped (node killed, drained, bus trouble...): reconnect elsewhere,
                    // catch up, resend what was not answered under the same ids.
                    ctx.reconnects.fetch_add(1, Ordering::Relaxed);
                    let since = Instant::now();
                    loop {
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..500))).await;
                        attempt += 1;
                        match connect(&ctx, conn, attempt, &mut local, &mut e2e).await {
                            Ok(w) => { ws = w; break; }
                            Err(again) if since.elapsed() < Duration::from_secs(30) => {
                                let _ = again;
                            }
                            Err(again) => return Err(again.context(format!("reconnect after: {e:#}"))),
                        }
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !go_offline {
                let _ = ws.close(None).await;
                return Ok(());
            }
            let _ = ws.close(None).await;
            // Unanswered sends of a session closed on purpose are unknown, as above.
            ctx.in_flight.fetch_sub(outstanding.len() as u64, Ordering::Relaxed);
            outstanding.clear();
            tokio::time::sleep(Duration::from_secs(ctx.args.offline)).await;
            ws = connect(&ctx, conn, 0, &mut local, &mut e2e).await?;
        }
    }
    .await;
    // Sends still unanswered when the device stops are unknown: neither accepted nor lost.
    ctx.in_flight
        .fetch_sub(outstanding.len() as u64, Ordering::Relaxed);
    if let Err(e) = result {
        error = true;
        eprintln!("device {conn} gave up: {e:#}");
    }
    let mut r = ctx.report.lock().await;
    r.accepted.entry(conn as u32).or_default().extend(accepted);
    for (sender, k, seq) in local {
        r.delivered.entry(sender).or_default().push((k, seq));
    }
    for (code, n) in rejected {
        *r.rejected.entry(code).or_default() += n;
    }
    for (code, n) in closed {
        *r.closed_by_relay.entry(code).or_default() += n;
    }
    r.connection_errors += u64::from(error);
    drop(r);
    let _ = ctx.end_to_end.lock().await.add(e2e);
    let _ = ctx.accept.lock().await.add(acc_h);
}

/// Runs this process's share of the connections and returns what it saw.
async fn worker(
    args: Args,
    index: usize,
    run_id: u64,
    start_at_ms: Option<u64>,
) -> anyhow::Result<WorkerReport> {
    let urls = args
        .url
        .iter()
        .map(|u| url_parts(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Some(url) = urls.first() else {
        bail!("--url is required")
    };
    let tokens = load_tokens(&args)?;
    let tls = match (url.tls, &args.ca) {
        (false, _) => None,
        (true, ca) => Some(tls_connector(ca.as_deref(), &url.host)?),
    };
    let targets = urls
        .iter()
        .zip(&args.url)
        .map(|(u, raw)| (u.addr, raw.clone()))
        .collect();
    let ctx = Arc::new(Ctx {
        source: (args.workers > 1).then(|| IpAddr::from([127, 0, 0, 2 + (index % 250) as u8])),
        targets,
        tls,
        run_id,
        tokens,
        sending: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        in_flight: AtomicU64::new(0),
        last_delivery_us: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        other_runs: AtomicU64::new(0),
        report: Mutex::new(WorkerReport::default()),
        handshake: Mutex::new(histogram()),
        accept: Mutex::new(histogram()),
        end_to_end: Mutex::new(histogram()),
        resync: Mutex::new(histogram()),
        reconnects: AtomicU64::new(0),
        args,
    });
    let a = &ctx.args;
    let mine: Vec<usize> = (0..a.connections)
        .filter(|c| c % a.workers.max(1) == index)
        .collect();

    // Connect everyone first (paced in a storm), so devices are known before sending starts.
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let pace = (a.scenario == Scenario::Storm && a.handshake_rate > 0)
        .then(|| Duration::from_secs_f64(a.workers.max(1) as f64 / a.handshake_rate as f64));
    let connect_start = Instant::now();
    let mut pending = Vec::with_capacity(mine.len());
    for &conn in &mine {
        if let Some(p) = pace {
            tokio::time::sleep_until(tokio::time::Instant::from_std(
                connect_start + p * pending.len() as u32,
            ))
            .await;
        }
        let permit = gate.clone().acquire_owned().await?;
        let ctx = ctx.clone();
        pending.push(tokio::spawn(async move {
            let _permit = permit;
            let mut local = Vec::new();
            let mut e2e = histogram();
            let ws = connect(&ctx, conn, 0, &mut local, &mut e2e).await;
            (conn, ws)
        }));
    }
    let mut sockets = Vec::with_capacity(mine.len());
    for p in pending {
        let (conn, ws) = p.await?;
        match ws {
            Ok(ws) => sockets.push((conn, ws)),
            Err(e) => {
                ctx.report.lock().await.connection_errors += 1;
                eprintln!("connect {conn}: {e:#}");
            }
        }
    }
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    eprintln!(
        "worker {index}: connected {}/{} in {connect_seconds:.2}s",
        sockets.len(),
        mine.len()
    );

    // Workers start sending together.
    if let Some(at) = start_at_ms {
        let now = (wall_us() / 1000) as i64;
        tokio::time::sleep(Duration::from_millis((at as i64 - now).max(0) as u64)).await;
    }
    let duration = Duration::from_secs(a.duration());
    let mut report_send_seconds = 0.0;
    if !a.sends() {
        tokio::time::sleep(duration).await;
        drop(sockets);
    } else {
        let rate = a.rate();
        let interval =
            (rate > 0).then(|| Duration::from_secs_f64(a.connections as f64 / rate as f64));
        ctx.sending.store(true, Ordering::Relaxed);
        let tasks: Vec<_> = sockets
            .into_iter()
            .map(|(conn, ws)| tokio::spawn(device(ctx.clone(), conn, ws, interval)))
            .collect();
        let send_start = Instant::now();
        let progress = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut last = (0, 0);
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let (acc, del) = (
                        ctx.accepted.load(Ordering::Relaxed),
                        ctx.delivered.load(Ordering::Relaxed),
                    );
                    eprintln!(
                        "worker {index}: accepted {acc} (+{}/s)  delivered {del} (+{}/s)  in flight {}",
                        acc - last.0,
                        del - last.1,
                        ctx.in_flight.load(Ordering::Relaxed)
                    );
                    last = (acc, del);
                }
            })
        };
        tokio::time::sleep(duration).await;
        ctx.sending.store(false, Ordering::Relaxed);
        report_send_seconds = send_start.elapsed().as_secs_f64();
        // Let sends already started get their answers, and deliveries (also from other workers)
        // arrive: done once nothing is in flight and nothing arrived for a second, or after 15 s.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let quiet =
                wall_us().saturating_sub(ctx.last_delivery_us.load(Ordering::Relaxed)) > 1_000_000;
            if ctx.in_flight.load(Ordering::Relaxed) == 0 && quiet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ctx.draining.store(true, Ordering::Relaxed);
        for t in tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                eprintln!("worker {index}: a connection did not finish");
            }
        }
        progress.abort();
    }
    let mut r = std::mem::take(&mut *ctx.report.lock().await);
    r.connect_seconds = connect_seconds;
    r.connected = ctx.handshake.lock().await.len();
    r.send_seconds = report_send_seconds;
    r.handshake = encode(&*ctx.handshake.lock().await)?;
    r.accept = encode(&*ctx.accept.lock().await)?;
    r.end_to_end = encode(&*ctx.end_to_end.lock().await)?;
    r.resync = encode(&*ctx.resync.lock().await)?;
    r.reconnects = ctx.reconnects.load(Ordering::Relaxed);
    r.from_other_runs = ctx.other_runs.load(Ordering::Relaxed);
    Ok(r)
}

struct Url {
    addr: SocketAddr,
    host: String,
    tls: bool,
}

fn url_parts(url: &str) -> anyhow::Result<Url> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("ws://") {
        (false, r)
    } else {
        bail!("--url must start with ws:// or wss://");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h.trim_matches(['[', ']']).to_string(), p.parse()?)
        }
        _ => (authority.trim_matches(['[', ']']).to_string(), default_port),
    };
    let ip: IpAddr = if host == "localhost" {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse()
            .context("--url host must be an IP address or localhost (load goes to loopback)")?
    };
    if !ip.is_loopback() {
        bail!("loadtest only targets loopback addresses (127.0.0.0/8, ::1); got {ip}");
    }
    Ok(Url {
        addr: SocketAddr::new(ip, port),
        host,
        tls,
    })
}

fn tls_connector(
    ca: Option<&std::path::Path>,
    host: &str,
) -> anyhow::Result<(
    tokio_rustls::TlsConnector,
    rustls_pki_types::ServerName<'static>,
)> {
    use rustls_pki_types::pem::PemObject as _;
    let ca = ca.context("wss:// needs --ca with the relay's CA certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(host.to_string())?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

/// (user id, token) per connection.
fn load_tokens(args: &Args) -> anyhow::Result<Vec<(String, String)>> {
    if let Some(path) = &args.tokens {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let tokens: Vec<(String, String)> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|t| {
                let payload = t.split('.').nth(1).context("not a JWT")?;
                let claims: serde_json::Value = serde_json::from_slice(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?,
                )?;
                Ok((
                    claims["sub"]
                        .as_str()
                        .context("token without sub")?
                        .to_string(),
                    t.to_string(),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        if tokens.len() < args.connections {
            bail!(
                "{} has {} tokens for {} connections",
                path.display(),
                tokens.len(),
                args.connections
            );
        }
        return Ok(tokens);
    }
    let now = wall_us() / 1_000_000;
    if args.protocol == Protocol::Centrifugo {
        let secret = args.hmac_secret.as_deref().context("--hmac-secret")?;
        return (0..args.connections)
            .map(|i| {
                let sub = format!("{}-{i}", args.prefix);
                let token = wire::centrifugo_token(secret, &sub, now + 86_400)?;
                Ok((sub, token))
            })
            .collect();
    }
    let key = args.key.as_ref().context("--key or --tokens")?;
    let minter = Minter::from_pem(
        &std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?,
    )?;
    (0..args.connections)
        .map(|i| {
            let sub = format!("{}-{i}", args.prefix);
            let token = minter.mint(&Claims {
                sub: sub.clone(),
                dev: "d".into(),
                org: args.org.clone(),
                iat: args.iat.unwrap_or(now),
                exp: now + 86_400,
                nbf: None,
                urgent: args.urgent > 0.0,
                sep: 0,
                aud: args.audience.clone(),
            })?;
            Ok((sub, token))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run_id = args
        .run_id
        .unwrap_or_else(|| wall_us() ^ u64::from(std::process::id()) << 32);
    if let Some(index) = args.worker_index {
        // A worker: its share, reported as JSON on stdout.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let report = rt.block_on(worker(args.clone(), index, run_id, args.start_at_ms))?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let rss_before = args.relay_pid.and_then(rss_kib);
    let kernel_before = kernel_bytes();
    let reports: Vec<WorkerReport> = if args.workers <= 1 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        vec![rt.block_on(worker(args.clone(), 0, run_id, None))?]
    } else {
        // Children connect, then all start sending at the same wall-clock instant.
        let exe = std::env::current_exe()?;
        let setup_ms = 3_000 + (args.connections as u64 / 2);
        let start_at = wall_us() / 1000 + setup_ms;
        let own: Vec<String> = std::env::args().skip(1).collect();
        let children: Vec<_> = (0..args.workers)
            .map(|i| {
                std::process::Command::new(&exe)
                    .args(&own)
                    .args([
                        "--worker-index",
                        &i.to_string(),
                        "--run-id",
                        &run_id.to_string(),
                        "--start-at-ms",
                        &start_at.to_string(),
                    ])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        let mut reports = Vec::new();
        for child in children {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("a worker failed ({})", out.status);
            }
            reports.push(serde_json::from_slice(&out.stdout).context("worker report")?);
        }
        reports
    };
    let report = merge(&args, reports, rss_before, kernel_before)?;
    finish(&args, report)
}

fn merge(
    args: &Args,
    reports: Vec<WorkerReport>,
    rss_before: Option<u64>,
    kernel_before: Option<u64>,
) -> anyhow::Result<Report> {
    let (mut hs, mut acc, mut e2e, mut resync) =
        (histogram(), histogram(), histogram(), histogram());
    let (mut reconnects, mut from_other_runs) = (0, 0);
    let mut accepted: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut delivered: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
    let mut rejected_by_code = BTreeMap::new();
    let mut closed_by_relay = BTreeMap::new();
    let (mut connect_seconds, mut send_seconds, mut errors, mut connected) = (0f64, 0f64, 0, 0);
    for r in reports {
        hs.add(decode(&r.handshake)?)?;
        acc.add(decode(&r.accept)?)?;
        e2e.add(decode(&r.end_to_end)?)?;
        resync.add(decode(&r.resync)?)?;
        reconnects += r.reconnects;
        from_other_runs += r.from_other_runs;
        for (s, v) in r.accepted {
            accepted.entry(s).or_default().extend(v);
        }
        for (s, v) in r.delivered {
            delivered.entry(s).or_default().extend(v);
        }
        for (c, n) in r.rejected {
            *rejected_by_code.entry(c).or_default() += n;
        }
        for (c, n) in r.closed_by_relay {
            *closed_by_relay.entry(c).or_default() += n;
        }
        connect_seconds = connect_seconds.max(r.connect_seconds);
        send_seconds = send_seconds.max(r.send_seconds);
        errors += r.connection_errors;
        connected += r.connected;
    }
    // Total-queue check, per sender: every accepted index delivered. A send delivered under
    // two sequence numbers was stored twice (a duplicate); the same one delivered again is a
    // redelivery, which clients drop by message id.
    let (mut n_accepted, mut lost, mut n_delivered) = (0u64, 0u64, 0u64);
    let (mut duplicates, mut redeliveries) = (0u64, 0u64);
    let mut lost_senders = 0;
    for (sender, acc_idx) in &accepted {
        let got: std::collections::HashSet<u32> = delivered
            .get(sender)
            .map(|v| v.iter().map(|&(k, _)| k).collect())
            .unwrap_or_default();
        // A resent message may be answered `accepted` twice.
        let acc_idx: std::collections::HashSet<u32> = acc_idx.iter().copied().collect();
        n_accepted += acc_idx.len() as u64;
        if args.to_prefix.is_some() {
            continue; // delivered to another run's devices, later
        }
        let mut missing: Vec<u32> = acc_idx
            .iter()
            .copied()
            .filter(|k| !got.contains(k))
            .collect();
        if !missing.is_empty() && lost_senders < 20 {
            // Which sends: the run's messages are evenly spaced, so k dates them.
            missing.sort_unstable();
            lost_senders += 1;
            eprintln!(
                "  lost: {} of sender {sender}'s {} accepted sends, k {:?}",
                missing.len(),
                acc_idx.len(),
                &missing[..missing.len().min(12)]
            );
        }
        lost += missing.len() as u64;
    }
    for v in delivered.values() {
        let mut seqs: HashMap<u32, std::collections::HashSet<u64>> = HashMap::new();
        for &(k, seq) in v {
            seqs.entry(k).or_default().insert(seq);
        }
        n_delivered += seqs.len() as u64;
        duplicates += seqs.values().map(|s| s.len() as u64 - 1).sum::<u64>();
        redeliveries += v.len() as u64 - seqs.values().map(|s| s.len() as u64).sum::<u64>();
    }
    let rss_after = args.relay_pid.and_then(rss_kib);
    let per_conn = |a: Option<u64>, b: Option<u64>, scale: u64| match (a, b) {
        (Some(a), Some(b)) if connected > 0 => {
            Some((a.saturating_sub(b) * scale) as f64 / connected as f64)
        }
        _ => None,
    };
    let sends = args.sends();
    Ok(Report {
        scenario: args.scenario,
        connections: args.connections,
        workers: args.workers.max(1),
        payload_bytes: args.payload,
        target_rate: if sends { args.rate() } else { 0 },
        connect_seconds,
        handshakes_per_s: connected as f64 / connect_seconds.max(1e-9),
        handshake: summarize(&hs),
        send_seconds,
        accepted: n_accepted,
        rejected: rejected_by_code.values().sum(),
        rejected_by_code,
        accepted_per_s: n_accepted as f64 / send_seconds.max(1e-9),
        delivered: n_delivered,
        delivered_per_s: n_delivered as f64 / send_seconds.max(1e-9),
        delivered_from_other_runs: from_other_runs,
        lost,
        duplicates,
        redeliveries,
        reconnects,
        resync: (reconnects > 0).then(|| summarize(&resync)),
        connection_errors: errors,
        closed_by_relay,
        end_to_end: sends.then(|| summarize(&e2e)),
        accept: sends.then(|| summarize(&acc)),
        relay_rss_before_kib: rss_before,
        relay_rss_after_kib: if sends { None } else { rss_after },
        relay_rss_per_conn_bytes: if sends {
            None
        } else {
            per_conn(rss_after, rss_before, 1024)
        },
        kernel_per_conn_bytes: if sends {
            None
        } else {
            per_conn(kernel_bytes(), kernel_before, 1)
        },
    })
}

fn finish(args: &Args, report: Report) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, &json)?;
    }
    let mut summary = format!(
        "\n{:?}: {} connections ({} worker(s)), handshakes {:.0}/s p99 {:.1} ms",
        report.scenario,
        report.connections,
        report.workers,
        report.handshakes_per_s,
        report.handshake.p99_ms
    );
    if let (Some(e), Some(a)) = (&report.end_to_end, &report.accept) {
        summary += &format!(
            "\n  accepted {} ({:.0}/s), delivered {}, lost {}, duplicates {}, redeliveries {}, rejected {:?}\n  accept p50 {:.2} ms p99 {:.2} ms | send→deliver p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms",
            report.accepted,
            report.accepted_per_s,
            report.delivered,
            report.lost,
            report.duplicates,
            report.redeliveries,
            report.rejected_by_code,
            a.p50_ms,
            a.p99_ms,
            e.p50_ms,
            e.p90_ms,
            e.p99_ms,
            e.p999_ms,
            e.max_ms
        );
    }
    if let Some(prefix) = &args.to_prefix {
        summary += &format!("\n  sent to {prefix}'s users: their run checks the delivery");
    }
    if report.delivered_from_other_runs > 0 {
        summary += &format!(
            "\n  delivered from earlier runs {}",
            report.delivered_from_other_runs
        );
    }
    if let Some(b) = report.relay_rss_per_conn_bytes {
        summary += &format!("\n  relay RSS per connection {b:.0} bytes");
    }
    if let Some(r) = &report.resync {
        summary += &format!(
            "\n  reconnects {}, reconnect→synced p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            report.reconnects, r.p50_ms, r.p99_ms, r.max_ms
        );
    }
    if report.connection_errors > 0 || !report.closed_by_relay.is_empty() {
        summary += &format!(
            "\n  connection errors {}, closed by the relay {:?}",
            report.connection_errors, report.closed_by_relay
        );
    }
    eprintln!("{summary}");
    if let (Some(max), Some(l)) = (args.max_p99_ms, &report.end_to_end)
        && l.p99_ms > max
    {
        bail!("p99 {:.2} ms exceeds --max-p99-ms {max}", l.p99_ms);
    }
    if report.connection_errors > 0 {
        bail!("{} connection(s) failed", report.connection_errors);
    }
    if report.duplicates > 0 {
        bail!("{} messages were stored more than once", report.duplicates);
    }
    if report.accepted > 0 && report.lost as f64 / report.accepted as f64 > args.max_loss {
        bail!(
            "lost {} of {} accepted messages",
            report.lost,
            report.accepted
        );
    }
    Ok(())
}
