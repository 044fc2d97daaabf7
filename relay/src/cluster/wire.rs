//! What nodes say to each other on the bus, and how it is encoded.
//!
//! Every publication is sealed with the at-rest keyring (AES-256-GCM) with its subject as
//! associated data: a NATS without TLS sees no ids and no ciphertext, and a publisher without
//! the keyring cannot forge a delivery, a displacement or a resync.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::seal::Keyring;
use crate::store::record::{push_id, take_id, take_u64};
use crate::store::{DeviceRef, InboxEntry};

/// Subjects of one deployment (`prefix` keeps deployments sharing a NATS apart).
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_string(),
        }
    }

    /// Deliveries for one user's devices. User ids may hold characters NATS reserves, so the
    /// subject carries a stable hash; a collision only sends a node a delivery it ignores.
    pub fn user(&self, user: &str) -> String {
        format!("{}.u.{:016x}", self.prefix, fnv1a(user.as_bytes()))
    }

    /// Presence events, heartbeats, snapshot requests, resyncs: every node listens.
    pub fn control(&self, kind: &str) -> String {
        format!("{}.ctl.{kind}", self.prefix)
    }

    /// All control subjects.
    pub fn control_all(&self) -> String {
        format!("{}.ctl.*", self.prefix)
    }

    /// Presence snapshots addressed to one node instance.
    pub fn snapshot(&self, instance: u64) -> String {
        format!("{}.snap.{instance:016x}", self.prefix)
    }
}

/// FNV-1a, 64 bits: stable across builds and versions (unlike `std`'s hasher), which nodes of
/// different versions in a rolling upgrade rely on.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A stored message for some devices of one user, from the node that stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Instance that stored it (a node ignores its own).
    pub origin: u64,
    /// When it was published, µs since the Unix epoch (cross-node latency).
    pub sent_us: u64,
    /// Recipient devices (all of one user).
    pub devices: Vec<DeviceRef>,
    /// The message.
    pub entry: InboxEntry,
}

const DELIVERY_V1: u8 = 1;

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

impl Delivery {
    /// Binary layout: version, origin, sent, seq, ts, id, urgent, sender, user, devices, body.
    pub fn encode(&self) -> Vec<u8> {
        let e = &self.entry;
        let mut out = Vec::with_capacity(64 + e.body.len() + 32 * self.devices.len());
        out.push(DELIVERY_V1);
        for v in [self.origin, self.sent_us, e.seq, e.ts] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(e.id.as_bytes());
        out.push(u8::from(e.urgent));
        push_id(&mut out, &e.from.user);
        push_id(&mut out, &e.from.device);
        let user = self.devices.first().map_or("", |d| &*d.user);
        push_id(&mut out, user);
        out.extend_from_slice(&(self.devices.len() as u16).to_be_bytes());
        for d in &self.devices {
            push_id(&mut out, &d.device);
        }
        out.extend_from_slice(&e.body);
        out
    }

    /// Parses [`Delivery::encode`]'s output; `None` for anything else.
    pub fn decode(mut buf: &[u8]) -> Option<Delivery> {
        let b = &mut buf;
        if *take(b, 1)?.first()? != DELIVERY_V1 {
            return None;
        }
        let (origin, sent_us, seq, ts) = (take_u64(b)?, take_u64(b)?, take_u64(b)?, take_u64(b)?);
        let id = Uuid::from_slice(take(b, 16)?).ok()?;
        let urgent = *take(b, 1)?.first()? != 0;
        let from = DeviceRef::new(take_id(b)?, take_id(b)?);
        let user = take_id(b)?;
        let n = u16::from_be_bytes(take(b, 2)?.try_into().ok()?);
        let devices = (0..n)
            .map(|_| take_id(b).map(|d| DeviceRef::new(user, d)))
            .collect::<Option<Vec<_>>>()?;
        Some(Delivery {
            origin,
            sent_us,
            devices,
            entry: InboxEntry {
                seq,
                ts,
                id,
                from,
                urgent,
                body: Bytes::copy_from_slice(buf),
            },
        })
    }
}

