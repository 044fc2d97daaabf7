//! The binary layout of stored rows: keys that sort in the order the relay reads them, and the
//! sealed message record. Ids are length-prefixed, so no id is a prefix of another's key.
//!
//! The associated data of a sealed record binds it to its row: the table, the recipient device
//! (inbox) and the sequence and message id. A record copied into another row does not open.

use bytes::Bytes;
use uuid::Uuid;

use super::{DeviceRef, InboxEntry};
use crate::seal::{Keyring, SealError};

/// Appends a length-prefixed id (the encoding every key and record here uses; also the bus's).
pub(crate) fn push_id(out: &mut Vec<u8>, id: &str) {
    // Ids are at most 128 bytes (checked at authentication), so the length fits a byte.
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
}

/// Reads an id written by [`push_id`].
pub(crate) fn take_id<'a>(buf: &mut &'a [u8]) -> Option<&'a str> {
    let (&len, rest) = buf.split_first()?;
    if rest.len() < len as usize {
        return None;
    }
    let (id, rest) = rest.split_at(len as usize);
    *buf = rest;
    std::str::from_utf8(id).ok()
}

/// Reads a big-endian u64.
pub(crate) fn take_u64(buf: &mut &[u8]) -> Option<u64> {
    let (head, rest) = buf.split_first_chunk::<8>()?;
    *buf = rest;
    Some(u64::from_be_bytes(*head))
}

/// `user | device`: prefix of a device's inbox rows, and the key of its device row.
pub fn device_key(d: &DeviceRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + d.user.len() + d.device.len() + 8);
    push_id(&mut k, &d.user);
    push_id(&mut k, &d.device);
    k
}

/// `user | device | seq`.
pub fn inbox_key(d: &DeviceRef, seq: u64) -> Vec<u8> {
    let mut k = device_key(d);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Sequence number at the end of an inbox key.
pub fn inbox_key_seq(key: &[u8]) -> Option<u64> {
    let tail = key.last_chunk::<8>()?;
    Some(u64::from_be_bytes(*tail))
}

/// `seq | message id`: the archive sorts by time.
pub fn archive_key(seq: u64, id: &Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Value of an idempotency row: what the first accept answered.
pub fn idempotency_value(seq: u64, ts: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v[8..].copy_from_slice(&ts.to_be_bytes());
    v
}

/// Parses an idempotency row value.
pub fn parse_idempotency_value(v: &[u8]) -> Option<(u64, u64)> {
    let mut buf = v;
    Some((take_u64(&mut buf)?, take_u64(&mut buf)?))
}

/// The message fields that are sealed in every row that holds the message.
pub struct Record<'a> {
    /// Accept time.
    pub ts: u64,
    /// Urgent flag.
    pub urgent: bool,
    /// Sender.
    pub from: &'a DeviceRef,
    /// Recipient users (archive rows only; empty in inbox rows).
    pub to: &'a [String],
    /// Opaque body.
    pub body: &'a [u8],
}

impl Record<'_> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            16 + self.from.user.len() + self.from.device.len() + self.body.len(),
        );
        out.extend_from_slice(&self.ts.to_be_bytes());
        out.push(u8::from(self.urgent));
        push_id(&mut out, &self.from.user);
        push_id(&mut out, &self.from.device);
        out.extend_from_slice(&(self.to.len() as u16).to_be_bytes());
        for user in self.to {
            push_id(&mut out, user);
        }
        out.extend_from_slice(self.body);
        out
    }
}

fn inbox_aad(key: &[u8], id: &Uuid) -> Vec<u8> {
    let mut aad = b"inbox|".to_vec();
    aad.extend_from_slice(key);
    aad.extend_from_slice(id.as_bytes());
    aad
}

fn archive_aad(key: &[u8]) -> Vec<u8> {
    let mut aad = b"archive|".to_vec();
    aad.extend_from_slice(key);
    aad
}

/// Value of an inbox row: `message id | sealed record`.
pub fn seal_inbox(keyring: &Keyring, key: &[u8], id: &Uuid, rec: &Record<'_>) -> Vec<u8> {
    let mut v = id.as_bytes().to_vec();
    v.extend_from_slice(&keyring.seal(&inbox_aad(key, id), &rec.encode()));
    v
}

/// Value of an archive row: the sealed record, recipients included.
pub fn seal_archive(keyring: &Keyring, key: &[u8], rec: &Record<'_>) -> Vec<u8> {
    keyring.seal(&archive_aad(key), &rec.encode())
}

/// Opens an inbox row.
pub fn open_inbox(keyring: &Keyring, key: &[u8], value: &[u8]) -> Result<InboxEntry, SealError> {
    let (id, sealed) = value.split_first_chunk::<16>().ok_or(SealError::Tampered)?;
    let id = Uuid::from_bytes(*id);
    let seq = inbox_key_seq(key).ok_or(SealError::Tampered)?;
    let plain = keyring.open(&inbox_aad(key, &id), sealed)?;
    let (ts, urgent, from, _to, body) = decode(&plain).ok_or(SealError::Tampered)?;
    Ok(InboxEntry {
        seq,
        ts,
        id,
        from,
        urgent,
        body: Bytes::copy_from_slice(body),
    })
}

