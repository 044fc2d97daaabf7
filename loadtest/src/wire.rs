//! The two wire protocols the load tool speaks: the relay's own, and Centrifugo's JSON protocol
//! (the peer `scripts/bench peer` measures against). Everything else in the tool, the workloads,
//! clocks and loss accounting, is the same for both.
//!
//! Centrifugo is driven the way an app would use it for one-to-one messages: each device connects
//! with an HS256 JWT naming its user, subscribes to its personal channel `user:#<id>` (a
//! user-limited channel) and publishes to the recipient's. A publish reply plays `accepted`, a
//! publication plays `deliver`, and the subscribe reply plays `synced`. Centrifugo has no acks,
//! no ids to deduplicate by and no store behind a publish here (in-memory engine, no history).

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use serde_json::Value;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Protocol {
    /// The relay's protocol (PROTOCOL.md).
    Relay,
    /// Centrifugo v6's JSON protocol over WebSocket.
    Centrifugo,
}

/// What one incoming frame (or, for Centrifugo, one line of it) means to a device.
pub enum Event {
    Synced,
    Accepted,
    Rejected(String),
    /// A message for this device: its base64 body and the relay's sequence number (0 when the
    /// server has none).
    Deliver {
        body: String,
        seq: u64,
    },
    /// Centrifugo's application-level ping (`{}`), answered with `{}`.
    Ping,
    Other,
}

/// Command ids below this are the handshake's; a send `k` uses `FIRST_SEND_ID + k`.
const FIRST_SEND_ID: u64 = 10;

impl Protocol {
    /// The channel a Centrifugo user receives on.
    fn channel(user: &str) -> String {
        format!("user:#{user}")
    }

    /// Frames a device sends right after the WebSocket opens (Centrifugo signs in in-band; the
    /// relay reads its token from the upgrade request).
    pub fn hello(self, user: &str, token: &str) -> Option<String> {
        match self {
            Protocol::Relay => None,
            Protocol::Centrifugo => Some(format!(
                "{}\n{}",
                serde_json::json!({"id": 1, "connect": {"token": token}}),
                serde_json::json!({"id": 2, "subscribe": {"channel": Self::channel(user)}}),
            )),
        }
    }

    /// Send number `k` of a device, to user `to`, carrying `body` (base64).
    pub fn send(self, id: uuid::Uuid, k: u32, to: &str, body: &str, urgent: bool) -> String {
        match self {
            Protocol::Relay => serde_json::json!({
                "type": "send", "id": id, "to": [to], "body": body, "urgent": urgent
            })
            .to_string(),
            Protocol::Centrifugo => serde_json::json!({
                "id": FIRST_SEND_ID + u64::from(k),
                "publish": {"channel": Self::channel(to), "data": {"body": body}}
            })
            .to_string(),
        }
    }

    /// The frame acknowledging deliveries `seqs`, if any is due (the relay's at-least-once;
    /// Centrifugo has no acks).
    pub fn ack(self, seqs: &[u64]) -> Option<String> {
        match self {
            Protocol::Relay if !seqs.is_empty() => {
                Some(serde_json::json!({"type": "ack", "seqs": seqs}).to_string())
            }
            _ => None,
        }
    }

    /// The events in one text frame.
    pub fn events(self, text: &str) -> anyhow::Result<Vec<Event>> {
        match self {
            Protocol::Relay => Ok(vec![relay_event(serde_json::from_str(text)?)]),
            // Centrifugo batches replies and pushes, one JSON object per line.
            Protocol::Centrifugo => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| centrifugo_event(serde_json::from_str(l)?))
                .collect(),
        }
    }
}

fn relay_event(v: Value) -> Event {
    match v["type"].as_str() {
        Some("synced") => Event::Synced,
        Some("accepted") => Event::Accepted,
        Some("rejected") => Event::Rejected(v["code"].as_str().unwrap_or("?").to_string()),
        Some("deliver") => Event::Deliver {
            body: v["body"].as_str().unwrap_or_default().to_string(),
            seq: v["seq"].as_u64().unwrap_or(0),
        },
        _ => Event::Other,
    }
}

