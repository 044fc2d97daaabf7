//! One conformance suite for every `MessageStore` backend: each case runs unchanged against the
//! embedded store and against a real Cassandra (started by `scripts/cassandra start`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay::store::{
    AccessRows, DeviceRef, Devices, MessageStore, Messages, NewMessage, Retention, now_ms,
};
use relay_tests::{Kind, Place, Recorder, audit_keys, auditor, key_entry, keyring};
use uuid::Uuid;

const LONG: Retention = Retention {
    archive_ms: 6 * 365 * 86_400_000,
    inbox_ms: 30 * 86_400_000,
    idempotency_ms: 7 * 86_400_000,
    audit_ms: 6 * 31_557_600_000,
};

fn msg(from: &DeviceRef, to: &[&str], body: &str) -> NewMessage {
    NewMessage {
        id: Uuid::new_v4(),
        from: from.clone(),
        to: to.iter().map(|s| s.to_string()).collect(),
        body: Bytes::from(body.to_string()),
        urgent: false,
    }
}

async fn setup(kind: Kind, retention: Retention) -> (Place, Arc<dyn MessageStore>, Arc<Recorder>) {
    let place = Place::new(kind).await;
    let sink = Arc::new(Recorder::default());
    let store = place.open(place.keyring(), retention, sink.clone()).await;
    (place, store, sink)
}

/// Every inbox entry, read a page at a time; pages of `max_bytes` end once their bodies reach it.
async fn all_pages(
    store: &dyn MessageStore,
    d: &DeviceRef,
    page: usize,
    max_bytes: usize,
) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut cursor = 0;
    loop {
        let got = store
            .inbox_page(d.clone(), cursor, page, max_bytes)
            .await
            .expect("page");
        assert!(got.len() <= page);
        let bytes: usize = got.iter().map(|e| e.body.len()).sum();
        let last_body = got.last().map_or(0, |e| e.body.len());
        assert!(
            bytes - last_body < max_bytes,
            "a page ends once it reaches its bytes"
        );
        seqs.extend(got.iter().map(|e| e.seq));
        match got.last() {
            Some(last) if got.len() == page || bytes >= max_bytes => cursor = last.seq,
            _ => return seqs,
        }
    }
}

async fn ordering_and_paging(kind: Kind) {
    let (_p, store, sink) = setup(kind, LONG).await;
    let alice = DeviceRef::new("alice", "phone");
    let bob = DeviceRef::new("bob", "tablet");
    store.register_device(bob.clone()).await.expect("register");
    let tickets: Vec<_> = (0..300)
        .map(|i| store.append(msg(&alice, &["bob"], &format!("m{i}"))))
        .collect();
    let mut accepted = Vec::new();
    for t in tickets {
        accepted.push(t.await.expect("reply").expect("accepted").seq);
    }
    assert!(
        accepted.windows(2).all(|w| w[0] < w[1]),
        "call order is seq order"
    );
    assert_eq!(all_pages(&*store, &bob, 128, usize::MAX).await, accepted);
    // Pages sized by bytes: bodies are "m0".."m299", so 10 bytes are five entries.
    assert_eq!(all_pages(&*store, &bob, 128, 10).await, accepted);
    let page = store
        .inbox_page(bob.clone(), 0, 128, 10)
        .await
        .expect("page");
    assert_eq!(page.len(), 5);
    let one = store
        .inbox_page(bob.clone(), 0, 128, 1)
        .await
        .expect("page");
    assert_eq!(one.len(), 1, "the first entry comes whatever its size");
    let page = store
        .inbox_page(bob.clone(), 0, 3, usize::MAX)
        .await
        .expect("page");
    let bodies: Vec<&[u8]> = page.iter().map(|e| &e.body[..]).collect();
    assert_eq!(bodies, vec![&b"m0"[..], b"m1", b"m2"]);
    assert_eq!(page[0].from, alice);
    // Fan-out happened after durability, in seq order, to bob only.
    let fanned: Vec<u64> = sink
        .0
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(fanned, accepted);
    store.close().await.expect("close");
}

async fn fanout_targets(kind: Kind) {
    let (_p, store, sink) = setup(kind, LONG).await;
    let devices = [
        DeviceRef::new("alice", "phone"),
        DeviceRef::new("alice", "laptop"),
        DeviceRef::new("bob", "phone"),
        DeviceRef::new("bob", "tablet"),
        DeviceRef::new("carol", "phone"),
    ];
    for d in &devices {
        store.register_device(d.clone()).await.expect("register");
    }
    let a = store
        .append(msg(&devices[0], &["bob"], "x"))
        .await
        .expect("reply")
        .expect("accepted");
    let mut targets = sink.0.lock().expect("lock")[0].0.clone();
    targets.sort();
    let mut want = vec![devices[1].clone(), devices[2].clone(), devices[3].clone()];
    want.sort();
    assert_eq!(
        targets, want,
        "recipient's devices and sender's other devices"
    );
    for d in &want {
        assert_eq!(all_pages(&*store, d, 10, usize::MAX).await, vec![a.seq]);
    }
    assert!(
        all_pages(&*store, &devices[0], 10, usize::MAX)
            .await
            .is_empty()
    );
    assert!(
        all_pages(&*store, &devices[4], 10, usize::MAX)
            .await
            .is_empty()
    );
    store.close().await.expect("close");
}

async fn idempotency(kind: Kind) {
    let (place, store, sink) = setup(kind, LONG).await;
    let alice = DeviceRef::new("alice", "phone");
    let bob = DeviceRef::new("bob", "phone");
    store.register_device(bob.clone()).await.expect("register");
    let m = msg(&alice, &["bob"], "once");
    // Twice in one batch, then again later, then after reopening.
    let (t1, t2) = (store.append(m.clone()), store.append(m.clone()));
    let first = t1.await.expect("reply").expect("accepted");
    let second = t2.await.expect("reply").expect("accepted");
    let third = store
        .append(m.clone())
        .await
        .expect("reply")
        .expect("accepted");
    assert!(!first.duplicate && second.duplicate && third.duplicate);
    assert_eq!((second.seq, third.seq), (first.seq, first.seq));
    assert_eq!(
        all_pages(&*store, &bob, 10, usize::MAX).await,
        vec![first.seq]
    );
    let deliveries = sink.0.lock().expect("lock").clone();
    assert!(deliveries.iter().all(|(_, seq)| *seq == first.seq));
    // In a shared database a resend found complete is delivered again, from the store: the
    // node that stored it may have died before its fan-out (see the ScyllaDB-only case below).
    // (The two concurrent appends usually share a batch; when they do not, the second is such
    // a resend too.)
    let expected = match kind {
        Kind::Embedded => 1..=1,
        Kind::Cassandra => 2..=3,
    };
    assert!(
        expected.contains(&deliveries.len()),
        "delivered once per commit: {deliveries:?}"
    );
    // The same id from another sender is another message.
    let other = NewMessage {
        from: DeviceRef::new("carol", "phone"),
        ..m.clone()
    };
    let o = store.append(other).await.expect("reply").expect("accepted");
    assert!(!o.duplicate);
    store.close().await.expect("close");
    drop(store);
    let store = place
        .open(place.keyring(), LONG, Arc::new(Recorder::default()))
        .await;
    let again = store.append(m).await.expect("reply").expect("accepted");
    assert!(
        again.duplicate && again.seq == first.seq,
        "durable across restarts"
    );
    store.close().await.expect("close");
}

