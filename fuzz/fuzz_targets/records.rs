//! Rows as read back from the store (embedded or ScyllaDB): raw bytes against every reader (the
//! seal must refuse them), and authentic seals around arbitrary plaintext (the record parsers
//! behind the seal must refuse what they cannot read, not panic). Also the at-rest key spec.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay::seal::Keyring;
use relay::store::pseudonym::Pseudonyms;
use relay::store::{DeviceRef, record, rows};

#[derive(Arbitrary, Debug)]
enum Input {
    /// A row as found: its key and value, and which table it claims to be from.
    Raw {
        table: u8,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// An archive row sealed by us around any plaintext.
    SealedArchive {
        seq: u64,
        id: [u8; 16],
        plain: Vec<u8>,
    },
    /// A store-metadata row sealed by us around any plaintext.
    SealedRow {
        table: u8,
        key: Vec<u8>,
        plain: Vec<u8>,
    },
    /// An at-rest key specification (`id:base64,...`) and the active id.
    KeySpec(String, String),
}

fn keys() -> &'static (Keyring, Pseudonyms) {
    static KEYS: OnceLock<(Keyring, Pseudonyms)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ring =
            Keyring::parse(&format!("k:{}", Keyring::generate_key_b64()), "k").expect("ring");
        let (ids, _) = Pseudonyms::generate(&ring).expect("ids");
        (ring, ids)
    })
}

const TABLES: [&[u8]; 6] = [
    b"devices",
    b"pending",
    b"org_users",
    b"access",
    b"audit",
    b"ids",
];

fuzz_target!(|input: Input| {
    let (ring, ids) = keys();
    match input {
        Input::Raw { table, key, value } => {
            let _ = record::inbox_key_seq(&key);
            let _ = record::parse_idempotency_value(&value);
            let _ = Keyring::sealed_key_id(&value);
            let opened = match table % 10 {
                0 => record::open_inbox(ring, &key, &value).is_ok(),
                1 => record::open_archive(ring, &key, &value).is_ok(),
                2 => record::open_push_token(ring, &key, &value).is_ok(),
                3 => rows::open_device_value(ids, &key, &value).is_some(),
                4 => rows::open_pending_value(ids, &key, &value).is_some(),
                5 => rows::open_org_user_value(ids, &key, &value).is_some(),
                6 => rows::open_access_value(ids, &key, &value).is_ok(),
                7 => rows::open_ids(ids, b"devices", &key, &value).is_some(),
                8 => rows::open_audit(ids, &key, &value).is_some(),
                _ => {
                    let _ = rows::audit_head(&key, &value);
                    let _ = rows::audit_record(ids, &key, &value);
                    false
                }
            };
            assert!(!opened, "a forged row opened");
        }
        Input::SealedArchive { seq, id, plain } => {
            let key = record::archive_key(seq, &uuid::Uuid::from_bytes(id));
            let mut aad = b"archive|".to_vec();
            aad.extend_from_slice(&key);
            let sealed = ring.seal(&aad, &plain);
            if let Ok(m) = record::open_archive(ring, &key, &sealed) {
                assert_eq!((m.entry.seq, m.entry.id), (seq, uuid::Uuid::from_bytes(id)));
            }
            // A real record round-trips.
            let from = DeviceRef::new("alice", "phone");
            let to = vec!["bob".to_string()];
            let rec = record::Record {
                ts: seq,
                urgent: seq % 2 == 0,
                from: &from,
                to: &to,
                body: &plain,
            };
            let m = record::open_archive(ring, &key, &record::seal_archive(ring, &key, &rec))
                .expect("round trip");
            assert_eq!(
                (&m.entry.from, &m.to, &m.entry.body[..]),
                (&from, &to, &plain[..])
            );
        }
        Input::SealedRow { table, key, plain } => {
            let table = TABLES[table as usize % TABLES.len()];
            let mut aad = table.to_vec();
            aad.push(b'|');
            aad.extend_from_slice(&key);
            let sealed = ids.seal(&aad, &plain);
            match table {
                b"devices" => drop(rows::open_device_value(ids, &key, &sealed)),
                b"pending" => drop(rows::open_pending_value(ids, &key, &sealed)),
                b"org_users" => drop(rows::open_org_user_value(ids, &key, &sealed)),
                b"access" => drop(rows::open_access_value(ids, &key, &sealed)),
                b"audit" => drop(rows::open_audit(ids, &key, &sealed)),
                _ => drop(rows::open_ids(ids, b"ids", &key, &sealed)),
            }
        }
        Input::KeySpec(spec, active) => {
            let _ = relay::seal::parse_keys(&spec);
            if let Ok(ring) = Keyring::parse(&spec, &active) {
                let sealed = ring.seal(b"aad", b"plain");
                assert_eq!(ring.open(b"aad", &sealed).expect("opens"), b"plain");
            }
        }
    }
});