/// An archived message, opened.
#[derive(Debug, PartialEq, Eq)]
pub struct ArchivedMessage {
    /// The message as a device would see it.
    pub entry: InboxEntry,
    /// Recipient users.
    pub to: Vec<String>,
}

/// Opens an archive row.
pub fn open_archive(
    keyring: &Keyring,
    key: &[u8],
    value: &[u8],
) -> Result<ArchivedMessage, SealError> {
    let mut k = key;
    let seq = take_u64(&mut k).ok_or(SealError::Tampered)?;
    let id = Uuid::from_slice(k).map_err(|_| SealError::Tampered)?;
    let plain = keyring.open(&archive_aad(key), value)?;
    let (ts, urgent, from, to, body) = decode(&plain).ok_or(SealError::Tampered)?;
    Ok(ArchivedMessage {
        entry: InboxEntry {
            seq,
            ts,
            id,
            from,
            urgent,
            body: Bytes::copy_from_slice(body),
        },
        to,
    })
}

type Decoded<'a> = (u64, bool, DeviceRef, Vec<String>, &'a [u8]);

fn decode(plain: &[u8]) -> Option<Decoded<'_>> {
    let mut buf = plain;
    let ts = take_u64(&mut buf)?;
    let (&flags, rest) = buf.split_first()?;
    buf = rest;
    let user = take_id(&mut buf)?;
    let device = take_id(&mut buf)?;
    let (count, rest) = buf.split_first_chunk::<2>()?;
    buf = rest;
    let mut to = Vec::with_capacity(u16::from_be_bytes(*count) as usize);
    for _ in 0..u16::from_be_bytes(*count) {
        to.push(take_id(&mut buf)?.to_string());
    }
    Some((ts, flags & 1 == 1, DeviceRef::new(user, device), to, buf))
}

fn push_aad(device_key: &[u8]) -> Vec<u8> {
    let mut aad = b"push|".to_vec();
    aad.extend_from_slice(device_key);
    aad
}

/// Value of a push-token row: the registration sealed to its device (tokens are device
/// identifiers; they are kept out of database dumps like everything else).
pub fn seal_push_token(keyring: &Keyring, device_key: &[u8], token: &push::DeviceToken) -> Vec<u8> {
    let json = serde_json::to_vec(token).unwrap_or_default();
    keyring.seal(&push_aad(device_key), &json)
}

/// Opens a push-token row.
pub fn open_push_token(
    keyring: &Keyring,
    device_key: &[u8],
    value: &[u8],
) -> Result<push::DeviceToken, SealError> {
    let plain = keyring.open(&push_aad(device_key), value)?;
    serde_json::from_slice(&plain).map_err(|_| SealError::Tampered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::parse(&format!("k:{}", Keyring::generate_key_b64()), "k").expect("ring")
    }

    #[test]
    fn inbox_rows_round_trip_and_cannot_be_swapped() {
        let ring = keyring();
        let from = DeviceRef::new("alice", "phone");
        let bob = DeviceRef::new("bob", "tablet");
        let carol = DeviceRef::new("carol", "tablet");
        let id = Uuid::new_v4();
        let rec = Record {
            ts: 5,
            urgent: true,
            from: &from,
            to: &[],
            body: b"opaque",
        };
        let key = inbox_key(&bob, 42);
        let value = seal_inbox(&ring, &key, &id, &rec);
        let entry = open_inbox(&ring, &key, &value).expect("open");
        assert_eq!(entry.seq, 42);
        assert_eq!(entry.id, id);
        assert_eq!(entry.from, from);
        assert!(entry.urgent);
        assert_eq!(&entry.body[..], b"opaque");
        // The same row value under another device or sequence fails authentication.
        assert!(open_inbox(&ring, &inbox_key(&carol, 42), &value).is_err());
        assert!(open_inbox(&ring, &inbox_key(&bob, 43), &value).is_err());
        // Rewriting the clear message id is detected too.
        let mut other_id = value.clone();
        other_id[0] ^= 1;
        assert!(open_inbox(&ring, &key, &other_id).is_err());
    }

    #[test]
    fn archive_rows_round_trip() {
        let ring = keyring();
        let from = DeviceRef::new("alice", "phone");
        let to = vec!["bob".to_string(), "carol".to_string()];
        let id = Uuid::new_v4();
        let key = archive_key(7, &id);
        let rec = Record {
            ts: 9,
            urgent: false,
            from: &from,
            to: &to,
            body: b"b",
        };
        let value = seal_archive(&ring, &key, &rec);
        let msg = open_archive(&ring, &key, &value).expect("open");
        assert_eq!(msg.to, to);
        assert_eq!(msg.entry.seq, 7);
        assert!(open_archive(&ring, &archive_key(8, &id), &value).is_err());
    }

    #[test]
    fn keys_do_not_collide_across_id_boundaries() {
        let a = device_key(&DeviceRef::new("ab", "c"));
        let b = device_key(&DeviceRef::new("a", "bc"));
        assert_ne!(a, b);
        assert!(
            !inbox_key(&DeviceRef::new("a", "b"), 1)
                .starts_with(&device_key(&DeviceRef::new("a", "bb")))
        );
    }
}
