//! Pseudonyms: what the stores write in place of a user, device, organisation, sender/message
//! pair or audit subject wherever an id would be part of a row's key, so a database dump or a
//! stolen backup does not tell who messaged whom (the ids themselves, where a store must list
//! them, are in sealed values).
//!
//! A pseudonym is HMAC-SHA256 under the store's ids key, truncated to 128 bits, over a domain
//! tag and the length-prefixed ids. The same key (through its own keyring, with the at-rest
//! keyring's nonce discipline) seals the ids the store keeps in values, so those rows do not
//! depend on which at-rest keys are configured: removing an old at-rest key affects only the
//! messages it sealed. The ids key is random, made by the first node that opens the store, and
//! kept in the store only sealed with the at-rest keyring (envelope encryption): the secret that
//! protects it is the at-rest key, held outside the database. It never rotates (a new key would
//! rename every row); the at-rest key that wraps it does, and each node re-seals it with its
//! active key when it opens the store.

use aws_lc_rs::hmac;
use base64::Engine as _;
use uuid::Uuid;

use super::DeviceRef;
use super::record::push_id;
use crate::seal::{Keyring, SealError};

/// Bytes of one pseudonym.
pub const LEN: usize = 16;

/// Associated data of the sealed ids key.
const WRAP_AAD: &[u8] = b"ids-key|v1";

/// The keyed hash that turns ids into pseudonyms.
pub struct Pseudonyms {
    key: hmac::Key,
    sealer: Keyring,
}

impl Pseudonyms {
    /// A fresh ids key, sealed with the keyring's active key for storing.
    pub fn generate(keyring: &Keyring) -> Result<(Self, Vec<u8>), SealError> {
        let mut raw = [0u8; 32];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| SealError::Config("no system randomness".into()))?;
        Ok((Self::from_raw(&raw)?, keyring.seal(WRAP_AAD, &raw)))
    }

    /// The ids key from its sealed form, and the same key sealed with the active at-rest key
    /// when another key sealed it (the caller stores it, so old at-rest keys can retire).
    pub fn unwrap(keyring: &Keyring, sealed: &[u8]) -> Result<(Self, Option<Vec<u8>>), SealError> {
        let raw = keyring.open(WRAP_AAD, sealed)?;
        if raw.len() != 32 {
            return Err(SealError::Tampered);
        }
        let reseal = (Keyring::sealed_key_id(sealed) != Some(keyring.active_id()))
            .then(|| keyring.seal(WRAP_AAD, &raw));
        Ok((Self::from_raw(&raw)?, reseal))
    }

    /// Why a store refuses to open: its ids key is missing while it holds rows keyed by it, or
    /// it does not open with the configured keys. Never a fresh key over existing rows: they
    /// would all look absent, revocations included.
    pub fn refusal(problem: &str) -> super::StoreError {
        super::StoreError::Refused(format!(
            "the store's ids key {problem}: configure the at-rest keys it was sealed with"
        ))
    }

    fn from_raw(raw: &[u8]) -> Result<Self, SealError> {
        // The sealing key is derived, so no key is used both for HMAC and for AES-GCM.
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, raw), b"ids-key|seal");
        let b64 = base64::engine::general_purpose::STANDARD.encode(derived.as_ref());
        Ok(Pseudonyms {
            key: hmac::Key::new(hmac::HMAC_SHA256, raw),
            sealer: Keyring::parse(&format!("ids:{b64}"), "ids")?,
        })
    }

    /// Seals ids kept in a value (the associated data names the row).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        self.sealer.seal(aad, plain)
    }

    /// Opens what [`Pseudonyms::seal`] sealed.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        self.sealer.open(aad, sealed)
    }

    fn hash(&self, domain: &[u8], ids: &[&str]) -> [u8; LEN] {
        let mut buf =
            Vec::with_capacity(domain.len() + 1 + ids.iter().map(|i| i.len() + 1).sum::<usize>());
        push_id(&mut buf, std::str::from_utf8(domain).unwrap_or_default());
        for id in ids {
            push_id(&mut buf, id);
        }
        let tag = hmac::sign(&self.key, &buf);
        let mut out = [0u8; LEN];
        out.copy_from_slice(&tag.as_ref()[..LEN]);
        out
    }

    /// A user.
    pub fn user(&self, user: &str) -> [u8; LEN] {
        self.hash(b"user", &[user])
    }

    /// A device: its user's pseudonym, then its own, so a user's devices share a key prefix.
    pub fn device(&self, d: &DeviceRef) -> [u8; 2 * LEN] {
        let mut out = [0u8; 2 * LEN];
        out[..LEN].copy_from_slice(&self.user(&d.user));
        out[LEN..].copy_from_slice(&self.hash(b"device", &[&d.user, &d.device]));
        out
    }

    /// An organisation.
    pub fn org(&self, org: &str) -> [u8; LEN] {
        self.hash(b"org", &[org])
    }

    /// A message id under its sender (the idempotency key).
    pub fn message(&self, sender: &str, id: &Uuid) -> [u8; LEN] {
        self.hash(b"message", &[sender, &id.simple().to_string()])
    }

    /// An audit subject (a user id, `#anon` or `#org/<org>`).
    pub fn subject(&self, subject: &str) -> [u8; LEN] {
        self.hash(b"audit", &[subject])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(active: &str, spec: &str) -> Keyring {
        Keyring::parse(spec, active).expect("keyring")
    }

    #[test]
    fn pseudonyms_are_stable_distinct_and_keyed() {
        let k1 = format!("k1:{}", Keyring::generate_key_b64());
        let ring = keyring("k1", &k1);
        let (p, sealed) = Pseudonyms::generate(&ring).expect("generate");
        let (again, _) = Pseudonyms::unwrap(&ring, &sealed).expect("unwrap");
        assert_eq!(p.user("alice"), again.user("alice"));
        assert_ne!(p.user("alice"), p.user("bob"));
        // Domains and id boundaries keep pseudonyms apart.
        assert_ne!(p.user("alice"), p.subject("alice"));
        let a = p.device(&DeviceRef::new("ab", "c"));
        let b = p.device(&DeviceRef::new("a", "bc"));
        assert_ne!(a, b);
        assert_eq!(a[..LEN], p.user("ab"));
        // Another store's key gives other pseudonyms.
        let (other, _) = Pseudonyms::generate(&ring).expect("generate");
        assert_ne!(p.user("alice"), other.user("alice"));
    }

    #[test]
    fn the_ids_key_follows_the_at_rest_key_rotation() {
        let k1 = format!("k1:{}", Keyring::generate_key_b64());
        let k2 = format!("k2:{}", Keyring::generate_key_b64());
        let (p, sealed_k1) = Pseudonyms::generate(&keyring("k1", &k1)).expect("generate");
        // After the rotation it is re-sealed with k2, and k1 is no longer needed for it.
        let (_, sealed_k2) =
            Pseudonyms::unwrap(&keyring("k2", &format!("{k1},{k2}")), &sealed_k1).expect("unwrap");
        let sealed_k2 = sealed_k2.expect("re-sealed with the active key");
        // Sealed with the active key already: nothing to store again.
        assert!(
            Pseudonyms::unwrap(&keyring("k2", &k2), &sealed_k2)
                .expect("unwrap")
                .1
                .is_none()
        );
        let (q, _) = Pseudonyms::unwrap(&keyring("k2", &k2), &sealed_k2).expect("unwrap");
        assert_eq!(p.user("alice"), q.user("alice"));
        assert!(Pseudonyms::unwrap(&keyring("k2", &k2), &sealed_k1).is_err());
    }
}
