//! Wire protocol v1: the JSON text frames exchanged over the WebSocket.
//!
//! This module is the only place that knows the frame shapes; `PROTOCOL.md` documents them for
//! client authors. The relay never looks inside a message body: it checks that the body is valid
//! base64 and measures its decoded size, nothing more.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Protocol version announced in `hello` and in the `relay.v1` subprotocol name.
pub const VERSION: u32 = 1;
/// Subprotocol a browser offers (with `bearer.<token>`) and the relay answers with.
pub const SUBPROTOCOL: &str = "relay.v1";
/// Most sequence numbers one `ack` frame may carry.
pub const MAX_ACKS_PER_FRAME: usize = 1024;

/// A user or device identifier: 1 to 128 characters of `[A-Za-z0-9._:@+-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+-".contains(&b))
}

/// A frame sent by a device.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Send an opaque message to users.
    Send {
        /// Client-chosen message id; resending the same id is idempotent.
        id: Uuid,
        /// Recipient user ids.
        to: Vec<String>,
        /// Opaque end-to-end-encrypted body, standard base64.
        body: String,
        /// Urgent messages page on-call devices.
        #[serde(default)]
        urgent: bool,
    },
    /// Acknowledge delivered messages by sequence number; they leave this device's inbox.
    Ack {
        /// Sequence numbers from `deliver` frames.
        seqs: Vec<u64>,
    },
    /// The user did something in the app; resets the inactivity logoff timer.
    Active,
    /// Register or refresh this device's push token (send it again whenever the OS rotates it).
    PushToken {
        /// `apns` or `fcm`.
        platform: push::Platform,
        /// The provider's device token.
        token: String,
        /// `sandbox` (development builds) or `production`.
        environment: push::Environment,
        /// Bundle id (iOS) or package name (Android).
        app_id: String,
    },
    /// Stop pushing to this device.
    PushTokenRemove,
    /// The device wiped its local data after a `logout` frame or push.
    LogoutAck {
        /// The `signal` of the `logout` frame or push.
        signal: Uuid,
    },
}

/// Why a client frame could not be used. Sent back as an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameError {
    /// Not JSON at all.
    BadJson,
    /// JSON with a `type` the relay does not know.
    UnknownType,
    /// Known type, but fields missing, of the wrong type, or out of range.
    BadRequest,
    /// A `send` body that is not standard base64.
    BadBase64,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
    /// The relay could not carry out a valid request right now; send it again later.
    Unavailable,
}

impl FrameError {
    /// Code string as it appears on the wire.
    pub fn code(self) -> &'static str {
        match self {
            FrameError::BadJson => "bad_json",
            FrameError::UnknownType => "unknown_type",
            FrameError::BadRequest => "bad_request",
            FrameError::BadBase64 => "bad_base64",
            FrameError::BinaryNotSupported => "binary_not_supported",
            FrameError::Unavailable => "unavailable",
        }
    }
}

/// Parses one text frame. The error path re-parses to tell the client precisely what is wrong;
/// it is cold, so the extra work does not matter.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, (FrameError, String)> {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => Ok(frame),
        Err(err) => Err(classify(text, err)),
    }
}

fn classify(text: &str, err: serde_json::Error) -> (FrameError, String) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return (FrameError::BadJson, "frame is not valid JSON".into());
    };
    match value.get("type").and_then(|t| t.as_str()) {
        None => (FrameError::BadRequest, "missing string field `type`".into()),
        Some("send" | "ack" | "active" | "push_token" | "push_token_remove" | "logout_ack") => {
            (FrameError::BadRequest, sanitize(&err))
        }
        Some(_) => (FrameError::UnknownType, "unknown frame type".into()),
    }
}

/// A fixed message: nothing of the client's input is ever echoed (it may be patient data).
/// serde's "missing field" names one of our own fields; every other message may quote input.
fn sanitize(err: &serde_json::Error) -> String {
    let msg = err.to_string();
    match msg
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        Some(field) if field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => {
            format!("missing field `{field}`")
        }
        _ => "a field has the wrong type or an invalid value".into(),
    }
}

