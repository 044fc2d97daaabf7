//! Encryption at rest: AES-256-GCM under a keyring of master keys.
//!
//! Every payload a store writes is sealed here first, so neither backend ever holds ciphertext
//! the relay could not authenticate, nor a key.
//!
//! Nonce safety: each process start draws a random 128-bit salt and derives, per master key, a
//! sub-key `HKDF-SHA256(master, salt)`. Nonces are a 96-bit counter under that sub-key, so a
//! (key, nonce) pair never repeats within a run, and runs never share a sub-key (the salt is
//! random). This avoids the 2^32-message bound of random 96-bit nonces, which a busy relay would
//! reach within a day.
//!
//! Sealed layout: `version(1) | kid_len(1) | kid | salt(16) | nonce(12) | ciphertext+tag`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hkdf::Hkdf;
use sha2::Sha256;

const VERSION: u8 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const HKDF_INFO: &[u8] = b"relay at-rest v1";
/// Sub-keys of earlier runs kept ready for reads; more are derived on demand.
const CACHE_LIMIT: usize = 64;

/// Errors of the keyring.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The keyring configuration is unusable.
    #[error("at-rest keyring: {0}")]
    Config(String),
    /// The sealed blob names a key id the keyring does not hold.
    #[error("sealed with unknown key id")]
    UnknownKey,
    /// Truncated, edited, swapped or sealed under other associated data.
    #[error("sealed data failed authentication")]
    Tampered,
}

/// The at-rest keyring: one active key for writes, every listed key readable.
pub struct Keyring {
    keys: HashMap<String, [u8; 32]>,
    active_id: String,
    salt: [u8; SALT_LEN],
    active: Aes256Gcm,
    counter: AtomicU64,
    older: Mutex<HashMap<(String, [u8; SALT_LEN]), Aes256Gcm>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keyring")
            .field("active_id", &self.active_id)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Parses `kid:base64key` entries separated by commas or newlines (the form of key lists in
/// config files, environment variables and keys files) into 32-byte keys.
pub fn parse_keys(spec: &str) -> Result<HashMap<String, [u8; 32]>, SealError> {
    let mut keys = HashMap::new();
    for entry in spec
        .split([',', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let (kid, b64) = entry
            .split_once(':')
            .ok_or_else(|| SealError::Config("entries must be `kid:base64key`".into()))?;
        if kid.is_empty() || kid.len() > 32 || !kid.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SealError::Config(
                "key ids are 1-32 printable characters".into(),
            ));
        }
        let raw = B64
            .decode(b64.trim())
            .map_err(|_| SealError::Config(format!("key `{kid}` is not base64")))?;
        let key: [u8; 32] = raw
            .try_into()
            .map_err(|_| SealError::Config(format!("key `{kid}` is not 32 bytes")))?;
        if keys.insert(kid.to_string(), key).is_some() {
            return Err(SealError::Config(format!("key id `{kid}` appears twice")));
        }
    }
    Ok(keys)
}

impl Keyring {
    /// Builds a keyring from `kid:base64` entries separated by commas (the form used in config and
    /// environment variables) and the id of the key that seals new data.
    pub fn parse(spec: &str, active_id: &str) -> Result<Self, SealError> {
        Self::new(parse_keys(spec)?, active_id)
    }

    /// Builds a keyring from raw keys.
    pub fn new(keys: HashMap<String, [u8; 32]>, active_id: &str) -> Result<Self, SealError> {
        let master = keys
            .get(active_id)
            .ok_or_else(|| SealError::Config(format!("active key `{active_id}` is not listed")))?;
        let mut salt = [0u8; SALT_LEN];
        aws_lc_rs::rand::fill(&mut salt)
            .map_err(|_| SealError::Config("no system randomness".into()))?;
        let active = derive(master, &salt);
        Ok(Keyring {
            active_id: active_id.to_string(),
            keys,
            salt,
            active,
            counter: AtomicU64::new(0),
            older: Mutex::new(HashMap::new()),
        })
    }

    /// A fresh random key, base64, for `relay keygen` and dev mode.
    pub fn generate_key_b64() -> String {
        let mut key = [0u8; 32];
        // aws-lc's RNG only fails if the OS has no entropy source at all.
        aws_lc_rs::rand::fill(&mut key).expect("system randomness");
        B64.encode(key)
    }

    /// Id of the key that sealed `sealed`, if it has the sealed layout.
    pub fn sealed_key_id(sealed: &[u8]) -> Option<&str> {
        let (&len, rest) = sealed.get(1..)?.split_first()?;
        std::str::from_utf8(rest.get(..len as usize)?).ok()
    }

    /// Id of the key that seals new data.
    pub fn active_id(&self) -> &str {
        &self.active_id
    }

    /// Ids of every key this keyring can open, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids.into_iter()
    }

