//! A model of delivery, checked against the real store (ISSUE 15): random sequences of sends
//! (to one to three users, some with several devices), resends of an id already accepted, acks
//! (in order, out of order, stale), new devices, and restarts of the store (closed and opened
//! again from disk), against the embedded store (and, with fewer cases, Cassandra). After every
//! step the store must agree with the model:
//! - every accepted message is in the inbox of each device its recipients and its sender had
//!   when it was accepted (but the sending device: a user's other devices get copies of what
//!   they send), until acknowledged, in sequence order, exactly once;
//! - a resend of an accepted id is a duplicate with the first sequence, and stores nothing;
//! - acks delete only what they name; nothing accepted is lost across a restart;
//! - every accepted message stays in the archive.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use relay::store::{DeviceRef, MessageStore, NewMessage, Retention};
use relay_tests::{Kind, Place, Recorder};
use uuid::Uuid;

const USERS: [&str; 3] = ["u0", "u1", "u2"];
const RETENTION: Retention = Retention {
    archive_ms: 6 * 365 * 86_400_000,
    inbox_ms: 30 * 86_400_000,
    idempotency_ms: 7 * 86_400_000,
    audit_ms: 6 * 31_557_600_000,
};

#[derive(Debug, Clone)]
enum Op {
    /// User `from`'s first device sends to the users in bitmask `to` (1..=7).
    Send { from: usize, to: u8 },
    /// Resends the `nth` accepted message (mod how many there are) with the same id.
    Resend { nth: usize },
    /// A device acks: picks (mod the unacked list, and one seq that is not there) of its inbox.
    Ack {
        user: usize,
        device: usize,
        picks: Vec<usize>,
        stale: bool,
    },
    /// A new device for a user (up to three each).
    AddDevice { user: usize },
    /// Close the store and open it again from disk.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 1..8u8).prop_map(|(from, to)| Op::Send { from, to }),
        1 => any::<usize>().prop_map(|nth| Op::Resend { nth }),
        4 => (0..3usize, 0..3usize, prop::collection::vec(any::<usize>(), 0..4), any::<bool>())
            .prop_map(|(user, device, picks, stale)| Op::Ack { user, device, picks, stale }),
        1 => (0..3usize).prop_map(|user| Op::AddDevice { user }),
        1 => Just(Op::Restart),
    ]
}

struct Sent {
    id: Uuid,
    from: DeviceRef,
    to: Vec<String>,
    seq: u64,
    body: Bytes,
}

/// What the store should hold.
#[derive(Default)]
struct Model {
    devices: HashMap<String, Vec<DeviceRef>>,
    inbox: HashMap<DeviceRef, BTreeSet<u64>>,
    sent: Vec<Sent>,
}

async fn all_pages(store: &dyn MessageStore, d: &DeviceRef) -> Vec<u64> {
    let (mut seqs, mut cursor) = (Vec::new(), 0);
    loop {
        let page = store
            .inbox_page(d.clone(), cursor, 7, 1 << 20)
            .await
            .expect("page");
        seqs.extend(page.iter().map(|e| e.seq));
        match page.last() {
            Some(last) if page.len() == 7 => cursor = last.seq,
            _ => return seqs,
        }
    }
}

