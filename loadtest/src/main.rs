//! `loadtest`: drives a relay through the real protocol and measures what SREs care about.
//!
//! Every connection is a device of its own user; device `i` sends to user `i+1` (a ring), so
//! every accepted message has exactly one intended recipient device. The send time travels
//! inside the opaque body, which gives end-to-end latency (send → deliver) without clock sync.
//! At the end a total-queue check compares every accepted message with every delivery: loss and
//! duplicates.
//!
//! Scenarios:
//! - `steady`: open loop at `--rate` messages/s in total (or closed loop with `--rate 0`,
//!   `--window` sends in flight per connection: the accept-throughput ceiling);
//! - `idle`: connect, sync, hold; reports the relay's memory per connection (`--relay-pid`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use relay::auth::{Claims, Minter};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Steady,
    Idle,
}

#[derive(Parser)]
#[command(about = "Load generator for the relay")]
struct Args {
    /// Relay WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ws")]
    url: String,
    /// Token-signing private key (PKCS#8 PEM), e.g. relay-data/dev-secrets/token-signing-key.pem.
    #[arg(long)]
    key: PathBuf,
    /// Token audience.
    #[arg(long, default_value = "relay")]
    audience: String,
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// Connections (one device, one user each).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Total messages per second, open loop; 0 = closed loop as fast as accepted.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Sends in flight per connection in closed loop.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Sending (steady) or holding (idle) time, seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Body size in bytes (at least 16).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Relay process id, to report its memory (idle scenario).
    #[arg(long)]
    relay_pid: Option<u32>,
    /// User-id prefix, so runs do not share inboxes.
    #[arg(long, default_value = "lt")]
    prefix: String,
    /// Write the JSON report here as well.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Exit non-zero if end-to-end p99 exceeds this many milliseconds.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Exit non-zero if more than this fraction of accepted messages is lost.
    #[arg(long, default_value_t = 0.0)]
    max_loss: f64,
}

/// What one connection saw.
#[derive(Default)]
struct ConnStats {
    accepted: Vec<u64>,
    rejected: u64,
    delivered: Vec<u64>,
    latency_us: Option<Histogram<u64>>,
    accept_us: Option<Histogram<u64>>,
    closed_by_relay: Option<u16>,
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
    payload_bytes: usize,
    target_rate: u64,
    connect_seconds: f64,
    handshakes_per_s: f64,
    handshake: Latency,
    send_seconds: f64,
    accepted: u64,
    rejected: u64,
    accepted_per_s: f64,
    delivered: u64,
    delivered_per_s: f64,
    lost: u64,
    duplicates: u64,
    connection_errors: u64,
    closed_by_relay: std::collections::BTreeMap<u16, u64>,
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

/// Kernel memory that grows with sockets: slab (socket structs, inodes, dentries) plus TCP buffer
/// pages. System-wide, so it includes the client end of each loopback connection.
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
    let tcp = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let fields: Vec<&str> = tcp.split_whitespace().collect();
    let pages: u64 = fields
        .iter()
        .position(|f| *f == "mem")
        .and_then(|i| fields.get(i + 1))
        .and_then(|v| v.parse().ok())?;
    Some(slab_kib * 1024 + pages * 4096)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: &str) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true).await?;
    // hello, replayed messages (acknowledged so the run starts clean), synced
    let mut stale = Vec::new();
    loop {
        let Some(msg) = ws.next().await else {
            bail!("closed during sync")
        };
        if let Message::Text(t) = msg? {
            let v: serde_json::Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("synced") => break,
                Some("deliver") => stale.extend(v["seq"].as_u64()),
                _ => {}
            }
        }
    }
    for chunk in stale.chunks(1024) {
        ws.send(Message::text(
            serde_json::json!({"type":"ack","seqs":chunk}).to_string(),
        ))
        .await?;
    }
    Ok(ws)
}

