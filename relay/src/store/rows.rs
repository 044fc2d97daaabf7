//! The embedded store's rows (layout 2): keys made of pseudonyms (`pseudonym.rs`), never of
//! ids, and values that seal whatever ids the store must list again (a user's devices, an
//! organisation's users, pending logouts, audit subjects and entries). A sealed value's
//! associated data names its table and its key, so a value copied under another key does not
//! open.
//!
//! Message records keep their own associated data (`record.rs`): the clear ids of the row,
//! computed by the reader, so moving a row between layouts needs no re-sealing.

use uuid::Uuid;

use super::DeviceRef;
use super::pseudonym::{LEN, Pseudonyms};
use super::record::{push_id, take_id, take_u64};
use crate::access::model::AccessRow;
use crate::audit::model::{Chain, Record};
use crate::seal::SealError;

fn aad(table: &[u8], key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(table.len() + 1 + key.len());
    aad.extend_from_slice(table);
    aad.push(b'|');
    aad.extend_from_slice(key);
    aad
}

fn id_list(list: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for id in list {
        push_id(&mut out, id);
    }
    out
}

fn open_device(ids: &Pseudonyms, table: &[u8], key: &[u8], sealed: &[u8]) -> Option<DeviceRef> {
    let plain = ids.open(&aad(table, key), sealed).ok()?;
    let mut buf = plain.as_slice();
    let user = take_id(&mut buf)?;
    let device = take_id(&mut buf)?;
    Some(DeviceRef::new(user, device))
}

/// Seals ids for a value of `table` under `key` (both backends).
pub fn seal_ids(ids: &Pseudonyms, table: &[u8], key: &[u8], list: &[&str]) -> Vec<u8> {
    ids.seal(&aad(table, key), &id_list(list))
}

/// Opens what [`seal_ids`] sealed.
pub fn open_ids(ids: &Pseudonyms, table: &[u8], key: &[u8], sealed: &[u8]) -> Option<Vec<String>> {
    let plain = ids.open(&aad(table, key), sealed).ok()?;
    let mut buf = plain.as_slice();
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(take_id(&mut buf)?.to_string());
    }
    Some(out)
}

/// Seals an audit record's subject and entry (both backends).
pub fn seal_audit(ids: &Pseudonyms, key: &[u8], subject: &str, entry: &str) -> Vec<u8> {
    let mut plain = id_list(&[subject]);
    plain.extend_from_slice(entry.as_bytes());
    ids.seal(&aad(b"audit", key), &plain)
}

/// Opens what [`seal_audit`] sealed: the subject and the entry.
pub fn open_audit(ids: &Pseudonyms, key: &[u8], sealed: &[u8]) -> Option<(String, String)> {
    let plain = ids.open(&aad(b"audit", key), sealed).ok()?;
    let mut buf = plain.as_slice();
    let subject = take_id(&mut buf)?.to_string();
    Some((subject, String::from_utf8(buf.to_vec()).ok()?))
}

/// `user | device` pseudonyms: key of a device's rows (devices, push tokens, access, pending
/// logouts) and prefix of its inbox.
pub fn device_key(p: &Pseudonyms, d: &DeviceRef) -> [u8; 2 * LEN] {
    p.device(d)
}

/// Prefix of a user's device rows.
pub fn user_prefix(p: &Pseudonyms, user: &str) -> [u8; LEN] {
    p.user(user)
}

/// `device | seq`.
pub fn inbox_key(p: &Pseudonyms, d: &DeviceRef, seq: u64) -> Vec<u8> {
    inbox_key_under(&p.device(d), seq)
}

/// `device | seq`, the device's [`device_key`] already at hand.
pub fn inbox_key_under(device: &[u8; 2 * LEN], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 8);
    k.extend_from_slice(device);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The idempotency key of a sender's message id.
pub fn idempotency_key(p: &Pseudonyms, sender: &str, id: &Uuid) -> [u8; LEN] {
    p.message(sender, id)
}

/// Value of a device row: `registered_at | sealed(user, device)`.
pub fn device_value(ids: &Pseudonyms, key: &[u8], d: &DeviceRef, registered_at: u64) -> Vec<u8> {
    let mut v = registered_at.to_be_bytes().to_vec();
    v.extend_from_slice(&ids.seal(&aad(b"devices", key), &id_list(&[&d.user, &d.device])));
    v
}

/// The device of a device row.
pub fn open_device_value(ids: &Pseudonyms, key: &[u8], value: &[u8]) -> Option<DeviceRef> {
    open_device(ids, b"devices", key, value.get(8..)?)
}