async fn ack_removes(kind: Kind) {
    let (_p, store, _sink) = setup(kind, LONG).await;
    let alice = DeviceRef::new("alice", "phone");
    let bob = DeviceRef::new("bob", "phone");
    store.register_device(bob.clone()).await.expect("register");
    let mut seqs = Vec::new();
    for i in 0..5 {
        let a = store
            .append(msg(&alice, &["bob"], &i.to_string()))
            .await
            .expect("reply")
            .expect("accepted");
        seqs.push(a.seq);
    }
    store
        .ack(bob.clone(), vec![seqs[0], seqs[2], seqs[4]])
        .await
        .expect("ack");
    // Acks are applied by the writer; a following durable write orders after them.
    store
        .register_device(DeviceRef::new("z", "z"))
        .await
        .expect("barrier");
    assert_eq!(
        all_pages(&*store, &bob, 10, usize::MAX).await,
        vec![seqs[1], seqs[3]]
    );
    // Acking twice, or acking an unknown seq, is harmless.
    store
        .ack(bob.clone(), vec![seqs[0], 12345])
        .await
        .expect("ack");
    store
        .register_device(DeviceRef::new("z", "y"))
        .await
        .expect("barrier");
    assert_eq!(
        all_pages(&*store, &bob, 10, usize::MAX).await,
        vec![seqs[1], seqs[3]]
    );
    store.close().await.expect("close");
}

async fn retention_expires(kind: Kind) {
    let short = Retention {
        archive_ms: 2_000,
        inbox_ms: 2_000,
        idempotency_ms: 2_000,
        audit_ms: LONG.audit_ms,
    };
    let (_p, store, _sink) = setup(kind, short).await;
    let keys = audit_keys();
    let (audit, _task) = auditor(store.clone(), 0, keys.clone(), None);
    audit.record(
        relay::audit::Event::new(relay::audit::EventKind::Connect)
            .device(&DeviceRef::new("bob", "phone")),
    );
    audit.flush(Duration::from_secs(10)).await;
    let alice = DeviceRef::new("alice", "phone");
    let bob = DeviceRef::new("bob", "phone");
    store.register_device(bob.clone()).await.expect("register");
    let m = msg(&alice, &["bob"], "short-lived");
    let a = store
        .append(m.clone())
        .await
        .expect("reply")
        .expect("accepted");
    let archived = store
        .archived(a.seq, m.id)
        .await
        .expect("read")
        .expect("archived");
    assert_eq!(&archived.entry.body[..], b"short-lived");
    assert_eq!(archived.to, vec!["bob".to_string()]);
    assert_eq!(all_pages(&*store, &bob, 10, usize::MAX).await, vec![a.seq]);

    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let expired = store.expire(now_ms(), short).await.expect("expire");
    assert!(store.archived(a.seq, m.id).await.expect("read").is_none());
    assert!(all_pages(&*store, &bob, 10, usize::MAX).await.is_empty());
    // Past the idempotency window the id is new again.
    let again = store.append(m).await.expect("reply").expect("accepted");
    assert!(!again.duplicate);
    if let Kind::Embedded = kind {
        assert_eq!(
            (
                expired.archive,
                expired.inbox,
                expired.idempotency,
                expired.audit
            ),
            (1, 1, 1, 0)
        );
    }
    // A short archive never shortens the audit trail: it keeps its own retention.
    let v = relay::audit::verify(&*store, Some("bob"), short.audit_ms, &keys, &[])
        .await
        .expect("verify");
    assert_eq!((v.records, v.findings.len()), (1, 0));
    store.close().await.expect("close");
}

async fn key_rotation(kind: Kind) {
    let k1 = key_entry("k1");
    let k2 = key_entry("k2");
    let place = Place::new(kind).await;
    let alice = DeviceRef::new("alice", "phone");
    let bob = DeviceRef::new("bob", "phone");
    let store = place
        .open(keyring(&k1, "k1"), LONG, Arc::new(Recorder::default()))
        .await;
    store.register_device(bob.clone()).await.expect("register");
    let old = msg(&alice, &["bob"], "sealed with k1");
    let a_old = store
        .append(old.clone())
        .await
        .expect("reply")
        .expect("accepted");
    store.close().await.expect("close");
    drop(store);

    let both = format!("{k1},{k2}");
    let store = place
        .open(keyring(&both, "k2"), LONG, Arc::new(Recorder::default()))
        .await;
    let new = msg(&alice, &["bob"], "sealed with k2");
    let a_new = store
        .append(new.clone())
        .await
        .expect("reply")
        .expect("accepted");
    let page = store
        .inbox_page(bob.clone(), 0, 10, usize::MAX)
        .await
        .expect("page");
    let bodies: Vec<&[u8]> = page.iter().map(|e| &e.body[..]).collect();
    assert_eq!(bodies, vec![&b"sealed with k1"[..], b"sealed with k2"]);
    assert!(
        store
            .archived(a_old.seq, old.id)
            .await
            .expect("read")
            .is_some()
    );
    store.close().await.expect("close");
    drop(store);

    // Without k1, what k1 sealed does not open: never delivered, counted as corrupt.
    let store = place
        .open(keyring(&k2, "k2"), LONG, Arc::new(Recorder::default()))
        .await;
    let page = store
        .inbox_page(bob.clone(), 0, 10, usize::MAX)
        .await
        .expect("page");
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![a_new.seq]
    );
    assert!(store.archived(a_old.seq, old.id).await.is_err());
    store.close().await.expect("close");
}

async fn push_tokens(kind: Kind) {
    let k1 = key_entry("k1");
    let p = Place::new(kind).await;
    let store = p
        .open(keyring(&k1, "k1"), LONG, Arc::new(Recorder::default()))
        .await;
    let phone = DeviceRef::new("carol", "phone");
    let tablet = DeviceRef::new("carol", "tablet");
    assert_eq!(store.push_token(phone.clone()).await.expect("read"), None);
    let mut token = push::DeviceToken {
        platform: push::Platform::Apns,
        token: "ab".repeat(32),
        environment: push::Environment::Sandbox,
        app_id: "com.example.relay".into(),
    };
    store
        .set_push_token(phone.clone(), Some(token.clone()))
        .await
        .expect("save");
    token.token = "cd".repeat(32); // the app refreshed its token
    store
        .set_push_token(phone.clone(), Some(token.clone()))
        .await
        .expect("refresh");
    assert_eq!(
        store.push_token(phone.clone()).await.expect("read"),
        Some(token.clone())
    );
    assert_eq!(store.push_token(tablet.clone()).await.expect("read"), None);
    store.close().await.expect("close");
    drop(store);

    // Durable across a restart, then removed.
    let store = p
        .open(keyring(&k1, "k1"), LONG, Arc::new(Recorder::default()))
        .await;
    assert_eq!(
        store.push_token(phone.clone()).await.expect("read"),
        Some(token)
    );
    store
        .set_push_token(phone.clone(), None)
        .await
        .expect("remove");
    assert_eq!(store.push_token(phone).await.expect("read"), None);
    store.close().await.expect("close");
}

