//! What the audit trail records and how it is stored: access [`Event`]s, and the [`Record`]s
//! that chain them per [`Chain`] (subject, month, node). Plain data; the store keeps records and
//! the [`Auditor`](super::Auditor) writes them.

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceRef, now_ms};

/// Partition of failed logins that name no valid user.
pub const ANONYMOUS: &str = "#anon";

/// What an audit event records: a closed vocabulary, stored as its snake-case name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A session began.
    #[default]
    Connect,
    /// A session ended.
    Disconnect,
    /// A session ended by the inactivity logoff.
    IdleLogoff,
    /// An upgrade refused for its credentials.
    AuthFailed,
    /// A failed login answered `429` (too many failures).
    AuthThrottled,
    /// An admin asked for a logout.
    LogoutRequested,
    /// A logout reached the device (live, by push, at reconnect).
    LogoutDelivered,
    /// The device confirmed its wipe.
    LogoutConfirmed,
    /// An account was locked.
    Lock,
    /// An account was unlocked.
    Unlock,
    /// A call to the admin API.
    AdminRequest,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 11] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::IdleLogoff,
        EventKind::AuthFailed,
        EventKind::AuthThrottled,
        EventKind::LogoutRequested,
        EventKind::LogoutDelivered,
        EventKind::LogoutConfirmed,
        EventKind::Lock,
        EventKind::Unlock,
        EventKind::AdminRequest,
    ];

    /// The stored name (also the metric label).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::IdleLogoff => "idle_logoff",
            EventKind::AuthFailed => "auth_failed",
            EventKind::AuthThrottled => "auth_throttled",
            EventKind::LogoutRequested => "logout_requested",
            EventKind::LogoutDelivered => "logout_delivered",
            EventKind::LogoutConfirmed => "logout_confirmed",
            EventKind::Lock => "lock",
            EventKind::Unlock => "unlock",
            EventKind::AdminRequest => "admin_request",
        }
    }

    /// Whether an organisation's access report lists it: failed logins, connects, logoffs,
    /// logouts and locks (not disconnects or admin calls).
    pub fn reported(self) -> bool {
        !matches!(self, EventKind::Disconnect | EventKind::AdminRequest)
    }
}

/// One access event. Ids are validated identifiers; `detail` fields are fixed vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Time, ms since the Unix epoch.
    pub ts: u64,
    /// What happened.
    pub event: EventKind,
    /// User concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Device concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// User a failed login's token named, when that token was not genuine and names no user
    /// the relay knows (the record is then filed with the anonymous failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_user: Option<String>,
    /// Device such a token named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_device: Option<String>,
    /// Client IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Node that recorded it.
    #[serde(default)]
    pub node: u8,
    /// Why (a code: `token_expired`, `lost_device`, `slow consumer`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Admin credential that acted (`name (role)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// How a logout reached the device: `live`, `push`, `reconnect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The logout signal id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<uuid::Uuid>,
    /// Organisation the user belonged to when it happened: its access report lists the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// The recorder named `org` (or knows there is none): the writer does not look it up.
    #[serde(skip)]
    pub org_known: bool,
    /// Start of the range an org report was asked for (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// End of that range (ms, exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    /// Admin request: `METHOD /path` and the status answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// HTTP status of an admin request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl Event {
    /// An event of kind `event` now.
    pub fn new(event: EventKind) -> Self {
        Event {
            ts: now_ms(),
            event,
            ..Default::default()
        }
    }

    /// Sets user and device.
    pub fn device(mut self, d: &DeviceRef) -> Self {
        self.user = Some(d.user.to_string());
        self.device = Some(d.device.to_string());
        self
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Partition subject: the user, or [`ANONYMOUS`].
    pub fn subject(&self) -> String {
        self.user.clone().unwrap_or_else(|| ANONYMOUS.into())
    }
}

/// Month number (months since 1970-01) of a time in ms; the partition bucket.
pub fn month_of(ms: u64) -> u32 {
    let (year, month, _) = civil_date(ms);
    ((year - 1970) * 12 + i64::from(month) - 1).clamp(0, i64::from(u32::MAX)) as u32
}

/// Year, month (1–12) and day (1–31) in UTC of a time in ms.
pub fn civil_date(ms: u64) -> (i64, u32, u32) {
    // Civil-from-days (Howard Hinnant).
    let days = (ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// Position and hash of a chain's last record.
pub type Head = (u64, [u8; 32]);

/// One chain of a partition: `(subject, month, node)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chain {
    /// Partition subject.
    pub subject: String,
    /// Partition month.
    pub month: u32,
    /// Writing node.
    pub node: u8,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Which chain.
    pub chain: Chain,
    /// Position in the chain, from 0.
    pub n: u64,
    /// Event time (ms), for range queries.
    pub ts: u64,
    /// The event as JSON, exactly as MAC'd.
    pub entry: String,
    /// MAC of the previous record in the chain.
    pub prev: [u8; 32],
    /// `HMAC-SHA256(key, chain ‖ n ‖ prev ‖ entry)`.
    pub hash: [u8; 32],
    /// Audit key that MAC'd it (empty: written before audit keys, not evidence).
    pub key_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_stored_by_the_names_the_metrics_catalogue_lists() {
        for kind in EventKind::ALL {
            let json = serde_json::to_string(&kind).expect("json");
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(
                serde_json::from_str::<EventKind>(&json).expect("back"),
                kind
            );
        }
        let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names, crate::metrics::AUDIT_EVENTS);
    }
}