/// Value of a pending-logout row: `requested_at | sealed(user, device)`.
pub fn pending_value(ids: &Pseudonyms, key: &[u8], d: &DeviceRef, at: u64) -> Vec<u8> {
    let mut v = at.to_be_bytes().to_vec();
    v.extend_from_slice(&ids.seal(
        &aad(b"pending_logouts", key),
        &id_list(&[&d.user, &d.device]),
    ));
    v
}

/// A pending-logout row: the device and when its logout was requested.
pub fn open_pending_value(ids: &Pseudonyms, key: &[u8], value: &[u8]) -> Option<(DeviceRef, u64)> {
    let at = u64::from_be_bytes(*value.first_chunk::<8>()?);
    Some((open_device(ids, b"pending_logouts", key, &value[8..])?, at))
}

/// `org | user` pseudonyms.
pub fn org_user_key(p: &Pseudonyms, org: &str, user: &str) -> [u8; 2 * LEN] {
    let mut k = [0u8; 2 * LEN];
    k[..LEN].copy_from_slice(&p.org(org));
    k[LEN..].copy_from_slice(&p.user(user));
    k
}

/// Prefix of an organisation's users.
pub fn org_prefix(p: &Pseudonyms, org: &str) -> [u8; LEN] {
    p.org(org)
}

/// Value of an org-user row: the user id, sealed.
pub fn org_user_value(ids: &Pseudonyms, key: &[u8], user: &str) -> Vec<u8> {
    ids.seal(&aad(b"org_users", key), &id_list(&[user]))
}

/// The user of an org-user row.
pub fn open_org_user_value(ids: &Pseudonyms, key: &[u8], value: &[u8]) -> Option<String> {
    let plain = ids.open(&aad(b"org_users", key), value).ok()?;
    let mut buf = plain.as_slice();
    take_id(&mut buf).map(str::to_string)
}

/// Value of an access row: `sealed(device id | row as JSON)`.
pub fn access_value(ids: &Pseudonyms, key: &[u8], device: &str, row: &AccessRow) -> Vec<u8> {
    let mut plain = id_list(&[device]);
    plain.extend_from_slice(&serde_json::to_vec(row).unwrap_or_default());
    ids.seal(&aad(b"access", key), &plain)
}

/// An access row: its device id ("" for the user row) and the row.
pub fn open_access_value(
    ids: &Pseudonyms,
    key: &[u8],
    value: &[u8],
) -> Result<(String, AccessRow), SealError> {
    let plain = ids.open(&aad(b"access", key), value)?;
    let mut buf = plain.as_slice();
    let device = take_id(&mut buf).ok_or(SealError::Tampered)?.to_string();
    let row = serde_json::from_slice(buf).map_err(|_| SealError::Tampered)?;
    Ok((device, row))
}

/// `subject | month`: prefix of one audit partition.
pub fn audit_partition_prefix(p: &Pseudonyms, subject: &str, month: u32) -> Vec<u8> {
    let mut k = p.subject(subject).to_vec();
    k.extend_from_slice(&month.to_be_bytes());
    k
}

/// Bytes of an audit partition prefix.
pub const AUDIT_PARTITION_LEN: usize = LEN + 4;

/// `subject | month | node`: prefix of one audit chain.
pub fn audit_chain_prefix(p: &Pseudonyms, c: &Chain) -> Vec<u8> {
    let mut k = audit_partition_prefix(p, &c.subject, c.month);
    k.push(c.node);
    k
}