async fn access_state(kind: Kind) {
    use relay::access::{self, Change, Confirmation, Lock, Revocation, Verdict};
    let (p, store, _) = setup(kind, LONG).await;
    let (u, phone) = ("dora", DeviceRef::new("dora", "phone"));
    store
        .register_device(phone.clone())
        .await
        .expect("register");
    store
        .register_device(DeviceRef::new("dora", "laptop"))
        .await
        .expect("register");
    let mut devices = store.devices(u.into()).await.expect("devices");
    devices.sort();
    assert_eq!(devices, vec!["laptop", "phone"]);
    assert!(store.access(u.into(), None).await.expect("read").is_empty());

    // The organisation of the newest token wins, whatever order the devices connect in; both
    // times in one call, as a node's batch of connects writes them.
    let seen = [
        ("phone", "clinic-a", 1_700_000_100),
        ("laptop", "clinic-old", 1_700_000_000),
    ]
    .map(|(device, org, iat)| {
        let org = Some((org.to_string(), iat));
        (DeviceRef::new(u, device), Change::Seen { at: 5, org })
    });
    store.update_access_many(seen.into()).await.expect("seen");
    store
        .update_access(u.into(), "phone".into(), Change::Fresh(1_000_600))
        .await
        .expect("fresh");
    let r = Revocation {
        at: 1_000_500,
        reason: "lost_device".into(),
        signal: Uuid::new_v4(),
        except: None,
    };
    store
        .update_access(u.into(), "phone".into(), Change::Revoke(r.clone()))
        .await
        .expect("revoke");
    let lock = Lock {
        at: 7,
        reason: "left the practice".into(),
    };
    store
        .update_access(u.into(), String::new(), Change::Lock(Some(lock.clone())))
        .await
        .expect("lock");
    // A confirmation and a later revocation touch different fields: neither undoes the other.
    let c = Confirmation {
        signal: r.signal,
        at: 9,
    };
    store
        .update_access(u.into(), "phone".into(), Change::Confirm(c.clone()))
        .await
        .expect("confirm");
    store.close().await.expect("close");
    drop(store);

    // Durable across a restart.
    let store = p
        .open(p.keyring(), LONG, Arc::new(Recorder::default()))
        .await;
    let (user, rows) = access::split(
        store
            .access(u.into(), Some("phone".into()))
            .await
            .expect("read"),
    );
    assert_eq!(user.org.as_deref(), Some("clinic-a"));
    assert_eq!(user.org_since, Some(1_700_000_100));
    assert_eq!(user.locked, Some(lock));
    assert_eq!(rows.len(), 1);
    let (id, dev) = &rows[0];
    assert_eq!(id, "phone");
    assert_eq!(dev.revoked, Some(r));
    assert_eq!(dev.confirmed, Some(c));
    assert_eq!(dev.last_seen, Some(5));
    assert_eq!(dev.fresh_from, Some(1_000_600));
    assert!(matches!(
        access::verdict(&user, dev, "phone", 1000),
        Verdict::LoggedOut {
            confirmed: true,
            ..
        }
    ));
    // Past the revocation and its issuer skew (2 s), only the lock refuses.
    assert_eq!(access::verdict(&user, dev, "phone", 1003), Verdict::Locked);
    store
        .update_access(u.into(), String::new(), Change::Lock(None))
        .await
        .expect("unlock");
    let (user, _) = access::split(store.access(u.into(), None).await.expect("read"));
    assert_eq!(user.locked, None);
    assert_eq!(
        store.org_users("clinic-a".into()).await.expect("org"),
        vec![u.to_string()]
    );

    store
        .set_pending_logout(phone.clone(), Some(42))
        .await
        .expect("pending");
    assert_eq!(
        store.pending_logouts().await.expect("read"),
        vec![(phone.clone(), 42)]
    );
    store.set_pending_logout(phone, None).await.expect("clear");
    assert!(store.pending_logouts().await.expect("read").is_empty());
    store.close().await.expect("close");
}