fn centrifugo_event(v: Value) -> anyhow::Result<Event> {
    let Some(obj) = v.as_object() else {
        bail!("not a JSON object")
    };
    if obj.is_empty() {
        return Ok(Event::Ping);
    }
    if let Some(push) = obj.get("push") {
        return Ok(match push["pub"]["data"]["body"].as_str() {
            Some(body) => Event::Deliver {
                body: body.to_string(),
                seq: push["pub"]["offset"].as_u64().unwrap_or(0),
            },
            None => Event::Other,
        });
    }
    let id = obj.get("id").and_then(Value::as_u64).unwrap_or(0);
    if let Some(err) = obj.get("error") {
        let code = err["code"].as_u64().unwrap_or(0);
        if id < FIRST_SEND_ID {
            // The handshake failed: nothing to measure on this connection.
            bail!("centrifugo refused the handshake: {err}");
        }
        return Ok(Event::Rejected(format!("centrifugo {code}")));
    }
    Ok(match id {
        2 => Event::Synced,
        id if id >= FIRST_SEND_ID => Event::Accepted,
        _ => Event::Other,
    })
}

/// An HS256 connection token for Centrifugo: `sub` is the user.
pub fn centrifugo_token(secret: &str, user: &str, exp: u64) -> anyhow::Result<String> {
    let claims = serde_json::json!({"sub": user, "exp": exp});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing a Centrifugo token")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                Event::Synced => "synced",
                Event::Accepted => "accepted",
                Event::Rejected(_) => "rejected",
                Event::Deliver { .. } => "deliver",
                Event::Ping => "ping",
                Event::Other => "other",
            })
            .collect()
    }

    #[test]
    fn centrifugo_batches_are_read_line_by_line() {
        let text = concat!(
            r#"{"id":1,"connect":{"client":"c","version":"6.9.1"}}"#,
            "\n",
            r#"{"id":2,"subscribe":{}}"#,
            "\n",
            r#"{"id":10,"publish":{}}"#,
            "\n",
            r#"{"push":{"channel":"user:#b","pub":{"data":{"body":"AAEC"}}}}"#,
            "\n",
            r#"{}"#,
            "\n",
            r#"{"id":11,"error":{"code":108,"message":"not available"}}"#,
        );
        let events = Protocol::Centrifugo.events(text).expect("parses");
        assert_eq!(
            kinds(&events),
            ["other", "synced", "accepted", "deliver", "ping", "rejected"]
        );
        assert!(matches!(&events[3], Event::Deliver { body, seq: 0 } if body == "AAEC"));
        assert!(matches!(&events[5], Event::Rejected(code) if code == "centrifugo 108"));
    }

    #[test]
    fn malformed_centrifugo_lines_are_errors_not_panics() {
        for text in ["[1]", "not json", "{\"id\":", "\"str\"", "null"] {
            assert!(Protocol::Centrifugo.events(text).is_err(), "{text}");
        }
        // A push without a body of ours (another publisher's data) is not a delivery.
        let foreign = r#"{"push":{"channel":"user:#b","pub":{"data":[1,2]}}}"#;
        assert_eq!(
            kinds(&Protocol::Centrifugo.events(foreign).expect("parses")),
            ["other"]
        );
    }

    #[test]
    fn only_the_relay_is_acknowledged() {
        assert_eq!(
            Protocol::Relay.ack(&[3, 4]).as_deref(),
            Some(r#"{"seqs":[3,4],"type":"ack"}"#)
        );
        assert_eq!(Protocol::Relay.ack(&[]), None);
        assert_eq!(Protocol::Centrifugo.ack(&[3]), None);
    }

    #[test]
    fn a_refused_centrifugo_handshake_is_an_error() {
        let refused = r#"{"id":1,"error":{"code":109,"message":"token expired"}}"#;
        assert!(Protocol::Centrifugo.events(refused).is_err());
    }

    #[test]
    fn relay_frames_map_one_to_one() {
        let deliver = r#"{"type":"deliver","seq":7,"body":"AA=="}"#;
        let events = Protocol::Relay.events(deliver).expect("parses");
        assert!(matches!(&events[0], Event::Deliver { body, seq: 7 } if body == "AA=="));
        let rejected = r#"{"type":"rejected","id":"x","code":"rate_limited"}"#;
        let events = Protocol::Relay.events(rejected).expect("parses");
        assert!(matches!(&events[0], Event::Rejected(code) if code == "rate_limited"));
    }

    #[test]
    fn sends_name_the_recipient_the_protocol_way() {
        let id = uuid::Uuid::nil();
        let relay: Value =
            serde_json::from_str(&Protocol::Relay.send(id, 3, "bob", "AA==", true)).expect("json");
        assert_eq!(relay["to"][0], "bob");
        assert_eq!(relay["urgent"], true);
        let peer: Value =
            serde_json::from_str(&Protocol::Centrifugo.send(id, 3, "bob", "AA==", false))
                .expect("json");
        assert_eq!(peer["id"], FIRST_SEND_ID + 3);
        assert_eq!(peer["publish"]["channel"], "user:#bob");
        assert_eq!(peer["publish"]["data"]["body"], "AA==");
    }
}
