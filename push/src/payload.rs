//! What a push may carry, by construction.
//!
//! **Invariant:** a push is built only from [`Push`], whose fields are enums of fixed,
//! localizable keys, counters and opaque ids. No field can hold a name, a message body, a
//! conversation title or any other free text, so no code path can put patient information into a
//! push. The app uses the opaque id to fetch and decrypt the message itself (APNs
//! `mutable-content` lets its notification extension do so before anything is shown).

use serde_json::{Value, json};
use uuid::Uuid;

/// How a wake-up is shown before the app decrypts anything: a fixed key the app localizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKey {
    /// "New message".
    NewMessage,
    /// "Urgent message".
    UrgentMessage,
}

impl AlertKey {
    fn loc_key(self) -> &'static str {
        match self {
            AlertKey::NewMessage => "RELAY_NEW_MESSAGE",
            AlertKey::UrgentMessage => "RELAY_URGENT_MESSAGE",
        }
    }
}

/// Notification category (actions the app offers), fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// A message waiting to be read.
    Message,
}

impl Category {
    fn name(self) -> &'static str {
        match self {
            Category::Message => "RELAY_MESSAGE",
        }
    }
}

/// How wake-ups appear on Android.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FcmStyle {
    /// Data messages only: the app fetches, decrypts and shows the message itself.
    #[default]
    Data,
    /// Data plus a notification with a fixed, localizable title, shown by Android even when the
    /// app is not running.
    Notification,
}

/// Everything the relay can push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// A message is waiting: show a fixed alert, let the app fetch `message` by id.
    Wake {
        /// Opaque id of the waiting message.
        message: Uuid,
        /// Unread count for the badge, if the relay knows it.
        badge: Option<u32>,
        /// Urgent messages page: highest priority, time-sensitive.
        urgent: bool,
    },
    /// Sign out and wipe: a silent/background push carrying only an opaque signal id.
    Logout {
        /// Opaque id the app confirms with `logout_ack`.
        signal: Uuid,
    },
}

/// APNs request parts for one push: headers that vary by push, and the JSON payload.
#[derive(Debug, Clone, PartialEq)]
pub struct ApnsRequest {
    /// `apns-push-type`: `alert` or `background`.
    pub push_type: &'static str,
    /// `apns-priority`: 10 (immediate) or 5 (power-considerate; required for background).
    pub priority: u8,
    /// `apns-collapse-id`, when repeats of this push should replace each other.
    pub collapse_id: Option<String>,
    /// The JSON payload.
    pub payload: Value,
}

/// FCM HTTP v1 `message` for one push (the caller adds `token`).
#[derive(Debug, Clone, PartialEq)]
pub struct FcmMessage {
    /// The `message` object without `token`.
    pub message: Value,
}

impl Push {
    /// APNs form. `critical` is used for urgent pages only when the app holds Apple's
    /// critical-alerts entitlement; otherwise urgent pages are `time-sensitive`.
    pub fn apns(&self, critical_entitlement: bool) -> ApnsRequest {
        match *self {
            Push::Wake {
                message,
                badge,
                urgent,
            } => {
                let key = if urgent {
                    AlertKey::UrgentMessage
                } else {
                    AlertKey::NewMessage
                };
                let level = match (urgent, critical_entitlement) {
                    (true, true) => "critical",
                    (true, false) => "time-sensitive",
                    (false, _) => "active",
                };
                let mut aps = json!({
                    "alert": { "loc-key": key.loc_key() },
                    "mutable-content": 1,
                    "category": Category::Message.name(),
                    "interruption-level": level,
                });
                if let Some(n) = badge {
                    aps["badge"] = json!(n);
                }
                if urgent {
                    aps["sound"] = json!("default");
                }
                ApnsRequest {
                    push_type: "alert",
                    priority: 10,
                    // Non-urgent wake-ups for one device replace each other; every page shows.
                    collapse_id: (!urgent).then(|| "relay-wake".to_string()),
                    payload: json!({ "aps": aps, "mid": message.to_string() }),
                }
            }
            Push::Logout { signal } => ApnsRequest {
                push_type: "background",
                priority: 5,
                collapse_id: None,
                payload: json!({ "aps": { "content-available": 1 }, "logout": signal.to_string() }),
            },
        }
    }