async fn audit_chain(kind: Kind) {
    use relay::audit::{self, Checkpoint, Event, EventKind};
    let (_p, store, _) = setup(kind, LONG).await;
    let keys = audit_keys();
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("checkpoints.jsonl");
    let (auditor, task) = auditor(store.clone(), 3, keys.clone(), Some(file.clone()));
    let phone = DeviceRef::new("erin", "phone");
    let t0 = now_ms();
    for i in 0..20 {
        auditor.record(Event {
            ip: Some(format!("127.0.0.{i}")),
            ..Event::new(EventKind::Connect).device(&phone)
        });
    }
    auditor.record(Event::new(EventKind::AuthFailed).reason("bad_signature"));
    auditor.checkpoint(Duration::from_secs(10)).await;
    let checkpoints = |file: &std::path::Path| -> Vec<Checkpoint> {
        std::fs::read_to_string(file)
            .expect("checkpoint file")
            .lines()
            .map(|l| serde_json::from_str(l).expect("checkpoint line"))
            .collect()
    };
    let cps = checkpoints(&file);
    assert_eq!(cps.len(), 1);
    assert_eq!(
        cps[0]
            .heads
            .iter()
            .map(|h| (h.subject.as_str(), h.n))
            .collect::<Vec<_>>(),
        vec![("#anon", 0), ("erin", 19)]
    );
    let v = audit::verify(&*store, None, LONG.audit_ms, &keys, &cps)
        .await
        .expect("verify");
    assert!(v.findings.is_empty(), "{:?}", v.findings);
    assert_eq!((v.records, v.partitions, v.checkpoints), (21, 2, 1));

    // Paged query by device and time range returns exactly the events, in order.
    let first = audit::query(&*store, "erin", Some("phone"), t0, now_ms() + 1, 15, None)
        .await
        .expect("q");
    assert_eq!(first.events.len(), 15);
    let cursor = first.next.as_deref().and_then(audit::parse_cursor);
    let rest = audit::query(&*store, "erin", Some("phone"), t0, now_ms() + 1, 15, cursor)
        .await
        .expect("q");
    assert_eq!(rest.events.len(), 5);
    assert!(rest.next.is_none());
    let ips: Vec<String> = first
        .events
        .iter()
        .chain(&rest.events)
        .filter_map(|e| e.ip.clone())
        .collect();
    assert_eq!(
        ips,
        (0..20).map(|i| format!("127.0.0.{i}")).collect::<Vec<_>>()
    );
    assert!(
        audit::query(&*store, "erin", Some("tablet"), t0, now_ms() + 1, 15, None)
            .await
            .expect("q")
            .events
            .is_empty()
    );

    // A restarted writer continues the chain from the store.
    task.abort();
    let (auditor, _task) = relay_tests::auditor(store.clone(), 3, keys.clone(), Some(file.clone()));
    auditor.record(Event::new(EventKind::Disconnect).device(&phone));
    auditor.checkpoint(Duration::from_secs(10)).await;
    let cps = checkpoints(&file);
    let v = audit::verify(&*store, Some("erin"), LONG.audit_ms, &keys, &cps)
        .await
        .expect("verify");
    assert!(v.findings.is_empty(), "{:?}", v.findings);
    assert_eq!((v.records, v.checkpoints), (21, 2));

    // Edit one stored record in place: verification names it.
    let month = audit::month_of(t0);
    let mut records = store.audit_read("erin".into(), month).await.expect("read");
    records.sort_by_key(|r| r.n);
    let mut edited = records[7].clone();
    edited.entry = edited.entry.replace("127.0.0.7", "10.9.9.9");
    store.audit_append(vec![edited]).await.expect("overwrite");
    let v = audit::verify(&*store, None, LONG.audit_ms, &keys, &cps)
        .await
        .expect("verify");
    assert_eq!(v.findings.len(), 1, "{:?}", v.findings);
    assert_eq!(
        (v.findings[0].chain.subject.as_str(), v.findings[0].n),
        ("erin", 7)
    );

    // Someone who can write the database rebuilds the chain from there on, as a plain SHA-256
    // chain (what it was before audit keys): every rebuilt record is a finding.
    let mut prev = records[6].hash;
    let rebuilt: Vec<_> = records[7..]
        .iter()
        .map(|r| {
            use sha2::Digest as _;
            let entry = r.entry.replace("127.0.0.", "10.9.9.");
            let hash: [u8; 32] = sha2::Sha256::new()
                .chain_update(prev)
                .chain_update(&entry)
                .finalize()
                .into();
            let out = audit::Record {
                entry,
                prev,
                hash,
                key_id: String::new(),
                ..r.clone()
            };
            prev = hash;
            out
        })
        .collect();
    store.audit_append(rebuilt).await.expect("rebuild");
    let v = audit::verify(&*store, Some("erin"), LONG.audit_ms, &keys, &cps)
        .await
        .expect("verify");
    assert_eq!(v.findings.len(), 14 + 1, "{:?}", v.findings); // 14 rebuilt records + the head
    store.close().await.expect("close");

    // A database that lost the trail (a month, a node's chains): the checkpoints name it.
    let (_p2, empty, _) = setup(kind, LONG).await;
    let v = audit::verify(&*empty, None, LONG.audit_ms, &keys, &cps)
        .await
        .expect("verify");
    assert_eq!(
        v.findings
            .iter()
            .map(|f| (f.chain.subject.as_str(), f.chain.node))
            .collect::<Vec<_>>(),
        vec![("#anon", 3), ("erin", 3)]
    );
    empty.close().await.expect("close");
}

/// The writer keeps few chain heads in memory and forgets them when full; forgetting them while
/// a batch is queued must not re-read a stale head and overwrite a queued record.
async fn audit_heads_forgotten_mid_batch(kind: Kind) {
    use relay::audit::{self, Auditor, Checkpoints, Event, EventKind};
    let (_p, store, _) = setup(kind, LONG).await;
    let keys = audit_keys();
    let none = Checkpoints {
        interval: Duration::from_secs(3600),
        file: None,
    };
    let (auditor, _task) = Auditor::start_with_heads(store.clone(), 2, keys.clone(), none, None, 2);
    let users = ["u1", "u2", "u3", "u4", "u5"];
    let t0 = now_ms();
    for round in 0..40 {
        for u in users {
            auditor.record(Event {
                ip: Some(format!("127.0.0.{round}")),
                ..Event::new(EventKind::Connect).device(&DeviceRef::new(u, "phone"))
            });
        }
    }
    auditor.flush(Duration::from_secs(20)).await;
    for u in users {
        let page = audit::query(&*store, u, None, t0, now_ms() + 1, 100, None)
            .await
            .expect("q");
        assert_eq!(page.events.len(), 40, "{u}: records overwritten");
    }
    let v = audit::verify(&*store, None, LONG.audit_ms, &keys, &[])
        .await
        .expect("verify");
    assert!(v.findings.is_empty(), "{:?}", v.findings);
    assert_eq!(v.records, 200);
    store.close().await.expect("close");
}

/// The newest backup recorded is read back, whatever the order of the records.
async fn backups_recorded(kind: Kind) {
    use relay::store::Backup;
    let (_p, store, _) = setup(kind, LONG).await;
    assert_eq!(store.last_backup().await.expect("read"), None);
    let newer = Backup {
        taken_at: 1_767_225_600_000,
        tag: "day-2".into(),
    };
    let older = Backup {
        taken_at: 1_767_139_200_000,
        tag: "day-1".into(),
    };
    store.record_backup(newer.clone()).await.expect("record");
    store.record_backup(older).await.expect("record");
    assert_eq!(store.last_backup().await.expect("read"), Some(newer));
    store.close().await.expect("close");
}

