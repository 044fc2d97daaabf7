//! Sequences of client frames, well-formed and not, against the session state machine: no input
//! panics, and what it asks the driver to do stays within the session's limits.
#![no_main]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay::protocol::{MAX_ACKS_PER_FRAME, valid_id};
use relay::session::state::{Action, Limits, State};
use relay::store::{Accepted, DeviceRef};
use serde_json::{Value, json};

#[derive(Arbitrary, Debug)]
enum Frame {
    /// Any text at all.
    Raw(String),
    /// A `send` with fields that may be out of range.
    Send {
        id: Option<[u8; 16]>,
        to: Vec<String>,
        body: Body,
        urgent: Option<bool>,
        extra: Option<(String, u8)>,
    },
    /// An `ack` of numbers, some delivered, some not, some not integers.
    Ack(Vec<Seq>),
    Active,
    PushToken {
        platform: String,
        token: String,
        environment: String,
        app_id: String,
    },
    PushTokenRemove,
    LogoutAck(String),
    Binary,
    /// The relay delivers this sequence number to the session.
    Deliver(u64),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Base64(Vec<u8>),
    Text(String),
    Number(f64),
}

#[derive(Arbitrary, Debug)]
enum Seq {
    Delivered(u8),
    Any(u64),
    Negative(i64),
    Float(f64),
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Step {
    after_ms: u16,
    frame: Frame,
}

fn limits() -> Limits {
    Limits {
        max_body_bytes: 64,
        max_recipients: 3,
        send_rate_per_s: 5.0,
        send_burst: 10,
        max_errors_per_minute: 20,
        urgent_per_minute: 3,
        max_refused_per_minute: 20,
        inbound_bytes_per_s: 4096.0,
        inbound_burst_bytes: 16384.0,
        ping_interval: Duration::from_secs(25),
        idle_timeout: Duration::from_secs(7200),
        max_pipelined_sends: 4,
    }
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn render(frame: &Frame, delivered: &[u64]) -> Option<String> {
    let v = match frame {
        Frame::Raw(text) => return Some(text.clone()),
        Frame::Binary | Frame::Deliver(_) => return None,
        Frame::Send {
            id,
            to,
            body,
            urgent,
            extra,
        } => {
            let mut v = json!({ "type": "send", "to": to });
            if let Some(id) = id {
                v["id"] = json!(uuid::Uuid::from_bytes(*id).to_string());
            }
            v["body"] = match body {
                Body::Base64(b) => json!(base64(b)),
                Body::Text(t) => json!(t),
                Body::Number(n) => json!(n),
            };
            if let Some(u) = urgent {
                v["urgent"] = json!(u);
            }
            if let Some((k, n)) = extra {
                v[k.as_str()] = json!(n);
            }
            v
        }
        Frame::Ack(seqs) => {
            let seqs: Vec<Value> = seqs
                .iter()
                .map(|s| match s {
                    Seq::Delivered(i) if !delivered.is_empty() => {
                        json!(delivered[*i as usize % delivered.len()])
                    }
                    Seq::Delivered(i) => json!(i),
                    Seq::Any(n) => json!(n),
                    Seq::Negative(n) => json!(n),
                    Seq::Float(f) => json!(f),
                    Seq::Text(t) => json!(t),
                })
                .collect();
            json!({ "type": "ack", "seqs": seqs })
        }
        Frame::Active => json!({ "type": "active" }),
        Frame::PushToken {
            platform,
            token,
            environment,
            app_id,
        } => json!({
            "type": "push_token", "platform": platform, "token": token,
            "environment": environment, "app_id": app_id,
        }),
        Frame::PushTokenRemove => json!({ "type": "push_token_remove" }),
        Frame::LogoutAck(signal) => json!({ "type": "logout_ack", "signal": signal }),
    };
    Some(v.to_string())
}

fuzz_target!(|input: (bool, Vec<Step>)| {
    let (may_page, steps) = input;
    let device = DeviceRef::new("alice", "phone");
    let mut now = Instant::now();
    let mut s = State::new(
        device.clone(),
        Arc::new(limits()),
        now,
        now + Duration::from_secs(3600),
    );
    if may_page {
        s.allow_urgent();
    }
    // What the session was given and not yet acknowledged, as the model sees it.
    let mut unacked = BTreeSet::new();
    let mut delivered = Vec::new();
    let mut sent = std::collections::VecDeque::new();
    for step in steps.iter().take(200) {
        now += Duration::from_millis(step.after_ms.into());
        if let Frame::Deliver(seq) = step.frame {
            if s.advance(seq) {
                unacked.insert(seq);
                delivered.push(seq);
            }
            continue;
        }
        let action = match render(&step.frame, &delivered) {
            Some(text) => {
                let _ = s.inbound(now, text.len());
                s.handle_text(now, &text)
            }
            None => s.handle_binary(now),
        };
        match action {
            Action::Append(msg) => {
                assert_eq!(msg.from, device);
                assert!(
                    msg.body.len() <= limits().max_body_bytes,
                    "body over the limit"
                );
                assert!(
                    (1..=limits().max_recipients).contains(&msg.to.len()),
                    "{:?}",
                    msg.to
                );
                assert!(msg.to.iter().all(|u| valid_id(u)), "{:?}", msg.to);
                assert!(may_page || !msg.urgent, "urgent without the claim");
                // Handed to the store; at the pipeline limit, the oldest is answered first.
                s.appending(now, msg.id, msg.body.len() as u64);
                sent.push_back(msg.id);
                if !s.may_read() {
                    let oldest = sent.pop_front().expect("outstanding");
                    let accepted = Accepted {
                        seq: 1,
                        ts: 1,
                        duplicate: false,
                    };
                    let answer = s.handle_appended(now, Ok(accepted)).expect("an answer");
                    assert!(
                        answer.frame.contains(&oldest.to_string()),
                        "answered out of order"
                    );
                    assert!(s.may_read());
                }
            }
            Action::Ack(seqs) => {
                assert!(!seqs.is_empty() && seqs.len() <= MAX_ACKS_PER_FRAME);
                for seq in seqs {
                    // Only what was delivered here, once (the window may have let old ones go).
                    assert!(
                        unacked.remove(&seq),
                        "ack of {seq}, never delivered or acked twice"
                    );
                }
            }
            Action::SetPushToken(Some(token)) => assert!(token.validate().is_ok()),
            _ => {}
        }
        let _ = s.next_deadline();
        let _ = s.poll_timeout(now);
    }
});