/// Decodes a message body. Returns `None` when it is not standard base64.
pub fn decode_body(body: &str) -> Option<Vec<u8>> {
    B64.decode(body).ok()
}

/// The decoded size of standard (padded) base64, known without decoding it; an upper bound
/// when `body` is not valid base64 (decoding then fails anyway).
pub fn decoded_len(body: &str) -> usize {
    let padding = body.bytes().rev().take(2).filter(|&b| b == b'=').count();
    (body.len().div_ceil(4) * 3).saturating_sub(padding)
}

/// Machine-readable reason a `send` was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Body larger than the configured limit.
    TooLarge,
    /// Too many recipients, or none.
    BadRecipients,
    /// The device sends faster than its rate limit (urgent messages have one of their own).
    RateLimited,
    /// The device's token does not allow urgent messages (`urgent` claim).
    UrgentNotAllowed,
    /// The sending account stored its `limits.sender_bytes_per_day` today (UTC).
    QuotaExceeded,
    /// The store could not durably accept the message; retry later.
    Unavailable,
    /// The relay is shutting down; reconnect and retry.
    ShuttingDown,
}

impl RejectCode {
    /// Code string as it appears on the wire (and in metric labels).
    pub fn code(self) -> &'static str {
        match self {
            RejectCode::TooLarge => "too_large",
            RejectCode::BadRecipients => "bad_recipients",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::UrgentNotAllowed => "urgent_not_allowed",
            RejectCode::QuotaExceeded => "quota_exceeded",
            RejectCode::Unavailable => "unavailable",
            RejectCode::ShuttingDown => "shutting_down",
        }
    }

    /// Whether sending the same frame again later can succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            RejectCode::RateLimited | RejectCode::Unavailable | RejectCode::ShuttingDown
        )
    }
}

/// Sender of a delivered message.
#[derive(Debug, Serialize)]
pub struct Sender<'a> {
    /// Sender's user id.
    pub user: &'a str,
    /// Sender's device id.
    pub device: &'a str,
}

/// A frame sent by the relay.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame of every session.
    Hello {
        /// Protocol version.
        v: u32,
        /// Authenticated user.
        user: &'a str,
        /// Authenticated device.
        device: &'a str,
        /// Inactivity logoff, seconds.
        idle_timeout_s: u64,
        /// Largest accepted decoded body, bytes.
        max_body_bytes: usize,
        /// Most recipients per message.
        max_recipients: usize,
    },
    /// The message is durably stored.
    Accepted {
        /// Client's message id.
        id: Uuid,
        /// Server sequence; the same `seq` appears in `deliver`.
        seq: u64,
        /// Server accept time, milliseconds since the Unix epoch.
        ts: u64,
        /// True when this id had been accepted before (nothing new stored or delivered).
        duplicate: bool,
    },
    /// The message was not stored.
    Rejected {
        /// Client's message id.
        id: Uuid,
        /// Why.
        code: RejectCode,
        /// Whether the same send may succeed later.
        retry: bool,
    },
    /// A message for this device.
    Deliver {
        /// Message id chosen by the sender.
        id: Uuid,
        /// Server sequence, increasing per device; acknowledge with it.
        seq: u64,
        /// Accept time, milliseconds since the Unix epoch.
        ts: u64,
        /// Sender.
        from: Sender<'a>,
        /// Opaque body, standard base64.
        body: &'a str,
        /// Urgent flag set by the sender.
        urgent: bool,
    },
    /// The stored inbox has been replayed; live traffic follows.
    Synced {
        /// Highest sequence delivered during replay (0 when none).
        seq: u64,
    },
    /// A client frame could not be used.
    Error {
        /// Machine-readable code.
        code: FrameError,
        /// Human-readable detail (never echoes the frame).
        message: &'a str,
        /// Message id, when the frame was a `send` whose id could be read.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Uuid>,
    },
    /// The session ends for inactivity; the app must authenticate again.
    SessionExpired {
        /// Inactivity limit that was reached, seconds.
        idle_timeout_s: u64,
    },
    /// The device is logged out: wipe local data, answer `logout_ack`; the relay then closes
    /// with 4006. Always the first frame of a session whose credentials were revoked.
    Logout {
        /// `password_changed`, `lost_device`, `admin`, `locked`, `security`.
        reason: &'a str,
        /// Opaque id to confirm with `logout_ack`.
        signal: Uuid,
    },
    /// A `push_token` or `push_token_remove` was stored.
    PushTokenSaved {
        /// Whether the device now has a push registration.
        registered: bool,
    },
}