/// An org's report lists its users' reported events while they belonged to it, named by the
/// recorder or looked up when not; other orgs' events and unreported kinds stay out.
async fn org_report(kind: Kind) {
    use relay::audit::{self, Auditor, Checkpoints, Event, EventKind};
    let (_p, store, _) = setup(kind, LONG).await;
    let none = Checkpoints {
        interval: Duration::from_secs(3600),
        file: None,
    };
    // "mover" belongs to org-b now; "quiet" to none.
    let lookup: audit::OrgLookup = Arc::new(|user: String| {
        Box::pin(async move {
            Ok(match user.as_str() {
                "a1" => Some("org-a".to_string()),
                "mover" => Some("org-b".to_string()),
                _ => None,
            })
        })
    });
    let keys = audit_keys();
    let (auditor, _task) = Auditor::start(store.clone(), 1, keys.clone(), none, Some(lookup));
    let t0 = now_ms() - 3 * 3_600_000;
    let at = |h: u64, m: u64| t0 + h * 3_600_000 + m;
    let event = |kind: EventKind, user: &str, ts: u64, org: Option<&str>| Event {
        ts,
        org: org.map(str::to_string),
        ..Event::new(kind).device(&DeviceRef::new(user, "phone"))
    };
    auditor.record(event(EventKind::Connect, "a1", at(0, 1), Some("org-a")));
    auditor.record(event(EventKind::Disconnect, "a1", at(0, 2), Some("org-a")));
    auditor.record(event(EventKind::Connect, "mover", at(0, 3), Some("org-a")));
    auditor.record(event(EventKind::AuthFailed, "a1", at(1, 4), None));
    auditor.record(event(EventKind::Connect, "b1", at(1, 5), Some("org-b")));
    auditor.record(event(EventKind::Lock, "mover", at(2, 6), None));
    auditor.record(event(EventKind::IdleLogoff, "quiet", at(2, 7), None));
    auditor.flush(Duration::from_secs(20)).await;
    let to = now_ms() + 1;
    let rows = |page: audit::Page| -> Vec<(String, String)> {
        page.events
            .into_iter()
            .map(|e| (e.event.name().to_string(), e.user.unwrap_or_default()))
            .collect()
    };
    let a = audit::org_report(&*store, "org-a", t0, to, 100, None)
        .await
        .expect("a");
    assert_eq!(
        rows(a),
        [
            ("connect", "a1"),
            ("connect", "mover"),
            ("auth_failed", "a1")
        ]
        .map(|(k, u)| (k.to_string(), u.to_string()))
    );
    let b = audit::org_report(&*store, "org-b", t0, to, 100, None)
        .await
        .expect("b");
    assert_eq!(
        rows(b),
        [("connect", "b1"), ("lock", "mover")].map(|(k, u)| (k.to_string(), u.to_string()))
    );
    // Paged one by one across the hourly partitions, the same rows.
    let (mut paged, mut cursor) = (Vec::new(), None);
    loop {
        let page = audit::org_report(&*store, "org-a", t0, to, 1, cursor)
            .await
            .expect("page");
        cursor = page.next.as_deref().and_then(audit::parse_cursor);
        paged.extend(rows(page));
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(paged.len(), 3);
    // A range that starts after the first hour.
    let later = audit::org_report(&*store, "org-a", at(1, 0), to, 100, None)
        .await
        .expect("later");
    assert_eq!(rows(later), [("auth_failed".to_string(), "a1".to_string())]);
    // The user's own partition still has every event, the report copies included nowhere else.
    let own = audit::query(&*store, "a1", None, t0, to, 100, None)
        .await
        .expect("own");
    assert_eq!(own.events.len(), 3);
    // The report partitions are chains like any other: verified with the rest.
    let v = audit::verify(&*store, None, LONG.audit_ms, &keys, &[])
        .await
        .expect("verify");
    assert!(v.findings.is_empty(), "{:?}", v.findings);
    assert_eq!(v.records, 7 + 5);
    store.close().await.expect("close");
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(relay_tests::Kind::Embedded).await } )*
        }
        mod cassandra {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(relay_tests::Kind::Cassandra).await } )*
        }
    };
}

conformance!(
    ordering_and_paging,
    fanout_targets,
    idempotency,
    ack_removes,
    retention_expires,
    key_rotation,
    push_tokens,
    access_state,
    audit_chain,
    audit_heads_forgotten_mid_batch,
    backups_recorded,
    org_report,
);

/// ScyllaDB only (the embedded store is one node): nodes sharing a database lease distinct
/// node ids, and a clean close frees its id for the next node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_node_ids_are_leased_distinctly_and_freed_on_close() {
    let place = Place::new(Kind::Cassandra).await;
    let open = || place.open_scylla(None, place.keyring(), LONG, Arc::new(Recorder::default()));
    let (a, b, c) = (open().await, open().await, open().await);
    let mut ids = vec![a.node_id(), b.node_id(), c.node_id()];
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2]);
    let freed = b.node_id();
    b.close().await.expect("close");
    let d = open().await;
    assert_eq!(d.node_id(), freed, "a closed node's id is free again");
    // Sequence numbers carry the leased id.
    let alice = DeviceRef::new("alice", "phone");
    d.register_device(DeviceRef::new("bob", "tablet"))
        .await
        .expect("register");
    let acc = d
        .append(msg(&alice, &["bob"], "x"))
        .await
        .expect("reply")
        .expect("append");
    assert_eq!((acc.seq >> 7) & 31, u64::from(freed));
    for s in [a, c, d] {
        s.close().await.expect("close");
    }
}

/// Background requests (the 1 s health ping, the lease) that may fall inside a counted window.
const BACKGROUND_REQUESTS: u64 = 4;

/// Asserts that `got` CQL requests are `expected`, give or take the background's.
fn assert_requests(got: u64, expected: u64, what: &str) {
    assert!(
        (expected..=expected + BACKGROUND_REQUESTS).contains(&got),
        "{got} requests for {what}, {expected} expected"
    );
}

/// What a connect asks the store before its session starts: the access rows, then the
/// registration.
async fn connect_calls(store: &relay::store::scylla::ScyllaStore, d: &DeviceRef) {
    store
        .access(d.user.to_string(), Some(d.device.to_string()))
        .await
        .expect("access");
    store.register_device(d.clone()).await.expect("register");
}