/// Control messages (`<prefix>.ctl.*`, `<prefix>.snap.*`). Small and infrequent: JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
#[allow(missing_docs)] // fields: `instance` is the sender; the rest are named for what they hold
pub enum Control {
    /// A device connected to `instance` at `since` (ms); older connections elsewhere close.
    Online {
        instance: u64,
        user: String,
        device: String,
        since: u64,
    },
    /// The connection of `device` that began at `since` on `instance` ended.
    Offline {
        instance: u64,
        user: String,
        device: String,
        since: u64,
    },
    /// A node is alive, with how many devices it holds.
    Heartbeat {
        instance: u64,
        node_id: u8,
        devices: usize,
        /// The node is shutting down: forget its devices now.
        leaving: bool,
        /// The oldest sequence number it has stored, or is storing, that may not be on the bus
        /// yet: if it dies, the others re-read their inboxes from there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unpublished: Option<u64>,
    },
    /// Asks every node for its devices, answered to `<prefix>.snap.<instance>`.
    SyncRequest { instance: u64 },
    /// Part of a node's device list (`part` 0 replaces what was known of `instance`).
    Snapshot {
        instance: u64,
        node_id: u8,
        part: u32,
        devices: Vec<(String, String, u64)>,
    },
    /// Deliveries published since `floor` (a sequence number) may have been lost: sessions
    /// re-read their inbox from there.
    Resync { instance: u64, floor: u64 },
    /// Devices of `user` were logged out (one `device`, or all but `except`): close their
    /// sessions with the `logout` frame. The revocation is already stored.
    Logout {
        instance: u64,
        user: String,
        device: Option<String>,
        except: Option<String>,
        reason: String,
        signal: uuid::Uuid,
        /// Revocation time, ms.
        at: u64,
    },
}

/// Seals a publication for `subject`.
pub fn seal(keyring: &Keyring, subject: &str, plain: &[u8]) -> Bytes {
    keyring.seal(subject.as_bytes(), plain).into()
}

/// Opens a publication received on `subject`; `None` if it was not sealed by a node of ours.
pub fn open(keyring: &Keyring, subject: &str, sealed: &[u8]) -> Option<Vec<u8>> {
    keyring.open(subject.as_bytes(), sealed).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_round_trips() {
        let d = Delivery {
            origin: 7,
            sent_us: 9,
            devices: vec![DeviceRef::new("u", "a"), DeviceRef::new("u", "bb")],
            entry: InboxEntry {
                seq: 1 << 40,
                ts: 1_767_225_600_000,
                id: Uuid::new_v4(),
                from: DeviceRef::new("s", "d"),
                urgent: true,
                body: Bytes::from_static(b"\x00opaque\xff"),
            },
        };
        assert_eq!(Delivery::decode(&d.encode()), Some(d.clone()));
        let enc = d.encode();
        for cut in 0..enc.len() - d.entry.body.len() {
            assert_eq!(Delivery::decode(&enc[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn user_subjects_are_valid_nats_tokens_and_stable() {
        let s = Subjects::new("relay");
        assert_eq!(s.user("dr.bob *>"), s.user("dr.bob *>"));
        assert_ne!(s.user("a"), s.user("b"));
        let tail = s.user("dr.bob *>").rsplit('.').next().map(str::to_string);
        assert!(tail.is_some_and(|t| t.chars().all(|c| c.is_ascii_hexdigit())));
        // Pinned (FNV-1a 64 of "alice", computed independently): all builds must agree.
        assert_eq!(s.user("alice"), "relay.u.508b2abb65a03907");
    }

    #[test]
    fn sealed_publications_are_bound_to_their_subject() {
        let keyring = Keyring::new(std::iter::once(("k".to_string(), [7u8; 32])).collect(), "k")
            .expect("keyring");
        let sealed = seal(&keyring, "relay.u.1", b"x");
        assert_eq!(
            open(&keyring, "relay.u.1", &sealed).as_deref(),
            Some(&b"x"[..])
        );
        assert!(open(&keyring, "relay.u.2", &sealed).is_none());
    }
}