impl ServerFrame<'_> {
    /// Serializes the frame to its JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no custom
        // serializers that error.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Encodes a body for a `deliver` frame.
pub fn encode_body(body: &[u8]) -> String {
    B64.encode(body)
}

/// WebSocket close codes used by the relay (see PROTOCOL.md).
pub mod close {
    /// Repeated protocol abuse.
    pub const POLICY: u16 = 1008;
    /// Frame larger than the configured maximum.
    pub const TOO_BIG: u16 = 1009;
    /// A frame broke the WebSocket protocol (an unmasked client frame, a bad opcode).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// The relay restarts or drains; reconnect (with jitter).
    pub const RESTART: u16 = 1012;
    /// The store cannot serve the session now (access check, registration, replay, acks): try
    /// again later, with backoff.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Inactivity logoff.
    pub const SESSION_EXPIRED: u16 = 4001;
    /// Another connection of the same device replaced this one.
    pub const DISPLACED: u16 = 4002;
    /// The device did not read fast enough; its messages stay queued.
    pub const SLOW_CONSUMER: u16 = 4003;
    /// The token expired during the session; reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4004;
    /// No pong within two ping intervals.
    pub const UNRESPONSIVE: u16 = 4005;
    /// The device was logged out remotely (lost device, password change, lock): wipe local
    /// data, confirm with `logout_ack`, and do not reconnect with the same credentials.
    pub const LOGGED_OUT: u16 = 4006;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> FrameError {
        parse_client_frame(text).expect_err("should fail").0
    }

    #[test]
    fn parses_send_ack_active() {
        let id = Uuid::new_v4();
        let f = parse_client_frame(&format!(
            r#"{{"type":"send","id":"{id}","to":["u2"],"body":"aGk="}}"#
        ))
        .expect("send");
        assert_eq!(
            f,
            ClientFrame::Send {
                id,
                to: vec!["u2".into()],
                body: "aGk=".into(),
                urgent: false
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ack","seqs":[1,2]}"#).expect("ack"),
            ClientFrame::Ack { seqs: vec![1, 2] }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"active"}"#).expect("active"),
            ClientFrame::Active
        );
    }