/// ScyllaDB only: what one message and one device's connect cost in CQL requests, counted by
/// the driver. The figures are the ones BENCHMARKS.md reports; a change that adds a round trip
/// to either path fails here first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_the_driver_counts_the_requests_of_a_message_and_a_connect() {
    let place = Place::new(Kind::Cassandra).await;
    let open = |retention| {
        place.open_scylla(
            Some(0),
            place.keyring(),
            retention,
            Arc::new(Recorder::default()),
        )
    };
    let store = open(LONG).await;
    let alice = DeviceRef::new("alice", "phone");
    let bob = DeviceRef::new("bob", "phone");
    store.register_device(bob.clone()).await.expect("register");
    // The first append loads bob's devices and reserves sequence numbers.
    let warm = store
        .append(msg(&alice, &["bob"], "warm"))
        .await
        .expect("reply")
        .expect("append");
    let n = 20;
    let before = store.cql_requests();
    let mut seqs = Vec::new();
    for i in 0..n {
        let acc = store
            .append(msg(&alice, &["bob"], &format!("m{i}")))
            .await
            .expect("reply")
            .expect("append");
        seqs.push(acc.seq);
    }
    // Read the id, reserve it, the inbox row, the archive row, mark it complete.
    assert_requests(store.cql_requests() - before, 5 * n, "the messages");
    // A page of the inbox: one request finds the weeks holding rows, one reads this week's.
    let before = store.cql_requests();
    let page = store
        .inbox_page(bob.clone(), 0, 1000, usize::MAX)
        .await
        .expect("page");
    assert_eq!(page.len() as u64, n + 1);
    assert_requests(store.cql_requests() - before, 2, "a page");
    // A cursor past next week (a client's far-future seq) asks nothing.
    let before = store.cql_requests();
    let page = store
        .inbox_page(bob.clone(), u64::MAX - 1, 1000, usize::MAX)
        .await
        .expect("page");
    assert!(page.is_empty());
    assert_requests(store.cql_requests() - before, 0, "a far-future cursor");
    // An acknowledgement of every message: one delete per device and week, not per message.
    let before = store.cql_requests();
    store.ack(bob.clone(), seqs).await.expect("ack");
    assert_requests(store.cql_requests() - before, 1, "an ack of every message");
    // An empty inbox costs the one request that finds no week holding rows.
    let before = store.cql_requests();
    let page = store
        .inbox_page(DeviceRef::new("nobody", "phone"), 0, 1000, usize::MAX)
        .await
        .expect("page");
    assert!(page.is_empty());
    assert_requests(store.cql_requests() - before, 1, "an empty page");
    // A connect: the access check and the registration (the access read is not repeated once
    // registered unless a logout came between: the next test).
    let before = store.cql_requests();
    for i in 0..n {
        connect_calls(&store, &DeviceRef::new(&format!("u{i}"), "phone")).await;
    }
    assert_requests(store.cql_requests() - before, 2 * n, "the connects");
    // A session's last-seen time with its token's organisation: one request.
    let before = store.cql_requests();
    for i in 0..n {
        let seen = relay::access::Change::Seen {
            at: now_ms(),
            org: Some(("org-a".into(), now_ms() / 1000)),
        };
        store
            .update_access(format!("u{i}"), "phone".into(), seen)
            .await
            .expect("seen");
    }
    assert_requests(store.cql_requests() - before, n, "the last-seen times");
    // Audit records: one request per partition (an organisation's report partition takes a
    // record of every connect of its users), in batches of bounded size.
    let record = |subject: &str, n: u64| relay::audit::Record {
        chain: relay::audit::Chain {
            subject: subject.into(),
            month: relay::audit::month_of(now_ms()),
            node: 0,
        },
        n,
        ts: now_ms(),
        entry: format!("{{\"event\":\"connect\",\"n\":{n}}}"),
        prev: [1; 32],
        hash: [2; 32],
        key_id: "k1".into(),
    };
    let before = store.cql_requests();
    let records: Vec<_> = (0..n)
        .map(|i| record("org-report", i))
        .chain((0..3).map(|i| record(&format!("u{i}"), 0)))
        .collect();
    relay::store::AuditLog::audit_append(&store, records)
        .await
        .expect("audit");
    assert_requests(store.cql_requests() - before, 1 + 3, "the audit records");
    // More than one batch holds: several batches, every record stored.
    let many: Vec<_> = (0..400).map(|i| record("big-org", i)).collect();
    let before = store.cql_requests();
    relay::store::AuditLog::audit_append(&store, many)
        .await
        .expect("audit");
    let requests = store.cql_requests() - before;
    assert!(
        (2..40).contains(&requests),
        "{requests} requests for 400 records"
    );
    let month = relay::audit::month_of(now_ms());
    for (subject, count) in [("org-report", n as usize), ("big-org", 400), ("u2", 1)] {
        let stored = relay::store::AuditLog::audit_read(&store, subject.into(), month)
            .await
            .expect("read");
        assert_eq!(stored.len(), count, "{subject}");
    }
    store.close().await.expect("close");
    // An inbox kept three years spans 157 weeks: ScyllaDB takes at most 100 keys in one `IN`,
    // so finding its weeks takes two requests, and the rows are still found.
    let three_years = Retention {
        inbox_ms: 3 * 365 * 86_400_000,
        ..LONG
    };
    let store = open(three_years).await;
    // A reconnect, on a node that never saw the device, of a device whose session ran (its
    // last-seen time is written only after its registration): the access read alone. Bob was
    // registered but never seen: registered again.
    let before = store.cql_requests();
    for i in 0..n {
        connect_calls(&store, &DeviceRef::new(&format!("u{i}"), "phone")).await;
    }
    assert_requests(
        store.cql_requests() - before,
        n,
        "the reconnects of devices seen before",
    );
    let before = store.cql_requests();
    connect_calls(&store, &bob).await;
    assert_requests(store.cql_requests() - before, 2, "a device never seen");
    assert_eq!(
        store.devices("u0".into()).await.expect("devices"),
        vec!["phone".to_string()]
    );
    let before = store.cql_requests();
    let page = store
        .inbox_page(DeviceRef::new("nobody", "phone"), 0, 1000, usize::MAX)
        .await
        .expect("page");
    assert!(page.is_empty());
    assert_requests(
        store.cql_requests() - before,
        2,
        "an empty page kept three years",
    );
    let sent = store
        .append(msg(&alice, &["bob"], "kept long"))
        .await
        .expect("reply")
        .expect("append");
    let page = store
        .inbox_page(bob.clone(), 0, 1000, usize::MAX)
        .await
        .expect("page");
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![warm.seq, sent.seq],
        "the one left unacknowledged and the new one"
    );
    store.close().await.expect("close");
}

/// ScyllaDB only: a connect reads the access rows once. The upgrade's check is reused when the
/// session starts unless a logout reached this node in between (or may have: a bus catch-up);
/// then the rows are read again, and a logout stored in between is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_a_connect_reads_the_access_rows_once_unless_a_logout_came_between() {
    use relay::access::{LogoutReason, Start, Target, Verdict};
    let place = Place::new(Kind::Cassandra).await;
    let scylla = Arc::new(
        place
            .open_scylla(
                Some(0),
                place.keyring(),
                LONG,
                Arc::new(Recorder::default()),
            )
            .await,
    );
    let store: Arc<dyn MessageStore> = scylla.clone();
    let (access, _audit_task) = relay_tests::access(store.clone());
    let iat = now_ms() / 1000;
    let n = 20;
    let before = scylla.cql_requests();
    for i in 0..n {
        let d = DeviceRef::new(&format!("u{i}"), "phone");
        let checked = access.check(&d, iat, None).await.expect("check");
        assert!(matches!(checked.verdict, Verdict::Allowed));
        store.register_device(d.clone()).await.expect("register");
        let start = access
            .session_start(&d, iat, checked.opening)
            .await
            .expect("start");
        assert_eq!(start, Start::Open { floor_ms: 0 });
    }
    // The access read and the registration.
    assert_requests(scylla.cql_requests() - before, 2 * n, "the connects");

    // A logout between the check and the session's start: read again, and it is seen.
    let d = DeviceRef::new("u0", "phone");
    let checked = access.check(&d, iat, None).await.expect("check");
    access
        .logout(Target::Device(d.clone()), LogoutReason::LostDevice, "test")
        .await
        .expect("logout");
    let start = access
        .session_start(&d, iat, checked.opening)
        .await
        .expect("start");
    assert!(matches!(start, Start::LoggedOut(_)), "{start:?}");
    scylla.close().await.expect("close");
}

/// What a sink was handed, with the bodies.
#[derive(Default)]
struct Bodies(std::sync::Mutex<Vec<(Vec<DeviceRef>, u64, Bytes)>>);

impl relay::store::DeliverySink for Bodies {
    fn deliver(&self, devices: &[DeviceRef], entry: &relay::store::InboxEntry) {
        if let Ok(mut v) = self.0.lock() {
            v.push((devices.to_vec(), entry.seq, entry.body.clone()));
        }
    }
}