    /// Whether this keyring can open data sealed with key `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// Seals `plaintext`, binding it to `aad` (which is not stored).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let kid = self.active_id.as_bytes();
        let mut out =
            Vec::with_capacity(2 + kid.len() + SALT_LEN + NONCE_LEN + plaintext.len() + 16);
        out.push(VERSION);
        out.push(kid.len() as u8);
        out.extend_from_slice(kid);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&nonce);
        // Encryption with a valid key and a buffer in memory cannot fail.
        let ct = self
            .active
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption");
        out.extend_from_slice(&ct);
        out
    }

    /// Opens data sealed by any key of the ring under the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Tampered)?;
        let (&kid_len, rest) = rest.split_first().ok_or(SealError::Tampered)?;
        if version != VERSION || rest.len() < kid_len as usize + SALT_LEN + NONCE_LEN + 16 {
            return Err(SealError::Tampered);
        }
        let (kid, rest) = rest.split_at(kid_len as usize);
        let (salt, rest) = rest.split_at(SALT_LEN);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let kid = std::str::from_utf8(kid).map_err(|_| SealError::Tampered)?;
        let salt: [u8; SALT_LEN] = salt.try_into().map_err(|_| SealError::Tampered)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Tampered)?;
        let payload = Payload { msg: ct, aad };
        if kid == self.active_id && salt == self.salt {
            return self
                .active
                .decrypt(&Nonce::from(nonce), payload)
                .map_err(|_| SealError::Tampered);
        }
        let master = self.keys.get(kid).ok_or(SealError::UnknownKey)?;
        let mut older = self.older.lock().unwrap_or_else(|e| e.into_inner());
        if older.len() >= CACHE_LIMIT {
            older.clear();
        }
        let cipher = older
            .entry((kid.to_string(), salt))
            .or_insert_with(|| derive(master, &salt));
        cipher
            .decrypt(&Nonce::from(nonce), payload)
            .map_err(|_| SealError::Tampered)
    }
}

fn derive(master: &[u8; 32], salt: &[u8; SALT_LEN]) -> Aes256Gcm {
    let hk = Hkdf::<Sha256>::new(Some(salt), master);
    let mut okm = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
    hk.expand(HKDF_INFO, &mut okm).expect("HKDF length");
    Aes256Gcm::new(&okm.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str, active: &str) -> Keyring {
        Keyring::parse(spec, active).expect("keyring")
    }

    #[test]
    fn round_trip_and_aad_binding() {
        let k = format!("k1:{}", Keyring::generate_key_b64());
        let r = ring(&k, "k1");
        let sealed = r.seal(b"msg-1|dev-a", b"secret body");
        assert_eq!(
            r.open(b"msg-1|dev-a", &sealed).expect("open"),
            b"secret body"
        );
        assert!(matches!(
            r.open(b"msg-1|dev-b", &sealed),
            Err(SealError::Tampered)
        ));
        let mut edited = sealed.clone();
        let last = edited.len() - 1;
        edited[last] ^= 1;
        assert!(matches!(
            r.open(b"msg-1|dev-a", &edited),
            Err(SealError::Tampered)
        ));
        assert!(r.open(b"msg-1|dev-a", &sealed[..10]).is_err());
    }

    #[test]
    fn a_keys_file_lists_one_key_per_line_or_separates_them_with_commas() {
        let (a, b) = (Keyring::generate_key_b64(), Keyring::generate_key_b64());
        let r = ring(&format!("k1:{a}\nk2:{b}\n"), "k2");
        assert_eq!(r.key_ids().collect::<Vec<_>>(), ["k1", "k2"]);
        assert!(r.holds("k1") && !r.holds("k3"));
        let r = ring(&format!("k1:{a}, k2:{b}"), "k1");
        assert_eq!(r.active_id(), "k1");
    }

    #[test]
    fn nonces_never_repeat_within_a_run() {
        let r = ring(&format!("k1:{}", Keyring::generate_key_b64()), "k1");
        let a = r.seal(b"", b"x");
        let b = r.seal(b"", b"x");
        assert_ne!(a, b);
    }

    #[test]
    fn rotation_keeps_old_data_readable() {
        let k1 = format!("k1:{}", Keyring::generate_key_b64());
        let old = ring(&k1, "k1");
        let sealed = old.seal(b"aad", b"before rotation");
        let both = format!("{k1},k2:{}", Keyring::generate_key_b64());
        let new = ring(&both, "k2");
        assert_eq!(
            new.open(b"aad", &sealed).expect("old key"),
            b"before rotation"
        );
        let fresh = new.seal(b"aad", b"after");
        assert_eq!(new.open(b"aad", &fresh).expect("new key"), b"after");
        // A ring that dropped k1 cannot read k1 data.
        let only_k2 = ring(both.split(',').nth(1).expect("k2"), "k2");
        assert!(matches!(
            only_k2.open(b"aad", &sealed),
            Err(SealError::UnknownKey)
        ));
    }

    #[test]
    fn rejects_bad_config() {
        assert!(Keyring::parse("k1:abc", "k1").is_err());
        assert!(Keyring::parse("nocolon", "k1").is_err());
        let k = format!("k1:{}", Keyring::generate_key_b64());
        assert!(Keyring::parse(&k, "k2").is_err());
        assert!(Keyring::parse(&format!("{k},{k}"), "k1").is_err());
    }
}
