//! The relay started inside the test process (embedded store unless a case says Cassandra,
//! loopback, ephemeral ports) and driven through its sockets: the listener, the session driver,
//! the hub, the pager and the admin API, between the unit tests and the end-to-end suites (which
//! run the binary with clients written by others).

use std::time::Duration;

use relay::config::{ApnsSettings, Dur};
use relay_tests::fake_push;
use relay_tests::in_process::{ACCOUNT_SERVICE, SUPPORT, TestRelay, body_of};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn the_admin_listener_answers_health_readiness_and_metrics() {
    let relay = TestRelay::start().await;
    assert_eq!(
        relay.admin_call(None, "GET", "/healthz", None).await,
        (200, json!("ok\n"))
    );
    assert_eq!(
        relay.admin_call(None, "GET", "/readyz", None).await,
        (200, json!("ready\n"))
    );
    let (status, metrics) = relay.admin_call(None, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .as_str()
            .is_some_and(|m| m.contains("relay_devices_online")),
        "{metrics}"
    );
    // Health is not served on the public listener's admin paths, and the admin API wants a
    // credential.
    assert_eq!(relay.public_call("GET", "/metrics").await.0, 404);
    let (status, body) = relay.admin_call(None, "GET", "/v1/audit", None).await;
    assert_eq!(
        (status, body["error"].clone()),
        (401, json!("unauthorized"))
    );
    relay.stop().await;
}

#[tokio::test]
async fn an_upgrade_without_a_genuine_token_is_refused_with_a_status_and_a_code() {
    let relay = TestRelay::start().await;
    let refused = |t: String| {
        let relay = &relay;
        async move {
            let r = relay.connect_with(&t).await.err().expect("refused");
            (
                r.status,
                r.body["error"].as_str().unwrap_or_default().to_string(),
            )
        }
    };
    assert_eq!(
        refused("not-a-jwt".into()).await,
        (401, "malformed_token".into())
    );
    let wrong_aud = relay.token_with("alice", "phone", |c| c.aud = "elsewhere".into());
    assert_eq!(refused(wrong_aud).await, (401, "wrong_audience".into()));
    let expired = relay.token_with("alice", "phone", |c| {
        c.iat -= 7200;
        c.exp = c.iat + 60;
    });
    assert_eq!(refused(expired).await, (401, "token_expired".into()));
    let bad_id = relay.token_with("alice", "phone", |c| c.dev = "has space".into());
    assert_eq!(refused(bad_id).await, (401, "bad_claims".into()));
    // A plain GET of the WebSocket path is told to upgrade.
    let (status, body) = relay.public_call("GET", "/v1/ws").await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("websocket_upgrade_required"))
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_message_reaches_every_device_of_its_recipient_and_the_senders_other_devices_once() {
    let relay = TestRelay::start().await;
    let mut bob = relay.connect("bob", "phone").await;
    assert!(bob.replay().await.is_empty());
    let mut laptop = relay.connect("alice", "laptop").await;
    laptop.replay().await;
    let mut phone = relay.connect("alice", "phone").await;
    phone.replay().await;

    let id = phone.send(&["bob"], b"sealed by the app").await;
    let accepted = phone.expect("accepted").await;
    assert_eq!(accepted["id"], id.as_str());
    assert_eq!(accepted["duplicate"], false);
    for device in [&mut bob, &mut laptop] {
        let d = device.expect("deliver").await;
        assert_eq!(d["id"], id.as_str());
        assert_eq!(d["seq"], accepted["seq"]);
        assert_eq!(d["from"], json!({"user": "alice", "device": "phone"}));
        assert_eq!(body_of(&d).expect("body"), b"sealed by the app");
    }

    // The same id again is answered with the original seq and delivered to nobody.
    phone.send_as(&id, &["bob"], b"sealed by the app").await;
    let again = phone.expect("accepted").await;
    assert_eq!(
        (again["seq"].clone(), again["duplicate"].clone()),
        (accepted["seq"].clone(), json!(true))
    );
    assert!(
        bob.next_within(Duration::from_millis(300)).await.is_none(),
        "a duplicate was delivered"
    );
    relay.stop().await;
}