/// ScyllaDB only: a resend of a message another node stored completely is delivered again,
/// as stored, to the devices whose inbox still holds it. The first node may have died between
/// its last write and its fan-out; answering `duplicate` alone would leave the recipients'
/// live sessions without the message until they reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_a_resend_of_a_message_another_node_stored_is_delivered_from_the_store() {
    let place = Place::new(Kind::Cassandra).await;
    let first_node = place
        .open_scylla(None, place.keyring(), LONG, Arc::new(Recorder::default()))
        .await;
    let seen = Arc::new(Bodies::default());
    let second_node = place
        .open_scylla(None, place.keyring(), LONG, seen.clone())
        .await;
    let alice = DeviceRef::new("alice", "phone");
    let (phone, laptop) = (
        DeviceRef::new("bob", "phone"),
        DeviceRef::new("bob", "laptop"),
    );
    for d in [&phone, &laptop] {
        first_node
            .register_device(d.clone())
            .await
            .expect("register");
    }
    let m = msg(&alice, &["bob"], "as stored");
    let id = m.id;
    let first = first_node
        .append(m.clone())
        .await
        .expect("reply")
        .expect("accepted");
    first_node
        .ack(laptop.clone(), vec![first.seq])
        .await
        .expect("ack");
    // The resend carries other bytes under the same id: what is delivered is what was stored.
    let again = second_node
        .append(NewMessage {
            body: Bytes::from_static(b"other bytes"),
            ..m
        })
        .await
        .expect("reply")
        .expect("accepted");
    assert!(again.duplicate && again.seq == first.seq);
    let got = seen.0.lock().expect("lock").clone();
    assert_eq!(
        got,
        vec![(vec![phone], first.seq, Bytes::from_static(b"as stored"))],
        "to the device that has not acknowledged it, as stored"
    );
    // A resend naming someone else reaches nobody new: only a device holding the stored row
    // is delivered to.
    let carol = DeviceRef::new("carol", "phone");
    second_node
        .register_device(carol.clone())
        .await
        .expect("register");
    let resent = NewMessage {
        id,
        ..msg(&alice, &["carol"], "other bytes")
    };
    let again = second_node
        .append(resent)
        .await
        .expect("reply")
        .expect("accepted");
    assert!(again.duplicate && again.seq == first.seq);
    let delivered = seen.0.lock().expect("lock").clone();
    assert!(
        !delivered
            .iter()
            .any(|(devices, _, _)| devices.contains(&carol)),
        "{delivered:?}"
    );
    for s in [first_node, second_node] {
        s.close().await.expect("close");
    }
}

/// ScyllaDB only: migration 9 moves the rows of a keyspace written with ids in its keys to the
/// pseudonymous tables, and every one of them reads back through the store; it waits for the
/// relays to stop, and the old tables are gone after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_migration_9_moves_every_row_to_pseudonymous_keys() {
    use relay::access::AccessRow;
    use relay::store::record;
    use relay::store::scylla::{connect, migrate_to};

    let place = Place::at_version(Kind::Cassandra, 8).await;
    let cfg = place.scylla_config();
    let session = connect(&cfg).await.expect("connect");
    session
        .use_keyspace(&cfg.keyspace, false)
        .await
        .expect("use");
    let ring = place.keyring();
    let (alice, bob) = (
        DeviceRef::new("alice", "phone"),
        DeviceRef::new("bob", "tablet"),
    );
    let id = Uuid::new_v4();
    let seq = relay::store::seq_floor(now_ms());
    let week = (relay::store::seq_time_ms(seq) / (7 * 86_400_000)) as i32;
    let rec = record::Record {
        ts: 5,
        urgent: true,
        from: &alice,
        to: &[],
        body: b"opaque",
    };
    let sealed = record::seal_inbox(&ring, &record::inbox_key(&bob, seq), &id, &rec);
    let write = |cql: &'static str, values| {
        let session = &session;
        async move { session.query_unpaged(cql, values).await.expect(cql) }
    };
    session
        .query_unpaged(
            "INSERT INTO inbox (user_id, device_id, week, seq, msg_id, sealed) VALUES (?, ?, ?, ?, ?, ?) USING TTL 3600",
            ("bob", "tablet", week, seq as i64, id, sealed),
        )
        .await
        .expect("inbox");
    session
        .query_unpaged(
            "INSERT INTO message_ids (sender, msg_id, seq, ts, complete) VALUES (?, ?, ?, ?, true)",
            ("alice", id, seq as i64, 5i64),
        )
        .await
        .expect("message ids");
    for d in [&alice, &bob] {
        session
            .query_unpaged(
                "INSERT INTO devices (user_id, device_id, registered_at) VALUES (?, ?, 1)",
                (&*d.user, &*d.device),
            )
            .await
            .expect("devices");
    }
    let token = push::DeviceToken {
        platform: push::Platform::Fcm,
        token: "fcm-token".into(),
        environment: push::Environment::Production,
        app_id: "app".into(),
    };
    let push_sealed = record::seal_push_token(&ring, &record::device_key(&bob), &token);
    session
        .query_unpaged(
            "INSERT INTO push_tokens (user_id, device_id, sealed) VALUES ('bob', 'tablet', ?)",
            (push_sealed,),
        )
        .await
        .expect("push");
    let signal = Uuid::new_v4();
    session
        .query_unpaged(
            "UPDATE access SET revoked_at = 7, revoke_reason = 'lost_device', signal = ?, except_device = 'desk', last_seen = 9 WHERE user_id = 'bob' AND device_id = 'tablet'",
            (signal,),
        )
        .await
        .expect("access");
    write("UPDATE access USING TIMESTAMP 1700000000000000 SET org = 'clinic' WHERE user_id = 'bob' AND device_id = ''", ()).await;
    write(
        "INSERT INTO org_users (org, user_id) VALUES ('clinic', 'bob')",
        (),
    )
    .await;
    write("INSERT INTO pending_logouts (bucket, user_id, device_id, requested_at) VALUES (0, 'bob', 'tablet', 11)", ()).await;
    write("INSERT INTO audit (subject, month, node, n, ts, entry, prev, hash, key_id) VALUES ('bob', 24300, 0, 1, 12, '{\"event\":\"connect\"}', 0x01, 0x02, 'a1') USING TTL 3600", ()).await;

    // A running relay (its key announcement) holds the migration back.
    write(
        "INSERT INTO node_keys (node_id, key_ids, active) VALUES (3, {'k1'}, 'k1')",
        (),
    )
    .await;
    let refused = migrate_to(&cfg, Some(&ring), 9).await;
    assert!(
        matches!(refused, Err(relay::store::StoreError::Refused(_))),
        "{refused:?}"
    );
    write("DELETE FROM node_keys WHERE node_id = 3", ()).await;
    // Rows to move and no keys to move them with: refused too.
    assert!(migrate_to(&cfg, None, 9).await.is_err());
    assert_eq!(
        migrate_to(&cfg, Some(&ring), 9).await.expect("migrate"),
        vec![9]
    );
    // The migrations after it add tables and a column only.
    assert_eq!(
        migrate_to(&cfg, Some(&ring), relay::store::scylla::SCHEMA_VERSION)
            .await
            .expect("migrate")
            .len(),
        (relay::store::scylla::SCHEMA_VERSION - 9) as usize
    );

    let store = place
        .open(ring.clone(), LONG, Arc::new(Recorder::default()))
        .await;
    let page = store
        .inbox_page(bob.clone(), 0, 10, usize::MAX)
        .await
        .expect("inbox");
    assert_eq!(page.len(), 1);
    assert_eq!((page[0].id, &page[0].body[..]), (id, &b"opaque"[..]));
    assert_eq!(
        store.devices("bob".into()).await.expect("devices"),
        ["tablet"]
    );
    assert_eq!(
        store.devices("alice".into()).await.expect("devices"),
        ["phone"]
    );
    let got = store
        .push_token(bob.clone())
        .await
        .expect("push")
        .expect("token");
    assert_eq!(got.token, "fcm-token");
    let mut access = store.access("bob".into(), None).await.expect("access");
    access.sort_by(|a, b| a.0.cmp(&b.0));
    let (user_row, device_row): (&AccessRow, &AccessRow) = (&access[0].1, &access[1].1);
    assert_eq!((access[0].0.as_str(), access[1].0.as_str()), ("", "tablet"));
    assert_eq!(user_row.org.as_deref(), Some("clinic"));
    assert_eq!(user_row.org_since, Some(1_700_000_000));
    let revoked = device_row.revoked.as_ref().expect("revocation kept");
    assert_eq!(
        (revoked.signal, revoked.except.as_deref()),
        (signal, Some("desk"))
    );
    assert_eq!(device_row.last_seen, Some(9));
    assert_eq!(
        store.org_users("clinic".into()).await.expect("org"),
        ["bob"]
    );
    assert_eq!(
        store.pending_logouts().await.expect("pending"),
        [(bob.clone(), 11)]
    );
    let audit = store.audit_read("bob".into(), 24_300).await.expect("audit");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].entry, r#"{"event":"connect"}"#);
    assert_eq!(
        store.audit_partitions().await.expect("partitions"),
        [("bob".to_string(), 24_300)]
    );
    let again = store
        .append(NewMessage {
            id,
            ..msg(&alice, &["bob"], "opaque")
        })
        .await
        .expect("reply")
        .expect("append");
    assert!(
        again.duplicate && again.seq == seq,
        "the message id is still known"
    );
    store.close().await.expect("close");
    let old = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name IN ('inbox', 'access', 'audit', 'devices')",
            (&cfg.keyspace,),
        )
        .await
        .expect("tables")
        .into_rows_result()
        .expect("rows");
    assert_eq!(old.rows_num(), 0, "the tables keyed by ids are dropped");
}