    /// FCM HTTP v1 form. Logout signals are always data-only (silent).
    pub fn fcm(&self, ttl_secs: u32, style: FcmStyle) -> FcmMessage {
        let (data, priority, collapse) = match *self {
            Push::Wake {
                message,
                badge,
                urgent,
            } => {
                let mut data = json!({
                    "kind": if urgent { "urgent" } else { "wake" },
                    "mid": message.to_string(),
                });
                if let Some(n) = badge {
                    data["badge"] = json!(n.to_string());
                }
                (
                    data,
                    if urgent { "HIGH" } else { "NORMAL" },
                    (!urgent).then_some("relay-wake"),
                )
            }
            Push::Logout { signal } => (
                json!({ "kind": "logout", "logout": signal.to_string() }),
                "HIGH",
                None,
            ),
        };
        let mut android = json!({ "priority": priority, "ttl": format!("{ttl_secs}s") });
        if let Some(key) = collapse {
            android["collapse_key"] = json!(key);
        }
        if let (FcmStyle::Notification, Push::Wake { urgent, .. }) = (style, self) {
            let (key, channel) = if *urgent {
                (AlertKey::UrgentMessage, "relay_urgent")
            } else {
                (AlertKey::NewMessage, "relay_messages")
            };
            android["notification"] = json!({
                "title_loc_key": key.loc_key(),
                "channel_id": channel,
                "notification_priority": if *urgent { "PRIORITY_MAX" } else { "PRIORITY_DEFAULT" },
            });
        }
        FcmMessage {
            message: json!({ "data": data, "android": android }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key any push may contain.
    const ALLOWED_KEYS: &[&str] = &[
        "aps",
        "alert",
        "loc-key",
        "mutable-content",
        "category",
        "interruption-level",
        "badge",
        "sound",
        "content-available",
        "mid",
        "logout",
        "data",
        "kind",
        "android",
        "priority",
        "ttl",
        "collapse_key",
        "notification",
        "title_loc_key",
        "channel_id",
        "notification_priority",
    ];
    /// Every string value a push may contain, besides opaque UUIDs and numbers.
    const ALLOWED_STRINGS: &[&str] = &[
        "RELAY_NEW_MESSAGE",
        "RELAY_URGENT_MESSAGE",
        "RELAY_MESSAGE",
        "active",
        "time-sensitive",
        "critical",
        "default",
        "wake",
        "urgent",
        "logout",
        "HIGH",
        "NORMAL",
        "relay-wake",
        "relay_urgent",
        "relay_messages",
        "PRIORITY_MAX",
        "PRIORITY_DEFAULT",
    ];

    fn every_push() -> Vec<Push> {
        let id = Uuid::new_v4();
        let mut all = vec![Push::Logout { signal: id }];
        for urgent in [false, true] {
            for badge in [None, Some(0), Some(7)] {
                all.push(Push::Wake {
                    message: id,
                    badge,
                    urgent,
                });
            }
        }
        all
    }

    fn check(value: &Value, path: &str) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    assert!(
                        ALLOWED_KEYS.contains(&k.as_str()),
                        "key `{k}` at {path} is not allow-listed"
                    );
                    check(v, &format!("{path}.{k}"));
                }
            }
            Value::String(s) => {
                let opaque = Uuid::parse_str(s).is_ok()
                    || s.parse::<u32>().is_ok()
                    || (s.ends_with('s') && s[..s.len() - 1].parse::<u32>().is_ok());
                assert!(
                    opaque || ALLOWED_STRINGS.contains(&s.as_str()),
                    "string `{s}` at {path} is not allow-listed"
                );
            }
            Value::Number(_) => {}
            other => panic!("unexpected {other:?} at {path}"),
        }
    }

    #[test]
    fn every_push_uses_only_allow_listed_keys_and_values() {
        for push in every_push() {
            for critical in [false, true] {
                let apns = push.apns(critical);
                check(&apns.payload, "apns");
                assert!(
                    serde_json::to_vec(&apns.payload).expect("json").len() <= 4096,
                    "APNs payload limit"
                );
                if let Some(c) = &apns.collapse_id {
                    assert!(ALLOWED_STRINGS.contains(&c.as_str()));
                }
            }
            for style in [FcmStyle::Data, FcmStyle::Notification] {
                check(&push.fcm(3600, style).message, "fcm");
            }
        }
    }

    #[test]
    fn urgent_pages_are_immediate_and_time_sensitive() {
        let page = Push::Wake {
            message: Uuid::nil(),
            badge: None,
            urgent: true,
        };
        let a = page.apns(false);
        assert_eq!(
            (a.push_type, a.priority, a.collapse_id.as_deref()),
            ("alert", 10, None)
        );
        assert_eq!(a.payload["aps"]["interruption-level"], "time-sensitive");
        assert_eq!(
            page.apns(true).payload["aps"]["interruption-level"],
            "critical"
        );
        assert_eq!(
            page.fcm(60, FcmStyle::Data).message["android"]["priority"],
            "HIGH"
        );
    }

    #[test]
    fn logout_is_a_silent_background_push() {
        let a = Push::Logout {
            signal: Uuid::nil(),
        }
        .apns(false);
        assert_eq!((a.push_type, a.priority), ("background", 5));
        assert!(a.payload["aps"].get("alert").is_none());
        assert_eq!(a.payload["aps"]["content-available"], 1);
    }
}
