//! The upgrade request's token: where it is found (header or subprotocol), what it claims before
//! any check, and the verifier, both on raw text and on tokens signed with a key it trusts
//! carrying any claims. Nothing panics; only tokens that satisfy every rule are accepted.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use libfuzzer_sys::fuzz_target;
use relay::auth::{self, Claims, Minter, Verifier};
use relay::protocol::valid_id;

const LEEWAY: u64 = 60;
const MAX_LIFETIME: u64 = 30 * 86_400;

#[derive(Arbitrary, Debug)]
enum Input {
    /// Header values as a client may send them.
    Headers {
        authorization: Option<Vec<u8>>,
        protocols: Vec<Vec<u8>>,
    },
    /// A token in text.
    Text(String),
    /// A token we signed, with these claims (times relative to now, in seconds).
    Signed {
        sub: String,
        dev: String,
        org: Option<String>,
        iat: i64,
        exp: i64,
        nbf: Option<i64>,
        sep: u64,
        urgent: bool,
        aud_ok: bool,
    },
}

fn keys() -> &'static (Minter, Verifier) {
    static KEYS: OnceLock<(Minter, Verifier)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = auth::generate_ed25519().expect("key");
        let minter = Minter::from_pem(&key.private_pem).expect("minter");
        let verifier =
            Verifier::new(&key.public_pem, "relay", LEEWAY, MAX_LIFETIME).expect("verifier");
        (minter, verifier)
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn at(now: u64, delta: i64) -> u64 {
    now.saturating_add_signed(delta)
}

fuzz_target!(|input: Input| {
    let (minter, verifier) = keys();
    match input {
        Input::Headers {
            authorization,
            protocols,
        } => {
            let mut headers = HeaderMap::new();
            if let Some(v) = authorization.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
                headers.insert(AUTHORIZATION, v);
            }
            for p in protocols.iter().take(8) {
                if let Ok(v) = HeaderValue::from_bytes(p) {
                    headers.append(SEC_WEBSOCKET_PROTOCOL, v);
                }
            }
            let _ = auth::offers_subprotocol(&headers);
            if let Ok((token, _)) = auth::token_from_headers(&headers) {
                let _ = auth::claimed(token);
                assert!(verifier.verify(token).is_err(), "an unsigned token passed");
            }
        }
        Input::Text(token) => {
            let (user, device) = auth::claimed(&token);
            assert!(user.iter().chain(&device).all(|id| valid_id(id)));
            assert!(verifier.verify(&token).is_err(), "an unsigned token passed");
        }
        Input::Signed {
            sub,
            dev,
            org,
            iat,
            exp,
            nbf,
            sep,
            urgent,
            aud_ok,
        } => {
            let now = now();
            let claims = Claims {
                sub,
                dev,
                org,
                iat: at(now, iat),
                exp: at(now, exp),
                nbf: nbf.map(|n| at(now, n)),
                sep,
                urgent,
                aud: if aud_ok {
                    "relay".into()
                } else {
                    "elsewhere".into()
                },
            };
            let Ok(token) = minter.mint(&claims) else {
                return;
            };
            if let Ok(id) = verifier.verify(&token) {
                assert!(aud_ok, "wrong audience accepted");
                assert!(valid_id(&claims.sub) && valid_id(&claims.dev));
                assert!(claims.org.as_deref().is_none_or(valid_id));
                assert!(
                    claims.exp.saturating_add(LEEWAY) + 1 >= now,
                    "expired token accepted"
                );
                // Only the issuer skew for `iat`: more would let a token outlive a logout.
                assert!(
                    claims.iat <= now + relay::access::ISSUER_SKEW_S + 1,
                    "token from the future accepted"
                );
                assert!(
                    claims.exp.saturating_sub(claims.iat) <= MAX_LIFETIME,
                    "lifetime over the maximum"
                );
                assert_eq!(
                    (id.issued_at, id.expires_at, id.epoch, id.may_page),
                    (claims.iat, claims.exp, sep, urgent)
                );
            }
        }
    }
});