/// ScyllaDB only: a CQL dump of the keyspace (every row of every table, blobs read as text)
/// after a store has held messages, devices, access state, a pending logout, a push token and
/// audit records of users with distinctive ids does not contain those ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_a_cql_dump_does_not_tell_who_messaged_whom() {
    use relay::access::{Change, Revocation};
    use relay::store::scylla::connect;
    use scylla::value::{CqlValue, Row};

    let place = Place::new(Kind::Cassandra).await;
    let store = place
        .open(place.keyring(), LONG, Arc::new(Recorder::default()))
        .await;
    let run = Uuid::new_v4().simple().to_string()[..10].to_string();
    let (sender, recipient, org) = (
        format!("zebradoc{run}"),
        format!("okapinurse{run}"),
        format!("okapiclinic{run}"),
    );
    let (phone, tablet) = (format!("zebraphone{run}"), format!("okapitablet{run}"));
    let from = DeviceRef::new(&sender, &phone);
    let to = DeviceRef::new(&recipient, &tablet);
    store.register_device(from.clone()).await.expect("register");
    store.register_device(to.clone()).await.expect("register");
    let m = msg(&from, &[recipient.as_str()], "opaque");
    store.append(m).await.expect("reply").expect("accepted");
    let seen = Change::Seen {
        at: 1,
        org: Some((org.clone(), 1)),
    };
    store
        .update_access(recipient.clone(), tablet.clone(), seen)
        .await
        .expect("seen");
    let revoke = Change::Revoke(Revocation {
        at: 2,
        reason: "password_changed".into(),
        signal: Uuid::new_v4(),
        except: Some(tablet.clone()),
    });
    store
        .update_access(recipient.clone(), String::new(), revoke)
        .await
        .expect("revoke");
    store
        .set_pending_logout(from.clone(), Some(3))
        .await
        .expect("pending");
    let token = push::DeviceToken {
        platform: push::Platform::Fcm,
        token: "t".into(),
        environment: push::Environment::Production,
        app_id: "app".into(),
    };
    store
        .set_push_token(to.clone(), Some(token))
        .await
        .expect("push");
    let (audit, _task) = auditor(store.clone(), 0, audit_keys(), None);
    audit.record(relay::audit::Event::new(relay::audit::EventKind::Connect).device(&from));
    audit.record(relay::audit::Event::new(relay::audit::EventKind::Connect).device(&to));
    audit.flush(Duration::from_secs(10)).await;
    assert_eq!(
        store.org_users(org.clone()).await.expect("org"),
        std::slice::from_ref(&recipient)
    );

    let cfg = place.scylla_config();
    let session = connect(&cfg).await.expect("connect");
    let tables = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (&cfg.keyspace,),
        )
        .await
        .expect("tables")
        .into_rows_result()
        .expect("rows");
    let mut dump = String::new();
    for table in tables.rows::<(String,)>().expect("rows") {
        let (table,) = table.expect("row");
        let rows = session
            .query_unpaged(format!("SELECT * FROM {}.{table}", cfg.keyspace), ())
            .await
            .expect("select")
            .into_rows_result()
            .expect("rows");
        for row in rows.rows::<Row>().expect("rows") {
            for value in row.expect("row").columns.into_iter().flatten() {
                match value {
                    CqlValue::Blob(b) => dump.push_str(&String::from_utf8_lossy(&b)),
                    other => dump.push_str(&format!("{other:?}")),
                }
                dump.push('\n');
            }
        }
    }
    assert!(dump.len() > 1000, "the dump holds the rows");
    // Control: what is stored in clear does show (the revocation's reason code).
    assert!(dump.contains("password_changed"));
    for id in [&sender, &recipient, &org, &phone, &tablet] {
        assert!(!dump.contains(id.as_str()), "{id} in the dump");
    }
}

/// ScyllaDB only: a keyspace whose ids key row was deleted does not open with a fresh key (every
/// row, revocations included, would look absent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_a_keyspace_whose_ids_key_was_deleted_refuses_to_open() {
    use relay::store::scylla::{ScyllaStore, connect};

    let place = Place::new(Kind::Cassandra).await;
    let store = place
        .open(place.keyring(), LONG, Arc::new(Recorder::default()))
        .await;
    store
        .register_device(DeviceRef::new("bob", "tablet"))
        .await
        .expect("register");
    store.close().await.expect("close");
    drop(store);
    let cfg = place.scylla_config();
    let session = connect(&cfg).await.expect("connect");
    session
        .query_unpaged(
            format!("DELETE FROM {}.store_keys WHERE name = 'ids'", cfg.keyspace),
            (),
        )
        .await
        .expect("delete");
    let reopened = ScyllaStore::open(
        &cfg,
        Some(0),
        place.keyring(),
        LONG,
        Arc::new(Recorder::default()),
    )
    .await;
    assert!(matches!(
        reopened,
        Err(relay::store::StoreError::Refused(_))
    ));
}