#[tokio::test]
async fn what_a_device_did_not_ack_is_replayed_in_order_after_it_reconnects() {
    let relay = TestRelay::start().await;
    // Bob's phone becomes known, then goes offline.
    relay.connect("bob", "phone").await.close().await;
    let mut alice = relay.connect("alice", "phone").await;
    alice.replay().await;
    let mut seqs = Vec::new();
    for i in 0..5u8 {
        alice.send(&["bob"], &[i]).await;
        seqs.push(alice.expect("accepted").await["seq"].as_u64().expect("seq"));
    }
    let mut bob = relay.connect("bob", "phone").await;
    let replayed = bob.replay().await;
    let got: Vec<u64> = replayed.iter().filter_map(|d| d["seq"].as_u64()).collect();
    assert_eq!(got, seqs, "replay in seq order");
    bob.ack(&seqs[..3]).await;
    // An ack has no answer; a later frame's answer shows it was read.
    bob.put(json!({"type": "active"})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    bob.close().await;

    let mut bob = relay.connect("bob", "phone").await;
    let again: Vec<u64> = bob
        .replay()
        .await
        .iter()
        .filter_map(|d| d["seq"].as_u64())
        .collect();
    assert_eq!(again, seqs[3..], "only the unacked are replayed");
    relay.stop().await;
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_the_session_goes_on() {
    let relay = TestRelay::start().await;
    let mut alice = relay.connect("alice", "phone").await;
    alice.replay().await;
    alice.put_raw(Message::text("{not json")).await;
    assert_eq!(alice.expect("error").await["code"], "bad_json");
    alice
        .put(json!({"type": "send", "id": "x", "to": ["bob"], "body": "", "extra": 1}))
        .await;
    assert_eq!(alice.expect("error").await["code"], "bad_request");
    alice.put_raw(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(alice.expect("error").await["code"], "binary_not_supported");
    alice.send(&["bob"], b"still here").await;
    alice.expect("accepted").await;
    relay.stop().await;
}

#[tokio::test]
async fn a_second_connection_of_a_device_replaces_the_first() {
    let relay = TestRelay::start().await;
    let mut first = relay.connect("alice", "phone").await;
    first.replay().await;
    let mut second = relay.connect("alice", "phone").await;
    second.replay().await;
    assert_eq!(first.closed(&[]).await, 4002);
    second.send(&["bob"], b"x").await;
    second.expect("accepted").await;
    relay.stop().await;
}

/// The device's last-seen time and its user's organisation, as the admin API shows them.
async fn seen_and_org(relay: &TestRelay, user: &str, device: &str) -> (Option<u64>, Value) {
    let (status, body) = relay
        .admin_call(SUPPORT, "GET", &format!("/v1/users/{user}/devices"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let seen = body["devices"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["device"] == device))
        .and_then(|d| d["last_seen"].as_u64());
    (seen, body["org"].clone())
}

/// Waits until the device's last-seen time is past `after` (a session event's record).
async fn seen_after(relay: &TestRelay, user: &str, device: &str, after: u64) -> u64 {
    for _ in 0..100 {
        if let (Some(t), _) = seen_and_org(relay, user, device).await
            && t > after
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{user}/{device} was not seen after {after}");
}

#[tokio::test]
async fn a_quick_reconnect_does_not_rewrite_the_last_seen_time_until_it_ends() {
    a_quick_reconnect_is_recorded_at_its_end(TestRelay::start().await).await;
}

/// On ScyllaDB the organisation's time is the write time of its column (the token's `iat`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_a_quick_reconnect_does_not_rewrite_the_last_seen_time_until_it_ends() {
    use relay_tests::{Kind, Place};
    let place = Place::new(Kind::Cassandra).await;
    let relay = TestRelay::start_on_scylla(&place.scylla_config()).await;
    a_quick_reconnect_is_recorded_at_its_end(relay).await;
}

async fn a_quick_reconnect_is_recorded_at_its_end(relay: TestRelay) {
    let token = relay.token_with("alice", "phone", |c| c.org = Some("clinic-a".into()));
    let mut first = relay.connect_with(&token).await.expect("upgrade");
    first.replay().await;
    let connected = seen_after(&relay, "alice", "phone", 0).await;
    first.close().await;
    let left = seen_after(&relay, "alice", "phone", connected).await;

    // Back with the same token moments later: the row already says what the connect would
    // write, so the connect writes nothing; the disconnect still does.
    let mut again = relay.connect_with(&token).await.expect("upgrade");
    again.replay().await;
    again.send(&["bob"], b"x").await;
    again.expect("accepted").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen_and_org(&relay, "alice", "phone").await,
        (Some(left), json!("clinic-a"))
    );
    again.close().await;
    let left_again = seen_after(&relay, "alice", "phone", left).await;

    // A token naming another organisation is recorded at its connect.
    let moved = relay.token_with("alice", "phone", |c| c.org = Some("clinic-b".into()));
    let mut moved = relay.connect_with(&moved).await.expect("upgrade");
    moved.replay().await;
    seen_after(&relay, "alice", "phone", left_again).await;
    assert_eq!(
        seen_and_org(&relay, "alice", "phone").await.1,
        json!("clinic-b")
    );
    relay.stop().await;
}

#[tokio::test]
async fn an_idle_session_is_logged_off_and_activity_keeps_it() {
    let relay =
        TestRelay::start_with(|c| c.session.idle_timeout = Dur(Duration::from_secs(1))).await;
    let mut busy = relay.connect("alice", "phone").await;
    busy.replay().await;
    let mut idle = relay.connect("bob", "phone").await;
    idle.replay().await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        busy.put(json!({"type": "active"})).await;
    }
    // Bob said nothing for 1.6 s: told why, then closed with 4001.
    let expired = idle.expect("session_expired").await;
    assert_eq!(expired["idle_timeout_s"], 1);
    assert_eq!(idle.closed(&[]).await, 4001);
    // Alice kept hers by being active.
    busy.send(&["bob"], b"x").await;
    busy.expect("accepted").await;
    relay.stop().await;
}

#[tokio::test]
async fn an_admin_logout_closes_the_live_session_and_the_old_token_is_refused_after_the_wipe() {
    let relay = TestRelay::start().await;
    let token = relay.token("bob", "phone");
    let mut bob = relay.connect_with(&token).await.expect("upgrade");
    bob.replay().await;
    let mut other = relay.connect("bob", "tablet").await;
    other.replay().await;

    let (status, outcome) = relay
        .admin_call(
            ACCOUNT_SERVICE,
            "POST",
            "/v1/devices/phone/logout",
            Some(json!({"user": "bob", "reason": "lost_device"})),
        )
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["live"], json!(["phone"]));
    let logout = bob.expect("logout").await;
    assert_eq!(logout["reason"], "lost_device");
    bob.put(json!({"type": "logout_ack", "signal": logout["signal"]}))
        .await;
    assert_eq!(bob.closed(&[]).await, 4006);
    // The other device of the user is untouched.
    other.send(&["alice"], b"x").await;
    other.expect("accepted").await;

    // The wipe is confirmed: the old token is refused outright.
    let mut refused = None;
    for _ in 0..50 {
        match relay.connect_with(&token).await {
            Err(r) => {
                refused = Some(r);
                break;
            }
            Ok(mut c) => {
                // The confirmation is not stored yet: the session only repeats the logout.
                c.expect("logout").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let refused = refused.expect("the old token is refused once the wipe is confirmed");
    assert_eq!(
        (refused.status, refused.body["error"].clone()),
        (401, json!("revoked"))
    );

    // The trail names the actor and how the logout reached the device.
    let (status, page) = relay
        .admin_call(SUPPORT, "GET", "/v1/audit?user=bob&device=phone", None)
        .await;
    assert_eq!(status, 200, "{page}");
    let kinds: Vec<&str> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    for kind in [
        "connect",
        "logout_requested",
        "logout_delivered",
        "logout_confirmed",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_locked_user_is_signed_out_everywhere_and_refused_until_unlocked() {
    // A device that never confirms the wipe is closed after the ack wait all the same.
    let relay = TestRelay::start_with(|c| {
        c.access.logout_ack_wait = Dur(Duration::from_millis(300));
    })
    .await;
    let mut phone = relay.connect("carol", "phone").await;
    phone.replay().await;
    let (status, body) = relay
        .admin_call(
            ACCOUNT_SERVICE,
            "POST",
            "/v1/users/carol/lock",
            Some(json!({"reason": "left"})),
        )
        .await;
    assert_eq!(
        (status, body["locked"].clone()),
        (200, json!(true)),
        "{body}"
    );
    assert_eq!(phone.expect("logout").await["reason"], "locked");
    assert_eq!(phone.closed(&["logout"]).await, 4006);
    // A login after the lock (a token issued past it and the issuer skew: whole seconds, so
    // more than 3 s later) is refused while the lock lasts, and works once it is lifted.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let fresh = relay.token("carol", "laptop");
    let refused = relay
        .connect_with(&fresh)
        .await
        .err()
        .expect("refused while locked");
    assert_eq!(
        (refused.status, refused.body["error"].clone()),
        (403, json!("account_locked"))
    );
    let (status, _) = relay
        .admin_call(
            ACCOUNT_SERVICE,
            "POST",
            "/v1/users/carol/unlock",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200);
    let mut laptop = relay.connect_with(&fresh).await.expect("a new login works");
    laptop.replay().await;
    relay.stop().await;
}

#[tokio::test]
async fn admin_calls_need_a_known_credential_and_refuse_bad_input_with_a_code() {
    let relay = TestRelay::start().await;
    let (status, _) = relay
        .admin_call(None, "GET", "/v1/users/bob/devices", None)
        .await;
    assert_eq!(status, 401);
    let (status, body) = relay
        .admin_call(
            ACCOUNT_SERVICE,
            "GET",
            "/v1/users/has%20space/devices",
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("bad_request")),
        "{body}"
    );
    let (status, body) = relay
        .admin_call(
            ACCOUNT_SERVICE,
            "POST",
            "/v1/users/bob/logout",
            Some(json!({"reason": "no such reason"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // Devices are listed once known.
    relay.connect("bob", "phone").await.close().await;
    let (status, body) = relay
        .admin_call(ACCOUNT_SERVICE, "GET", "/v1/users/bob/devices", None)
        .await;
    assert_eq!(status, 200);
    let ids: Vec<Value> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["device"].clone())
        .collect();
    assert_eq!(ids, vec![json!("phone")], "{body}");
    relay.stop().await;
}

#[tokio::test]
async fn an_urgent_message_to_an_offline_device_pages_it_with_no_patient_information() {
    let push_dir = tempfile::tempdir().expect("dir");
    let fake = fake_push::start(push_dir.path(), 100, true)
        .await
        .expect("fake APNs");
    let relay = TestRelay::start_with(|c| {
        c.push.apns = Some(ApnsSettings {
            key_file: fake.dir.join("apns-key.p8"),
            key_id: fake_push::KEY_ID.into(),
            team_id: fake_push::TEAM_ID.into(),
            production_url: fake.apns_url.clone(),
            sandbox_url: fake.apns_url.clone(),
            ca_file: Some(fake.dir.join("ca.pem")),
            connections: 1,
            critical_entitlement: false,
            expiration: Dur::secs(3600),
        });
    })
    .await;
    let device_token = "ab".repeat(32);
    let mut doctor = relay.connect("dr.jones", "phone").await;
    doctor.replay().await;
    doctor
        .put(
            json!({"type": "push_token", "platform": "apns", "token": device_token,
            "environment": "sandbox", "app_id": "com.example.relay"}),
        )
        .await;
    assert_eq!(doctor.expect("push_token_saved").await["registered"], true);
    doctor.close().await;

    let nurse_token = relay.token_with("nurse.lee", "station", |c| c.urgent = true);
    let mut nurse = relay.connect_with(&nurse_token).await.expect("upgrade");
    nurse.replay().await;
    let secret = "Patient Jane Doe, bed 12";
    nurse
        .put(
            json!({"type": "send", "id": uuid::Uuid::new_v4().to_string(), "to": ["dr.jones"],
            "body": base64_of(secret), "urgent": true}),
        )
        .await;
    let accepted = nurse.expect("accepted").await;
    let id = accepted["id"].as_str().expect("id").to_string();

    let mut page = None;
    for _ in 0..100 {
        page = fake
            .requests()
            .into_iter()
            .find(|r| r["provider"] == "apns");
        if page.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = page.expect("the offline doctor was paged");
    assert_eq!(page["violation"], Value::Null, "{page}");
    assert_eq!(page["headers"]["apns-priority"], "10");
    assert_eq!(page["body"]["mid"], id.as_str());
    assert_eq!(page["body"]["aps"]["interruption-level"], "time-sensitive");
    let text = page.to_string();
    assert!(
        !text.contains("Jane") && !text.contains(&base64_of(secret)),
        "{text}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_drain_closes_sessions_with_1012_and_keeps_what_was_accepted() {
    let relay = TestRelay::start().await;
    relay.connect("bob", "phone").await.close().await;
    let mut alice = relay.connect("alice", "phone").await;
    alice.replay().await;
    alice.send(&["bob"], b"before the drain").await;
    alice.expect("accepted").await;
    let stop = tokio::spawn(relay.stop_keeping_data());
    assert_eq!(alice.closed(&[]).await, 1012);
    let dir_guard = stop.await.expect("stopped");

    let relay = TestRelay::start_in(dir_guard).await;
    let mut bob = relay.connect("bob", "phone").await;
    let replayed = bob.replay().await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(body_of(&replayed[0]).expect("body"), b"before the drain");
    relay.stop().await;
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// On ScyllaDB a device's last-seen time marks it registered, and its next connect skips the
/// registration (migration 11). A session whose registration failed must leave none, or the
/// device would never be registered and its user's messages would pass it by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_a_device_whose_registration_failed_is_registered_at_its_next_connect() {
    use relay_tests::{Kind, Place};
    let place = Place::new(Kind::Cassandra).await;
    let cfg = place.scylla_config();
    let relay = TestRelay::start_on_scylla(&cfg).await;
    let mut alice = relay.connect("alice", "phone").await;
    alice.replay().await;

    // Registrations fail while their table lacks a column the relay writes.
    let session = relay::store::scylla::connect(&cfg).await.expect("connect");
    let alter = |change: &str| {
        let cql = format!("ALTER TABLE {}.devices2 {change}", cfg.keyspace);
        let session = &session;
        async move { session.query_unpaged(cql, ()).await.expect("alter") }
    };
    alter("DROP registered_at").await;
    let token = relay.token("carol", "phone");
    let mut carol = relay.upgrade(&token).await.expect("upgrade");
    assert_eq!(carol.closed(&[]).await, 1013, "try again later");
    alter("ADD registered_at bigint").await;

    let mut carol = relay.connect("carol", "phone").await;
    assert!(carol.replay().await.is_empty());
    let id = alice.send(&["carol"], b"after a failed registration").await;
    alice.expect("accepted").await;
    let d = carol.expect("deliver").await;
    assert_eq!(d["id"], id.as_str());
    relay.stop().await;
}
