//! The push crate's APNs and FCM clients and dispatcher against the fake HTTP/2 + TLS servers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use push::apns::{Apns, ApnsConfig};
use push::dispatch::{Dispatcher, DispatcherConfig};
use push::fcm::{Fcm, FcmConfig, ServiceAccount};
use push::payload::FcmStyle;
use push::{DeviceToken, Environment, Platform, Push};
use relay_tests::fake_push::{self, FakePush, Scripted};
use serde_json::Value;
use uuid::Uuid;

struct Rig {
    fake: FakePush,
    dispatcher: Dispatcher<u32>,
    gone: Arc<Mutex<Vec<u32>>>,
    _dir: tempfile::TempDir,
}

async fn rig(max_streams: u32, connections: usize, record: bool) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = fake_push::start(dir.path(), max_streams, record)
        .await
        .expect("fake push");
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
    let roots = push::origin::roots(Some(&ca)).expect("roots");
    let apns = Apns::new(
        ApnsConfig {
            team_id: fake_push::TEAM_ID.into(),
            key_id: fake_push::KEY_ID.into(),
            key_pem: std::fs::read(dir.path().join("apns-key.p8")).expect("p8"),
            production_url: fake.apns_url.parse().expect("url"),
            sandbox_url: fake.apns_url.parse().expect("url"),
            connections,
            timeout: Duration::from_secs(5),
            critical_entitlement: false,
            expiration_secs: 3600,
        },
        roots.clone(),
    )
    .expect("apns");
    let account = ServiceAccount::from_json(
        &std::fs::read(dir.path().join("service-account.json")).expect("sa"),
    )
    .expect("service account");
    let fcm = Fcm::new(
        FcmConfig {
            account,
            base_url: fake.fcm_url.parse().expect("url"),
            connections,
            timeout: Duration::from_secs(5),
            ttl_secs: 3600,
            style: FcmStyle::Data,
        },
        roots,
    )
    .expect("fcm");
    let gone = Arc::new(Mutex::new(Vec::new()));
    let g = gone.clone();
    let dispatcher = Dispatcher::start(
        DispatcherConfig {
            backoff_base: Duration::from_millis(50),
            max_attempts: 3,
            ..Default::default()
        },
        Some(apns),
        Some(fcm),
        Arc::new(move |owner: &u32, _: &DeviceToken| g.lock().expect("lock").push(*owner)),
    );
    Rig {
        fake,
        dispatcher,
        gone,
        _dir: dir,
    }
}

fn apns_token(n: u8) -> DeviceToken {
    DeviceToken {
        platform: Platform::Apns,
        token: format!("{n:02x}").repeat(32),
        environment: Environment::Sandbox,
        app_id: "com.example.relay".into(),
    }
}

fn fcm_token(n: u8) -> DeviceToken {
    DeviceToken {
        platform: Platform::Fcm,
        token: format!("fcm-token-{n}"),
        environment: Environment::Production,
        app_id: "com.example.relay".into(),
    }
}

fn wake(urgent: bool) -> Push {
    Push::Wake {
        message: Uuid::new_v4(),
        badge: None,
        urgent,
    }
}

