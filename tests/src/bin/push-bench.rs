//! Pushes per second through the push crate's dispatcher against the fake APNs server, over one
//! pooled set of HTTP/2 connections. Client and fake share this process (and the machine's cores).
//!
//! `cargo run --release -p relay-tests --bin push-bench -- --pushes 200000 --connections 4`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use push::apns::{Apns, ApnsConfig};
use push::dispatch::{Dispatcher, DispatcherConfig};
use push::{DeviceToken, Environment, Platform, Push};
use relay_tests::fake_push;

#[derive(Parser)]
struct Args {
    /// Pushes to send.
    #[arg(long, default_value_t = 200_000)]
    pushes: u32,
    /// HTTP/2 connections in the set.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Dispatcher workers (pushes in flight).
    #[arg(long, default_value_t = 512)]
    workers: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS of the fake (Apple announces up to 1000).
    #[arg(long, default_value_t = 1000)]
    max_streams: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let fake = fake_push::start(dir.path(), args.max_streams, false).await?;
    let roots = push::origin::roots(Some(&std::fs::read(dir.path().join("ca.pem"))?))?;
    let apns = Apns::new(
        ApnsConfig {
            team_id: fake_push::TEAM_ID.into(),
            key_id: fake_push::KEY_ID.into(),
            key_pem: std::fs::read(dir.path().join("apns-key.p8"))?,
            production_url: fake.apns_url.parse()?,
            sandbox_url: fake.apns_url.parse()?,
            connections: args.connections,
            timeout: Duration::from_secs(10),
            critical_entitlement: false,
            expiration_secs: 3600,
        },
        roots,
    )?;
    let dispatcher = Dispatcher::start(
        DispatcherConfig {
            capacity: args.pushes as usize,
            workers: args.workers,
            ..Default::default()
        },
        Some(apns),
        None,
        Arc::new(|_: &u32, _: &DeviceToken| {}),
    );
    let token = |i: u32| DeviceToken {
        platform: Platform::Apns,
        token: format!("{:064x}", i),
        environment: Environment::Production,
        app_id: "com.example.relay".into(),
    };
    // Warm up: connections, TLS, provider token.
    for i in 0..1000 {
        dispatcher.enqueue(i, token(i), wake());
    }
    while fake.served() < 1000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let base = fake.served();
    let started = Instant::now();
    for i in 0..args.pushes {
        dispatcher.enqueue(i, token(i), wake());
    }
    let target = base + u64::from(args.pushes);
    while fake.served() < target {
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!(
                "only {} of {} pushes answered",
                fake.served() - base,
                args.pushes
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "pushes": args.pushes,
            "connections": args.connections,
            "workers": args.workers,
            "seconds": secs,
            "pushes_per_s": (f64::from(args.pushes) / secs).round(),
            "max_in_flight_at_server": fake.max_in_flight(),
        })
    );
    Ok(())
}

fn wake() -> Push {
    Push::Wake {
        message: uuid::Uuid::new_v4(),
        badge: None,
        urgent: false,
    }
}