/// `subject | month | node | n`.
pub fn audit_key(p: &Pseudonyms, c: &Chain, n: u64) -> Vec<u8> {
    let mut k = audit_chain_prefix(p, c);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// `ts | prev | hash | key id length | key id | sealed(subject | entry)`: the chain's fields
/// stay readable (tails, expiry) while the subject and the entry, which name users and devices,
/// are sealed.
pub fn audit_value(ids: &Pseudonyms, key: &[u8], r: &Record) -> Vec<u8> {
    let mut plain = id_list(&[&r.chain.subject]);
    plain.extend_from_slice(r.entry.as_bytes());
    let mut v = Vec::with_capacity(74 + r.key_id.len() + plain.len() + 48);
    v.extend_from_slice(&r.ts.to_be_bytes());
    v.extend_from_slice(&r.prev);
    v.extend_from_slice(&r.hash);
    v.push(r.key_id.len() as u8);
    v.extend_from_slice(r.key_id.as_bytes());
    v.extend_from_slice(&ids.seal(&aad(b"audit", key), &plain));
    v
}

/// `(n, hash)` of an audit row, without opening it.
pub fn audit_head(key: &[u8], value: &[u8]) -> Option<(u64, [u8; 32])> {
    let n = u64::from_be_bytes(*key.last_chunk::<8>()?);
    let hash = value.get(40..72)?.try_into().ok()?;
    Some((n, hash))
}

/// Reads an audit row back. A row whose seal does not open comes back with an empty entry (and
/// a placeholder subject if it cannot be known), so verification reports it instead of
/// skipping it.
pub fn audit_record(ids: &Pseudonyms, key: &[u8], value: &[u8]) -> Option<Record> {
    let (head, mut k) = key.split_at_checked(LEN)?;
    let (month, rest) = k.split_first_chunk::<4>()?;
    k = rest;
    let (&node, mut k) = k.split_first()?;
    let n = take_u64(&mut k)?;
    let mut v = value;
    let ts = take_u64(&mut v)?;
    let (prev, v) = v.split_first_chunk::<32>()?;
    let (hash, v) = v.split_first_chunk::<32>()?;
    let (&kid_len, v) = v.split_first()?;
    let (key_id, sealed) = v.split_at_checked(kid_len as usize)?;
    let (subject, entry) = match ids.open(&aad(b"audit", key), sealed) {
        Ok(plain) => {
            let mut buf = plain.as_slice();
            let subject = take_id(&mut buf)?.to_string();
            (subject, String::from_utf8(buf.to_vec()).ok()?)
        }
        Err(_) => (format!("#unreadable/{}", hex(head)), String::new()),
    };
    Some(Record {
        chain: Chain {
            subject,
            month: u32::from_be_bytes(*month),
            node,
        },
        n,
        ts,
        entry,
        prev: *prev,
        hash: *hash,
        key_id: String::from_utf8(key_id.to_vec()).ok()?,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Pseudonyms {
        let spec = format!("k:{}", crate::seal::Keyring::generate_key_b64());
        let ring = crate::seal::Keyring::parse(&spec, "k").expect("ring");
        Pseudonyms::generate(&ring).expect("ids key").0
    }

    #[test]
    fn sealed_ids_round_trip_and_stay_bound_to_their_key() {
        let p = keys();
        let ring = &p;
        let d = DeviceRef::new("alice", "phone");
        let other = DeviceRef::new("bob", "phone");
        let key = device_key(&p, &d);
        let v = device_value(ring, &key, &d, 7);
        assert_eq!(open_device_value(ring, &key, &v), Some(d.clone()));
        assert_eq!(open_device_value(ring, &device_key(&p, &other), &v), None);
        let v = pending_value(ring, &key, &d, 9);
        assert_eq!(open_pending_value(ring, &key, &v), Some((d.clone(), 9)));
        // A value of one table does not open as another's.
        assert_eq!(open_device_value(ring, &key, &v), None);
        let ok = org_user_key(&p, "clinic", "alice");
        let v = org_user_value(ring, &ok, "alice");
        assert_eq!(open_org_user_value(ring, &ok, &v).as_deref(), Some("alice"));
        let row = AccessRow::default();
        let v = access_value(ring, &key, "phone", &row);
        assert_eq!(
            open_access_value(ring, &key, &v).expect("open"),
            ("phone".into(), row)
        );
        assert!(key.starts_with(&user_prefix(&p, "alice")));
        assert!(inbox_key(&p, &d, 3).starts_with(&key));
    }

    #[test]
    fn audit_rows_round_trip_and_an_edit_is_visible() {
        let p = keys();
        let ring = &p;
        let r = Record {
            chain: Chain {
                subject: "alice".into(),
                month: 24_300,
                node: 3,
            },
            n: 12,
            ts: 99,
            entry: r#"{"event":"connect","device":"phone"}"#.into(),
            prev: [1; 32],
            hash: [2; 32],
            key_id: "a1".into(),
        };
        let key = audit_key(&p, &r.chain, r.n);
        let mut value = audit_value(ring, &key, &r);
        assert_eq!(audit_record(ring, &key, &value), Some(r.clone()));
        assert_eq!(audit_head(&key, &value), Some((12, [2; 32])));
        assert!(key.starts_with(&audit_chain_prefix(&p, &r.chain)));
        let last = value.len() - 1;
        value[last] ^= 1;
        let edited = audit_record(ring, &key, &value).expect("still a record");
        assert!(edited.entry.is_empty() && edited.chain.subject.starts_with("#unreadable/"));
    }
}