async fn run(kind: Kind, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let place = Place::new(kind).await;
    let open = || place.open(place.keyring(), RETENTION, Arc::new(Recorder::default()));
    let mut store = open().await;
    let mut model = Model::default();
    for user in USERS {
        let d = DeviceRef::new(user, "d0");
        store.register_device(d.clone()).await.expect("register");
        model.devices.insert(user.into(), vec![d.clone()]);
        model.inbox.insert(d, BTreeSet::new());
    }
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Send { from, to } => {
                let from = DeviceRef::new(USERS[from], "d0");
                let to: Vec<String> = (0..3)
                    .filter(|i| to & (1 << i) != 0)
                    .map(|i| USERS[i].to_string())
                    .collect();
                let id = Uuid::new_v4();
                let body = Bytes::from(format!("step {step}"));
                let msg = NewMessage {
                    id,
                    from: from.clone(),
                    to: to.clone(),
                    body: body.clone(),
                    urgent: false,
                };
                let accepted = store.append(msg).await.expect("reply").expect("accepted");
                prop_assert!(!accepted.duplicate);
                prop_assert!(
                    model.sent.iter().all(|s| s.seq < accepted.seq),
                    "sequences increase"
                );
                let users: BTreeSet<&str> =
                    to.iter().map(String::as_str).chain([&*from.user]).collect();
                for user in users {
                    for d in model.devices[user].iter().filter(|d| **d != from) {
                        model
                            .inbox
                            .entry(d.clone())
                            .or_default()
                            .insert(accepted.seq);
                    }
                }
                model.sent.push(Sent {
                    id,
                    from,
                    to,
                    seq: accepted.seq,
                    body,
                });
            }
            Op::Resend { nth } => {
                if model.sent.is_empty() {
                    continue;
                }
                let first = &model.sent[nth % model.sent.len()];
                let msg = NewMessage {
                    id: first.id,
                    from: first.from.clone(),
                    to: first.to.clone(),
                    body: first.body.clone(),
                    urgent: false,
                };
                let again = store.append(msg).await.expect("reply").expect("accepted");
                prop_assert!(again.duplicate, "a resend is a duplicate");
                prop_assert_eq!(again.seq, first.seq, "with the first sequence");
            }
            Op::Ack {
                user,
                device,
                picks,
                stale,
            } => {
                let devices = &model.devices[USERS[user]];
                let d = devices[device % devices.len()].clone();
                let unacked: Vec<u64> = model.inbox[&d].iter().copied().collect();
                let mut seqs: Vec<u64> = if unacked.is_empty() {
                    Vec::new()
                } else {
                    picks.iter().map(|p| unacked[p % unacked.len()]).collect()
                };
                if stale {
                    // Already acked, or never this device's: acks name only what they delete.
                    seqs.extend(
                        model
                            .sent
                            .iter()
                            .map(|s| s.seq)
                            .find(|s| !unacked.contains(s)),
                    );
                }
                store.ack(d.clone(), seqs.clone()).await.expect("ack");
                let inbox = model.inbox.entry(d).or_default();
                for s in seqs {
                    inbox.remove(&s);
                }
            }
            Op::AddDevice { user } => {
                let devices = model.devices.get_mut(USERS[user]).expect("user");
                if devices.len() < 3 {
                    let d = DeviceRef::new(USERS[user], &format!("d{}", devices.len()));
                    store.register_device(d.clone()).await.expect("register");
                    devices.push(d.clone());
                    model.inbox.insert(d, BTreeSet::new());
                }
            }
            Op::Restart => {
                store.close().await.expect("close");
                drop(store);
                store = open().await;
            }
        }
        // The store agrees with the model after every step.
        for (d, expected) in &model.inbox {
            let got = all_pages(&*store, d).await;
            let want: Vec<u64> = expected.iter().copied().collect();
            prop_assert_eq!(got, want, "step {}: inbox of {:?}", step, d);
        }
    }
    for s in &model.sent {
        let archived = store.archived(s.seq, s.id).await.expect("archive");
        prop_assert!(
            archived.is_some_and(|a| a.entry.body == s.body),
            "message {} is in the archive",
            s.seq
        );
    }
    store.close().await.expect("close");
    Ok(())
}

fn check(kind: Kind, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(kind, ops))
}

/// `PROPTEST_CASES` if set (longer runs by hand), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(128), failure_persistence: None, ..ProptestConfig::default()
    })]
    #[test]
    fn embedded_store_delivers_as_the_model_says(ops in prop::collection::vec(op(), 1..40)) {
        check(Kind::Embedded, ops)?;
    }
}

proptest! {
    // A fresh keyspace costs seconds of schema agreement: few, longer cases.
    #![proptest_config(ProptestConfig {
        cases: cases(4), max_shrink_iters: 16, failure_persistence: None, ..ProptestConfig::default()
    })]
    #[test]
    fn cassandra_store_delivers_as_the_model_says(ops in prop::collection::vec(op(), 20..60)) {
        check(Kind::Cassandra, ops)?;
    }
}