    #[test]
    fn classifies_errors() {
        assert_eq!(err("{not json"), FrameError::BadJson);
        assert_eq!(err(r#"{"type":"dance"}"#), FrameError::UnknownType);
        assert_eq!(err(r#"{"kind":"send"}"#), FrameError::BadRequest);
        assert_eq!(err(r#"{"type":"send","to":["u"]}"#), FrameError::BadRequest);
        assert_eq!(
            err(r#"{"type":"send","id":"nope","to":[],"body":""}"#),
            FrameError::BadRequest
        );
        assert_eq!(err(r#"{"type":"ack","seqs":[-1]}"#), FrameError::BadRequest);
    }

    #[test]
    fn error_detail_does_not_echo_input() {
        let (_, msg) =
            parse_client_frame(r#"{"type":"send","id":"SECRET-VALUE","to":[],"body":""}"#)
                .expect_err("bad id");
        assert!(!msg.contains("SECRET-VALUE"), "{msg}");
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("dr.smith@clinic-1"));
        assert!(!valid_id(""));
        assert!(!valid_id("has space"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn body_round_trips_and_bounds() {
        let body = vec![7u8; 1000];
        let enc = encode_body(&body);
        assert_eq!(decode_body(&enc).expect("b64"), body);
        for n in [0, 1, 2, 3, 998, 999, 1000] {
            assert_eq!(decoded_len(&encode_body(&vec![7u8; n])), n);
        }
        assert!(decoded_len(&enc) >= body.len());
        assert!(decode_body("***").is_none());
    }

    #[test]
    fn code_strings_match_the_wire() {
        for code in [
            RejectCode::TooLarge,
            RejectCode::BadRecipients,
            RejectCode::RateLimited,
            RejectCode::UrgentNotAllowed,
            RejectCode::Unavailable,
            RejectCode::ShuttingDown,
        ] {
            assert_eq!(
                serde_json::to_string(&code).expect("json"),
                format!("\"{}\"", code.code())
            );
        }
        for code in [
            FrameError::BadJson,
            FrameError::UnknownType,
            FrameError::BadRequest,
            FrameError::BadBase64,
            FrameError::BinaryNotSupported,
        ] {
            assert_eq!(
                serde_json::to_string(&code).expect("json"),
                format!("\"{}\"", code.code())
            );
        }
    }

    /// Every client frame: a minimal and a complete example (fields only in the complete one
    /// are optional). The match makes a new variant a compile error here until it has examples.
    fn client_examples() -> Vec<(&'static str, Vec<String>)> {
        let id = r#""id":"5f0c2d6e-8a51-4c1e-9c55-0d7d2c1a9b01""#;
        let examples = vec![
            vec![
                format!(r#"{{"type":"send",{id},"to":["u"],"body":"aGk="}}"#),
                format!(r#"{{"type":"send",{id},"to":["u"],"body":"aGk=","urgent":true}}"#),
            ],
            vec![r#"{"type":"ack","seqs":[1]}"#.into()],
            vec![r#"{"type":"active"}"#.into()],
            vec![
                r#"{"type":"push_token","platform":"apns","token":"ab","environment":"sandbox","app_id":"a.b"}"#.into(),
            ],
            vec![r#"{"type":"push_token_remove"}"#.into()],
            vec![r#"{"type":"logout_ack","signal":"5f0c2d6e-8a51-4c1e-9c55-0d7d2c1a9b01"}"#.into()],
        ];
        examples
            .into_iter()
            .map(|texts| {
                let frame = parse_client_frame(&texts[0]).expect("example parses");
                let name = match frame {
                    ClientFrame::Send { .. } => "send",
                    ClientFrame::Ack { .. } => "ack",
                    ClientFrame::Active => "active",
                    ClientFrame::PushToken { .. } => "push_token",
                    ClientFrame::PushTokenRemove => "push_token_remove",
                    ClientFrame::LogoutAck { .. } => "logout_ack",
                };
                for text in &texts {
                    parse_client_frame(text).expect("example parses");
                }
                (name, texts)
            })
            .collect()
    }

    const SERVER_FRAME_TYPES: usize = 9;

    fn server_examples() -> Vec<Vec<ServerFrame<'static>>> {
        let id = Uuid::nil();
        let from = || Sender {
            user: "u",
            device: "d",
        };
        vec![
            vec![ServerFrame::Hello {
                v: VERSION,
                user: "u",
                device: "d",
                idle_timeout_s: 7200,
                max_body_bytes: 1,
                max_recipients: 1,
            }],
            vec![ServerFrame::Accepted {
                id,
                seq: 1,
                ts: 1,
                duplicate: false,
            }],
            vec![ServerFrame::Rejected {
                id,
                code: RejectCode::RateLimited,
                retry: true,
            }],
            vec![ServerFrame::Deliver {
                id,
                seq: 1,
                ts: 1,
                from: from(),
                body: "aGk=",
                urgent: false,
            }],
            vec![ServerFrame::Synced { seq: 0 }],
            vec![
                ServerFrame::Error {
                    code: FrameError::BadJson,
                    message: "m",
                    id: None,
                },
                ServerFrame::Error {
                    code: FrameError::BadRequest,
                    message: "m",
                    id: Some(id),
                },
            ],
            vec![ServerFrame::SessionExpired {
                idle_timeout_s: 7200,
            }],
            vec![ServerFrame::Logout {
                reason: "admin",
                signal: id,
            }],
            vec![ServerFrame::PushTokenSaved { registered: true }],
        ]
    }

    /// A frame's shape: field → JSON type (`string`, `number`, `boolean`, `[elem]`, or a nested
    /// shape); fields missing from some example get a `?`.
    fn shape(examples: &[serde_json::Value]) -> serde_json::Value {
        use serde_json::{Map, Value};
        fn kind(v: &Value) -> Value {
            match v {
                Value::String(_) => "string".into(),
                Value::Number(_) => "number".into(),
                Value::Bool(_) => "boolean".into(),
                Value::Array(items) => Value::Array(items.first().map(kind).into_iter().collect()),
                Value::Object(fields) => {
                    Value::Object(fields.iter().map(|(k, v)| (k.clone(), kind(v))).collect())
                }
                Value::Null => "null".into(),
            }
        }
        let mut out = Map::new();
        let all: Vec<&Map<String, Value>> = examples
            .iter()
            .map(|e| e.as_object().expect("frames are objects"))
            .collect();
        for fields in &all {
            for (name, value) in *fields {
                let optional = all.iter().any(|f| !f.contains_key(name));
                let key = if optional {
                    format!("{name}?")
                } else {
                    name.clone()
                };
                out.insert(key, kind(value));
            }
        }
        Value::Object(out)
    }

    fn catalogue() -> String {
        use serde_json::{Map, Value};
        let mut client = Map::new();
        for (name, texts) in client_examples() {
            let values: Vec<Value> = texts
                .iter()
                .map(|t| serde_json::from_str(t).expect("json"))
                .collect();
            client.insert(name.into(), shape(&values));
        }
        let mut server = Map::new();
        let examples = server_examples();
        assert_eq!(
            examples.len(),
            SERVER_FRAME_TYPES,
            "one entry per frame type"
        );
        for frames in examples {
            let values: Vec<Value> = frames
                .iter()
                .map(|f| serde_json::from_str(&f.to_json()).expect("json"))
                .collect();
            let name = values[0]["type"].as_str().expect("type").to_owned();
            assert!(
                server.insert(name, shape(&values)).is_none(),
                "one entry per type"
            );
        }
        let doc = serde_json::json!({
            "about": "Frame shapes of wire protocol v1, generated from the relay's frame types by `cargo test -p relay frame_catalogue` (UPDATE_FRAMES=1 rewrites it). Client libraries check their types against it.",
            "client": client,
            "server": server,
        });
        serde_json::to_string_pretty(&doc).expect("json") + "\n"
    }

    /// `clients/frames.json` is what every client library checks its frame types against
    /// (clients/typescript/test/frames.test.ts, which also checks PROTOCOL.md against it).
    #[test]
    fn frame_catalogue_matches_the_frame_types() {
        // Exhaustive on purpose: a new server frame fails to compile until it is counted.
        let _count = |f: &ServerFrame<'_>| match f {
            ServerFrame::Hello { .. }
            | ServerFrame::Accepted { .. }
            | ServerFrame::Rejected { .. }
            | ServerFrame::Deliver { .. }
            | ServerFrame::Synced { .. }
            | ServerFrame::Error { .. }
            | ServerFrame::SessionExpired { .. }
            | ServerFrame::Logout { .. }
            | ServerFrame::PushTokenSaved { .. } => SERVER_FRAME_TYPES,
        };
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/frames.json");
        let generated = catalogue();
        if std::env::var_os("UPDATE_FRAMES").is_some() {
            std::fs::write(path, &generated).expect("write clients/frames.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "clients/frames.json differs from the relay's frame types: run \
             `UPDATE_FRAMES=1 cargo test -p relay frame_catalogue`, then update PROTOCOL.md and \
             the client libraries' types (their tests check both)"
        );
    }

    #[test]
    fn server_frames_serialize_with_type_tags() {
        let json = ServerFrame::Synced { seq: 9 }.to_json();
        assert_eq!(json, r#"{"type":"synced","seq":9}"#);
        let json = ServerFrame::Rejected {
            id: Uuid::nil(),
            code: RejectCode::RateLimited,
            retry: RejectCode::RateLimited.retryable(),
        }
        .to_json();
        assert!(
            json.contains(r#""code":"rate_limited","retry":true"#),
            "{json}"
        );
    }
}
