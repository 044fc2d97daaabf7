//! Bus messages between relay nodes: the seal refuses what no node of ours sealed, and the
//! decoders behind it refuse what they cannot read; a decoded delivery encodes back the same.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay::cluster::wire::{self, Control, Delivery};
use relay::seal::Keyring;

#[derive(Arbitrary, Debug)]
enum Input {
    /// A publication as received on a subject.
    Sealed { subject: String, payload: Vec<u8> },
    /// What a node of ours could have sealed: any delivery bytes.
    Delivery(Vec<u8>),
    /// Any control message text.
    Control(Vec<u8>),
}

fn ring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| {
        Keyring::parse(&format!("k:{}", Keyring::generate_key_b64()), "k").expect("ring")
    })
}

fuzz_target!(|input: Input| {
    match input {
        Input::Sealed { subject, payload } => {
            assert!(
                wire::open(ring(), &subject, &payload).is_none(),
                "a forged publication opened"
            );
        }
        Input::Delivery(bytes) => {
            if let Some(d) = Delivery::decode(&bytes) {
                let again = Delivery::decode(&d.encode()).expect("re-decodes");
                assert_eq!(again.encode(), d.encode());
            }
        }
        Input::Control(bytes) => {
            if let Ok(c) = serde_json::from_slice::<Control>(&bytes) {
                let text = serde_json::to_vec(&c).expect("encodes");
                assert!(serde_json::from_slice::<Control>(&text).is_ok());
            }
        }
    }
});
