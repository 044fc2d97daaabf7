//! How long an org access report takes for a large organisation over a month, on either
//! backend: writes a month of reported events for `--users` users of one org (and a smaller
//! org beside it, which the report must not read) through the audit writer, then times the
//! first page, every JSON page, and every CSV-sized part of the month.
//!
//! `cargo run --release -p relay-tests --bin org-report-bench -- --backend embedded`
//! (`--backend cassandra` needs `scripts/cassandra start`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use relay::audit::{self, Event, EventKind};
use relay::store::{MessageStore, Retention, now_ms};
use relay_tests::{Kind, Place, Recorder, audit_keys, auditor};

#[derive(Parser)]
struct Args {
    /// `embedded` or `cassandra`.
    #[arg(long, default_value = "embedded")]
    backend: String,
    /// Users of the reported organisation.
    #[arg(long, default_value_t = 5_000)]
    users: u32,
    /// Reported events per user and day (connects, logoffs, failed logins, ...).
    #[arg(long, default_value_t = 4)]
    per_day: u32,
    /// Days of events (the report's range).
    #[arg(long, default_value_t = 30)]
    days: u64,
    /// Users of another organisation, written alongside.
    #[arg(long, default_value_t = 1_000)]
    other_users: u32,
    /// Timed repetitions of each query (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const DAY: u64 = 86_400_000;
const KINDS: [EventKind; 4] = [
    EventKind::Connect,
    EventKind::IdleLogoff,
    EventKind::Connect,
    EventKind::AuthFailed,
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind = match args.backend.as_str() {
        "embedded" => Kind::Embedded,
        "cassandra" => Kind::Cassandra,
        other => anyhow::bail!("--backend embedded|cassandra, not {other}"),
    };
    let retention = Retention {
        archive_ms: 365 * DAY,
        inbox_ms: 30 * DAY,
        idempotency_ms: DAY,
        audit_ms: 6 * 365 * DAY,
    };
    let place = Place::new(kind).await;
    let store: Arc<dyn MessageStore> = place
        .open(place.keyring(), retention, Arc::new(Recorder::default()))
        .await;
    let (writer, task) = auditor(store.clone(), 0, audit_keys(), None);

    let to = now_ms();
    let from = to - args.days * DAY;
    let started = Instant::now();
    let mut written = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for (org, users) in [
        ("big-clinic", args.users),
        ("other-clinic", args.other_users),
    ] {
        for day in 0..args.days {
            for user in 0..users {
                for i in 0..args.per_day {
                    // xorshift: spread the day's events over the day.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    writer.record(Event {
                        ts: from + day * DAY + rng % DAY,
                        user: Some(format!("{org}-user-{user}")),
                        device: Some("phone".into()),
                        org: Some(org.into()),
                        ip: Some("192.0.2.10".into()),
                        reason: (i == 3).then(|| "token_expired".into()),
                        ..Event::new(KINDS[i as usize % KINDS.len()])
                    });
                    written += 1;
                    if written.is_multiple_of(20_000) {
                        writer.flush(Duration::from_secs(600)).await;
                    }
                }
            }
        }
    }
    writer.flush(Duration::from_secs(600)).await;
    let write_s = started.elapsed().as_secs_f64();
    let big = u64::from(args.users) * u64::from(args.per_day) * args.days;
    println!(
        "backend {}: wrote {written} events ({big} of the reported org, each also in a user partition) in {write_s:.1} s",
        args.backend
    );

    let first = median(args.runs, || async {
        let page = audit::org_report(&*store, "big-clinic", from, to + 1, 100, None).await?;
        anyhow::ensure!(page.events.len() == 100, "a first page of 100");
        Ok(0)
    })
    .await?;
    println!("first page (100 events): {:.1} ms", first.0 * 1000.0);
    for limit in [1_000usize, 10_000] {
        let (secs, pages) = median(args.runs, || async {
            let (mut rows, mut pages, mut cursor) = (0u64, 0usize, None);
            loop {
                let page =
                    audit::org_report(&*store, "big-clinic", from, to + 1, limit, cursor).await?;
                rows += page.events.len() as u64;
                pages += 1;
                match page.next.as_deref().and_then(audit::parse_cursor) {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            anyhow::ensure!(rows == big, "{rows} rows, {big} expected");
            Ok(pages)
        })
        .await?;
        println!(
            "whole month in pages of {limit}: {secs:.2} s, {pages} pages, {:.0} events/s",
            big as f64 / secs
        );
    }
    drop(writer);
    let _ = task.await;
    Ok(())
}

/// Median time of `runs` calls, and the last call's result.
async fn median<F, Fut>(runs: usize, mut call: F) -> anyhow::Result<(f64, usize)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let mut times = Vec::new();
    let mut out = 0;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        out = call().await?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], out))
}