/// Waits until `n` requests to `provider` (apns, fcm, oauth) were seen.
async fn requests(fake: &FakePush, provider: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen: Vec<Value> = fake
            .requests()
            .into_iter()
            .filter(|r| r["provider"] == provider)
            .collect();
        if seen.len() >= n || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn valid_requests_reach_both_providers() {
    let r = rig(100, 2, true).await;
    r.dispatcher.enqueue(1, apns_token(1), wake(false));
    r.dispatcher.enqueue(2, apns_token(2), wake(true));
    r.dispatcher.enqueue(
        3,
        apns_token(3),
        Push::Logout {
            signal: Uuid::new_v4(),
        },
    );
    r.dispatcher.enqueue(4, fcm_token(4), wake(true));
    let apns = requests(&r.fake, "apns", 3).await;
    let fcm = requests(&r.fake, "fcm", 1).await;
    let oauth = requests(&r.fake, "oauth", 1).await;
    for req in apns.iter().chain(&fcm).chain(&oauth) {
        assert_eq!(req["violation"], Value::Null, "{req}");
        assert_eq!(req["status"], 200, "{req}");
    }
    assert_eq!(apns.len(), 3);
    let urgent = apns
        .iter()
        .find(|r| r["body"]["aps"]["interruption-level"] == "time-sensitive")
        .expect("urgent page");
    assert_eq!(urgent["headers"]["apns-priority"], "10");
    let logout = apns
        .iter()
        .find(|r| r["headers"]["apns-push-type"] == "background")
        .expect("logout");
    assert_eq!(logout["headers"]["apns-priority"], "5");
    assert_eq!(fcm[0]["body"]["message"]["android"]["priority"], "HIGH");
    assert_eq!(fcm[0]["token"], "fcm-token-4");
    assert!(r.gone.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn dead_tokens_are_reported_once_and_not_retried() {
    let r = rig(100, 1, true).await;
    for (provider, token, status, reason) in [
        ("apns", apns_token(1).token, 410, "Unregistered"),
        ("apns", apns_token(2).token, 400, "BadDeviceToken"),
        ("fcm", fcm_token(3).token, 404, "UNREGISTERED"),
    ] {
        r.fake.script(Scripted {
            provider: provider.into(),
            token: Some(token),
            status,
            reason: reason.into(),
            retry_after: None,
            times: 1,
        });
    }
    r.dispatcher.enqueue(1, apns_token(1), wake(false));
    r.dispatcher.enqueue(2, apns_token(2), wake(false));
    r.dispatcher.enqueue(3, fcm_token(3), wake(false));
    requests(&r.fake, "apns", 2).await;
    requests(&r.fake, "fcm", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut gone = r.gone.lock().expect("lock").clone();
    gone.sort();
    assert_eq!(gone, vec![1, 2, 3]);
    assert_eq!(r.fake.requests().len(), 4, "3 pushes + 1 OAuth, no retries");
}

#[tokio::test]
async fn throttling_and_outages_are_retried_with_backoff_honouring_retry_after() {
    let r = rig(100, 1, true).await;
    let t = apns_token(9);
    r.fake.script(Scripted {
        provider: "apns".into(),
        token: Some(t.token.clone()),
        status: 429,
        reason: "TooManyRequests".into(),
        retry_after: Some(1),
        times: 1,
    });
    r.fake.script(Scripted {
        provider: "apns".into(),
        token: Some(t.token.clone()),
        status: 503,
        reason: "ServiceUnavailable".into(),
        retry_after: None,
        times: 1,
    });
    r.dispatcher.enqueue(9, t, wake(true));
    let seen = requests(&r.fake, "apns", 3).await;
    let statuses: Vec<_> = seen.iter().map(|r| r["status"].clone()).collect();
    assert_eq!(statuses, vec![429, 503, 200]);
    let gap = seen[1]["at_ms"].as_u64().unwrap_or(0) - seen[0]["at_ms"].as_u64().unwrap_or(0);
    assert!(
        gap >= 1000,
        "Retry-After: 1 honoured, retried after {gap} ms"
    );

    // A push that keeps failing stops after max_attempts (3).
    let f = fcm_token(8);
    r.fake.script(Scripted {
        provider: "fcm".into(),
        token: Some(f.token.clone()),
        status: 500,
        reason: "INTERNAL".into(),
        retry_after: None,
        times: 10,
    });
    r.dispatcher.enqueue(8, f, wake(false));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(requests(&r.fake, "fcm", 99).await.len(), 3);
}

#[tokio::test]
async fn an_expired_provider_token_is_re_signed() {
    let r = rig(100, 1, true).await;
    let t = apns_token(5);
    r.fake.script(Scripted {
        provider: "apns".into(),
        token: Some(t.token.clone()),
        status: 403,
        reason: "ExpiredProviderToken".into(),
        retry_after: None,
        times: 1,
    });
    r.dispatcher.enqueue(5, t, wake(false));
    let seen = requests(&r.fake, "apns", 2).await;
    assert_eq!(seen[1]["status"], 200);
    assert_ne!(
        seen[0]["headers"]["authorization"], seen[1]["headers"]["authorization"],
        "a new provider token after ExpiredProviderToken"
    );
}

#[tokio::test]
async fn bursts_respect_the_servers_concurrent_stream_limit() {
    let r = rig(20, 1, false).await;
    for i in 0..2000u32 {
        r.dispatcher
            .enqueue(i, apns_token((i % 200) as u8), wake(true));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.fake.served() < 2000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.fake.served(), 2000, "every push answered, none refused");
    assert!(
        r.fake.max_in_flight() <= 20,
        "in flight {}",
        r.fake.max_in_flight()
    );
}

#[tokio::test]
async fn a_drain_sends_what_is_queued_logouts_included_then_counts_what_is_left() {
    let r = rig(100, 1, true).await;
    for n in 0..200u8 {
        r.dispatcher
            .enqueue(u32::from(n), apns_token(n), wake(false));
    }
    let logout = Push::Logout {
        signal: Uuid::new_v4(),
    };
    r.dispatcher.enqueue(999, fcm_token(9), logout);
    let left = r.dispatcher.drain(Duration::from_secs(10)).await;
    assert_eq!(left, 0);
    assert_eq!(requests(&r.fake, "apns", 200).await.len(), 200);
    assert_eq!(requests(&r.fake, "fcm", 1).await.len(), 1);
    // Closed: nothing more is taken.
    assert_eq!(
        r.dispatcher.enqueue(1, apns_token(1), wake(false)),
        push::dispatch::Enqueued::Closed
    );

    // A grace too short for the queue: what is left is reported, not silently lost.
    let r = rig(100, 1, false).await;
    for n in 0..250u8 {
        r.dispatcher
            .enqueue(u32::from(n), apns_token(n), wake(false));
    }
    let left = r.dispatcher.drain(Duration::ZERO).await;
    assert!(left > 0 && left <= 250, "{left}");
}