struct Shared {
    start: Instant,
    sending: AtomicBool,
    /// Set a moment after `sending` clears, once no send can still be starting: only then may a
    /// connection conclude that everything accepted has arrived.
    draining: AtomicBool,
    in_flight: AtomicU64,
    accepted: AtomicU64,
    delivered: AtomicU64,
}

fn body(shared: &Shared, conn: usize, k: u64, size: usize) -> String {
    let mut b = vec![0xA5u8; size.max(16)];
    let sent_us = shared.start.elapsed().as_micros() as u64;
    b[..8].copy_from_slice(&sent_us.to_be_bytes());
    b[8..16].copy_from_slice(&((conn as u64) << 32 | k).to_be_bytes());
    B64.encode(b)
}

/// Runs one connection: sends (per `per_conn_rate`, or closed loop), receives, acks.
async fn drive(
    mut ws: Ws,
    conn: usize,
    to: String,
    args: Arc<Args>,
    shared: Arc<Shared>,
    per_conn_interval: Option<Duration>,
    slot: Arc<tokio::sync::Mutex<ConnStats>>,
) -> anyhow::Result<()> {
    let mut guard = slot.lock().await;
    let stats = &mut *guard;
    stats.latency_us = Some(Histogram::new_with_bounds(1, 60_000_000, 3)?);
    stats.accept_us = Some(Histogram::new_with_bounds(1, 60_000_000, 3)?);
    // Replies come in send order: the oldest send time belongs to the next reply.
    let mut sent_at: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let mut k = 0u64;
    let mut outstanding = 0usize;
    let mut acks: Vec<u64> = Vec::new();
    let mut tick = per_conn_interval.map(|i| {
        let mut t = tokio::time::interval_at(
            tokio::time::Instant::now() + i.mul_f64((conn % 97) as f64 / 97.0),
            i,
        );
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut ack_tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        let sending = shared.sending.load(Ordering::Relaxed);
        if shared.draining.load(Ordering::Relaxed) && outstanding == 0 && acks.is_empty() {
            // Keep reading until the collector says every accepted message arrived or time is up.
            if shared.delivered.load(Ordering::Relaxed) >= shared.accepted.load(Ordering::Relaxed)
                && shared.in_flight.load(Ordering::Relaxed) == 0
            {
                break;
            }
        }
        let want_send = sending
            && match per_conn_interval {
                None => outstanding < args.window,
                Some(_) => false,
            };
        tokio::select! {
            _ = async { tick.as_mut().expect("tick").tick().await }, if tick.is_some() && sending => {
                let frame = serde_json::json!({"type":"send","id":uuid::Uuid::new_v4(),"to":[&to],"body":body(&shared, conn, k, args.payload)});
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                sent_at.push_back(Instant::now());
                ws.send(Message::text(frame.to_string())).await?;
                k += 1;
                outstanding += 1;
            }
            _ = std::future::ready(()), if want_send => {
                let frame = serde_json::json!({"type":"send","id":uuid::Uuid::new_v4(),"to":[&to],"body":body(&shared, conn, k, args.payload)});
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                sent_at.push_back(Instant::now());
                ws.feed(Message::text(frame.to_string())).await?;
                k += 1;
                outstanding += 1;
                if outstanding >= args.window { ws.flush().await?; }
            }
            _ = ack_tick.tick() => {
                if want_send { ws.flush().await?; }
                if !acks.is_empty() {
                    let frame = serde_json::json!({"type":"ack","seqs":&acks});
                    acks.clear();
                    ws.send(Message::text(frame.to_string())).await?;
                }
            }
            msg = ws.next() => {
                let msg = match msg {
                    None => bail!("connection {conn} closed"),
                    Some(Ok(Message::Close(frame))) => {
                        stats.closed_by_relay = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        bail!("connection {conn} closed by the relay");
                    }
                    Some(m) => m?,
                };
                let Message::Text(text) = msg else { continue };
                let v: serde_json::Value = serde_json::from_str(&text)?;
                match v["type"].as_str() {
                    Some("accepted") => {
                        if let (Some(t), Some(h)) = (sent_at.pop_front(), stats.accept_us.as_mut()) {
                            h.saturating_record(t.elapsed().as_micros() as u64);
                        }
                        outstanding = outstanding.saturating_sub(1);
                        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                        shared.accepted.fetch_add(1, Ordering::Relaxed);
                        // The msg index is not echoed: record by count, checked against deliveries.
                        stats.accepted.push(stats.accepted.len() as u64 | (conn as u64) << 32);
                    }
                    Some("rejected") => {
                        sent_at.pop_front();
                        outstanding = outstanding.saturating_sub(1);
                        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                        stats.rejected += 1;
                    }
                    Some("deliver") => {
                        let b = B64.decode(v["body"].as_str().unwrap_or_default())?;
                        if b.len() >= 16 {
                            let sent_us = u64::from_be_bytes(b[..8].try_into()?);
                            let idx = u64::from_be_bytes(b[8..16].try_into()?);
                            let now_us = shared.start.elapsed().as_micros() as u64;
                            if let Some(h) = stats.latency_us.as_mut() {
                                h.saturating_record(now_us.saturating_sub(sent_us).max(1));
                            }
                            stats.delivered.push(idx);
                            shared.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        acks.extend(v["seq"].as_u64());
                        if acks.len() >= 256 {
                            let frame = serde_json::json!({"type":"ack","seqs":&acks});
                            acks.clear();
                            ws.send(Message::text(frame.to_string())).await?;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let pem = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let minter = Minter::from_pem(&pem)?;
    let now = relay::store::now_ms() / 1000;
    let n = args.connections;
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            minter.mint(&Claims {
                sub: format!("{}-{i}", args.prefix),
                dev: "d".into(),
                org: None,
                iat: now,
                exp: now + 86_400,
                sep: 0,
                aud: args.audience.clone(),
            })
        })
        .collect::<Result<_, _>>()?;

    let rss_before = args.relay_pid.and_then(rss_kib);
    let kernel_before = kernel_bytes();

    // Connect everyone first, so every device is known before any message is sent.
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut handshake = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let connect_start = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for token in tokens {
        let gate = gate.clone();
        let url = args.url.clone();
        pending.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let t = Instant::now();
            let ws = connect(&url, &token).await?;
            Ok::<_, anyhow::Error>((ws, t.elapsed()))
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    let mut last_print = Instant::now();
    for (i, p) in pending.into_iter().enumerate() {
        let (ws, took) = p.await??;
        handshake.saturating_record(took.as_micros() as u64);
        sockets.push(ws);
        if last_print.elapsed() > Duration::from_secs(1) {
            eprint!("\rconnected {}/{n}", i + 1);
            last_print = Instant::now();
        }
    }
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    eprintln!("\rconnected {n}/{n} in {connect_seconds:.2}s");

    let shared = Arc::new(Shared {
        start: Instant::now(),
        sending: AtomicBool::new(args.scenario == Scenario::Steady),
        draining: AtomicBool::new(false),
        in_flight: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });

    let mut report = Report {
        scenario: args.scenario,
        connections: n,
        payload_bytes: args.payload,
        target_rate: args.rate,
        connect_seconds,
        handshakes_per_s: n as f64 / connect_seconds,
        handshake: summarize(&handshake),
        send_seconds: 0.0,
        accepted: 0,
        rejected: 0,
        accepted_per_s: 0.0,
        delivered: 0,
        delivered_per_s: 0.0,
        lost: 0,
        duplicates: 0,
        connection_errors: 0,
        closed_by_relay: Default::default(),
        end_to_end: None,
        accept: None,
        relay_rss_before_kib: rss_before,
        relay_rss_after_kib: None,
        relay_rss_per_conn_bytes: None,
        kernel_per_conn_bytes: None,
    };

    if args.scenario == Scenario::Idle {
        tokio::time::sleep(Duration::from_secs(args.duration)).await;
        let rss_after = args.relay_pid.and_then(rss_kib);
        report.relay_rss_after_kib = rss_after;
        if let (Some(a), Some(b)) = (rss_after, rss_before) {
            report.relay_rss_per_conn_bytes = Some((a.saturating_sub(b) * 1024) as f64 / n as f64);
        }
        if let (Some(a), Some(b)) = (kernel_bytes(), kernel_before) {
            report.kernel_per_conn_bytes = Some(a.saturating_sub(b) as f64 / n as f64);
        }
        drop(sockets);
        return finish(&args, report);
    }

    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(n as f64 / args.rate as f64));
    let mut tasks = Vec::with_capacity(n);
    let slots: Vec<_> = (0..n)
        .map(|_| Arc::new(tokio::sync::Mutex::new(ConnStats::default())))
        .collect();
    for (i, ws) in sockets.into_iter().enumerate() {
        let to = format!("{}-{}", args.prefix, (i + 1) % n);
        let slot = slots[i].clone();
        tasks.push(tokio::spawn(drive(
            ws,
            i,
            to,
            args.clone(),
            shared.clone(),
            interval,
            slot,
        )));
    }
    let send_start = Instant::now();
    let progress = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = (0u64, 0u64);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let a = shared.accepted.load(Ordering::Relaxed);
                let d = shared.delivered.load(Ordering::Relaxed);
                eprintln!(
                    "accepted {a} (+{}/s)  delivered {d} (+{}/s)  in flight {}",
                    a - last.0,
                    d - last.1,
                    shared.in_flight.load(Ordering::Relaxed)
                );
                last = (a, d);
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    shared.sending.store(false, Ordering::Relaxed);
    report.send_seconds = send_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(250)).await;
    shared.draining.store(true, Ordering::Relaxed);

    // Drain: every connection ends once all accepted messages are delivered, or after 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                report.connection_errors += 1;
                eprintln!("{e:#}");
            }
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => bail!("connection task failed: {e}"),
            Err(_) => {
                eprintln!("drain timed out: not every accepted message arrived within 10 s");
                aborts.iter().for_each(|a| a.abort());
                break;
            }
        }
    }
    progress.abort();

    let mut e2e = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut accept = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut delivered_ids = HashSet::new();
    let mut delivered_total = 0u64;
    let mut accepted_total = 0u64;
    for slot in slots {
        // A connection still running after the deadline holds its lock; wait for it briefly.
        let Ok(stats) = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if let Ok(mut g) = slot.try_lock() {
                    break std::mem::take(&mut *g);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        else {
            report.connection_errors += 1;
            continue;
        };
        accepted_total += stats.accepted.len() as u64;
        report.rejected += stats.rejected;
        delivered_total += stats.delivered.len() as u64;
        delivered_ids.extend(stats.delivered);
        if let Some(code) = stats.closed_by_relay {
            *report.closed_by_relay.entry(code).or_default() += 1;
        }
        if let Some(h) = stats.latency_us {
            e2e.add(h)?;
        }
        if let Some(h) = stats.accept_us {
            accept.add(h)?;
        }
    }
    report.accepted = accepted_total.max(shared.accepted.load(Ordering::Relaxed));
    report.delivered = delivered_ids.len() as u64;
    report.duplicates = delivered_total - delivered_ids.len() as u64;
    report.lost = report.accepted.saturating_sub(report.delivered);
    report.accepted_per_s = report.accepted as f64 / report.send_seconds;
    report.delivered_per_s = report.delivered as f64 / report.send_seconds;
    report.end_to_end = Some(summarize(&e2e));
    report.accept = Some(summarize(&accept));
    finish(&args, report)
}

fn finish(args: &Args, report: Report) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, &json)?;
    }
    if let (Some(max), Some(l)) = (args.max_p99_ms, &report.end_to_end)
        && l.p99_ms > max
    {
        bail!("p99 {:.2} ms exceeds --max-p99-ms {max}", l.p99_ms);
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
