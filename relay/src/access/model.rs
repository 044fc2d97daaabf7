//! Access state as data: revocations, locks, wipe confirmations, the verdict a token gets and
//! whom a logout is for. Pure functions of stored rows and times; the store keeps these rows
//! and the [`Access`](super::Access) service changes them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::DeviceRef;

/// Why a device was logged out. Travels in the `logout` frame and the audit trail.
pub const REASONS: &[&str] = &[
    "password_changed",
    "lost_device",
    "admin",
    "locked",
    "security",
];

/// Why a logout was asked for: the vocabulary of the admin API and the `logout` frame. Stored
/// and sent by its [`name`](LogoutReason::name), one of [`REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutReason {
    /// The user changed their password (the account service logs out the other devices).
    PasswordChanged,
    /// The device was lost or stolen.
    LostDevice,
    /// An administrator's decision.
    Admin,
    /// The account was locked.
    Locked,
    /// A security incident.
    Security,
}

impl LogoutReason {
    /// The name stored and sent.
    pub fn name(self) -> &'static str {
        match self {
            LogoutReason::PasswordChanged => "password_changed",
            LogoutReason::LostDevice => "lost_device",
            LogoutReason::Admin => "admin",
            LogoutReason::Locked => "locked",
            LogoutReason::Security => "security",
        }
    }

    /// The reason an admin may give by name (`locked` only comes with a lock).
    pub fn requested(name: &str) -> Option<LogoutReason> {
        [
            LogoutReason::PasswordChanged,
            LogoutReason::LostDevice,
            LogoutReason::Admin,
            LogoutReason::Security,
        ]
        .into_iter()
        .find(|r| r.name() == name)
    }
}

/// How far ahead of the relay's clock a token issuer's clock may run (seconds): a token's `iat`
/// may lie this far in the future, no further (`auth` refuses it), and a revocation covers
/// tokens issued up to this long after it, since an issuer running ahead dates what it issued
/// before the revocation later than it. `auth.leeway` (for `exp` and `nbf`) is larger: it only
/// shortens or extends a token's life, and cannot let one outlive a logout.
pub const ISSUER_SKEW_S: u64 = 2;

/// A revocation: tokens issued at or before `at` are refused, and up to [`ISSUER_SKEW_S`]
/// after it (see [`covers`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// When, ms since the Unix epoch.
    pub at: u64,
    /// One of [`REASONS`].
    pub reason: String,
    /// Opaque id the device confirms with `logout_ack`; the only thing a logout push carries.
    pub signal: Uuid,
    /// User rows only: the device spared (where the password was just changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<String>,
}

impl Revocation {
    /// Whether a token issued at `iat` (Unix seconds) is revoked by this.
    pub fn covers(&self, iat: u64) -> bool {
        covers(self.at, iat)
    }
}

/// Whether a revocation made at `at_ms` revokes a token issued at `iat` (Unix seconds): one
/// issued by its clock up to `ISSUER_SKEW_S` later may have been issued before it by ours. So
/// a login after a logout needs a token issued more than that after it.
pub fn covers(at_ms: u64, iat: u64) -> bool {
    iat.saturating_mul(1000) <= at_ms.saturating_add(ISSUER_SKEW_S * 1000)
}

/// An account lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// Since when, ms.
    pub at: u64,
    /// Reason given by the admin.
    pub reason: String,
}

/// A device's confirmation that it wiped its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The revocation's signal.
    pub signal: Uuid,
    /// When, ms.
    pub at: u64,
}

/// Stored access state of a user (device id `""`) or of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRow {
    /// User row: the user's organisation: the `org` of their newest token (by `iat`) seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// User row: the `iat` (Unix seconds) of the token `org` came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_since: Option<u64>,
    /// User row: the lock, while locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<Lock>,
    /// Latest revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
    /// Device row: the last confirmed logout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<Confirmation>,
    /// Device row: last connect or disconnect, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// Device row: where the device's first login after its latest revocation began, ms.
    /// Nothing accepted before it is delivered to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh_from: Option<u64>,
}

/// One change to an access row. Each touches only its own fields, so concurrent changes from
/// different nodes (a confirmation and a new revocation) never undo each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Sets the revocation.
    Revoke(Revocation),
    /// Sets or clears the lock.
    Lock(Option<Lock>),
    /// Records a confirmation.
    Confirm(Confirmation),
    /// The device connected or disconnected; the user's org when the token names one. Recorded
    /// only once the device's registration succeeded: the ScyllaDB store takes a last-seen
    /// time as proof that the device is registered, and skips its next registration.
    Seen {
        /// When, ms.
        at: u64,
        /// Organisation, with the `iat` of the token that names it: a newer token's wins.
        org: Option<(String, u64)>,
    },
    /// The device's first login after a revocation began at this time, ms.
    Fresh(u64),
}

impl AccessRow {
    /// Applies `change` (the embedded backend's read-modify-write).
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Revoke(r) => self.revoked = Some(r),
            Change::Lock(l) => self.locked = l,
            Change::Confirm(c) => self.confirmed = Some(c),
            Change::Seen { at, org } => {
                self.last_seen = Some(at);
                if let Some((org, since)) = org {
                    self.set_org(org, since);
                }
            }
            Change::Fresh(at) => self.fresh_from = Some(at),
        }
    }

    /// Takes `org` unless the current one came from a newer token.
    pub fn set_org(&mut self, org: String, since: u64) {
        if self.org_since.is_none_or(|s| s <= since) {
            self.org = Some(org);
            self.org_since = Some(since);
        }
    }
}

/// What the relay does with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A normal session.
    Allowed,
    /// The user is locked: refused before the upgrade.
    Locked,
    /// The token is revoked. Unconfirmed: the device gets the `logout` frame and the close;
    /// confirmed: refused before the upgrade.
    LoggedOut {
        /// The revocation that applies.
        revocation: Revocation,
        /// The device already confirmed its wipe.
        confirmed: bool,
    },
}

/// The latest revocation that applies to `device` (its own, or its user's unless spared)
/// among those covering a token issued at `iat`.
pub fn revocation<'a>(
    user: &'a AccessRow,
    dev: &'a AccessRow,
    device: &str,
    iat: u64,
) -> Option<&'a Revocation> {
    let from_user = user
        .revoked
        .as_ref()
        .filter(|r| r.except.as_deref() != Some(device));
    [dev.revoked.as_ref(), from_user]
        .into_iter()
        .flatten()
        .filter(|r| r.covers(iat))
        .max_by_key(|r| r.at)
}

/// Decides for a token of `device` issued at `iat`, given the user row and the device row.
pub fn verdict(user: &AccessRow, dev: &AccessRow, device: &str, iat: u64) -> Verdict {
    let applies = revocation(user, dev, device, iat);
    if let Some(r) = applies {
        let confirmed = dev.confirmed.as_ref().is_some_and(|c| c.signal == r.signal);
        return Verdict::LoggedOut {
            revocation: r.clone(),
            confirmed,
        };
    }
    if user.locked.is_some() {
        return Verdict::Locked;
    }
    Verdict::Allowed
}

/// How a session that passed the upgrade check starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A normal session of a login that began at `floor_ms`: nothing accepted earlier is
    /// delivered (0 unless the device id was logged out before).
    Open {
        /// Ms since the Unix epoch.
        floor_ms: u64,
    },
    /// Revoked after the upgrade check: the `logout` frame, nothing else.
    LoggedOut(Revocation),
    /// Locked after the upgrade check.
    Locked,
}

/// How a session of `device` with a token issued at `iat` starts at `now` (ms), from the
/// stored rows; and what to record for it (the beginning of a login after a logout).
pub fn start(
    user: &AccessRow,
    dev: &AccessRow,
    device: &str,
    iat: u64,
    now: u64,
) -> (Start, Option<Change>) {
    match verdict(user, dev, device, iat) {
        Verdict::LoggedOut { revocation, .. } => return (Start::LoggedOut(revocation), None),
        Verdict::Locked => return (Start::Locked, None),
        Verdict::Allowed => {}
    }
    let Some(last) = revocation(user, dev, device, 0) else {
        return (Start::Open { floor_ms: 0 }, None);
    };
    if let Some(floor_ms) = dev.fresh_from.filter(|f| *f > last.at) {
        return (Start::Open { floor_ms }, None);
    }
    // The login began when its token was issued (never later than now); it is newer than the
    // revocation, or the verdict would have refused it.
    let floor_ms = iat
        .saturating_mul(1000)
        .min(now)
        .max(last.at.saturating_add(1));
    (Start::Open { floor_ms }, Some(Change::Fresh(floor_ms)))
}

/// How long a device's last-seen time stands for its next connect. A device back within it,
/// with a token whose organisation the user row already holds, is recorded at its disconnect
/// only: a reconnect storm writes nothing at its connects, and the time is never earlier than
/// the true one by more than this (a node that dies mid-session records no disconnect).
pub const SEEN_STANDS_MS: u64 = 10 * 60 * 1000;

/// Whether the rows already say, near enough, what the connect at `now` (ms) of a token
/// issued at `iat` (s) naming `org` would record ([`Change::Seen`]): the device was seen
/// within [`SEEN_STANDS_MS`], and the user's organisation is the token's, from a token no
/// older.
pub fn seen_lately(
    user: &AccessRow,
    dev: &AccessRow,
    org: Option<&str>,
    iat: u64,
    now: u64,
) -> bool {
    // Either way: a time far ahead of this clock (a node's clock gone wrong) is recorded over.
    let recent = dev
        .last_seen
        .is_some_and(|t| t.abs_diff(now) < SEEN_STANDS_MS);
    let org_held = org.is_none_or(|o| {
        user.org.as_deref() == Some(o) && user.org_since.is_some_and(|since| since >= iat)
    });
    recent && org_held
}

/// Splits the rows the store's `access` read gives into the user row and the device rows.
pub fn split(rows: Vec<(String, AccessRow)>) -> (AccessRow, Vec<(String, AccessRow)>) {
    let mut user = AccessRow::default();
    let mut devices = Vec::new();
    for (id, row) in rows {
        if id.is_empty() {
            user = row;
        } else {
            devices.push((id, row));
        }
    }
    (user, devices)
}

/// Whom a logout is for.
#[derive(Debug, Clone)]
pub enum Target {
    /// One device.
    Device(DeviceRef),
    /// Every device of `user`, but `except`.
    User {
        /// User id.
        user: String,
        /// Device spared.
        except: Option<String>,
    },
}

impl Target {
    /// The user whose devices are logged out.
    pub fn user(&self) -> &str {
        match self {
            Target::Device(d) => &d.user,
            Target::User { user, .. } => user,
        }
    }

    /// `(device, except)` as carried on the bus.
    pub fn parts(&self) -> (Option<String>, Option<String>) {
        match self {
            Target::Device(d) => (Some(d.device.to_string()), None),
            Target::User { except, .. } => (None, except.clone()),
        }
    }

    /// The inverse of [`Target::parts`].
    pub fn from_parts(user: &str, device: Option<String>, except: Option<String>) -> Self {
        match device {
            Some(d) => Target::Device(DeviceRef::new(user, &d)),
            None => Target::User {
                user: user.into(),
                except,
            },
        }
    }

    /// Whether the connection of `device` (of this target's user) is logged out.
    pub fn includes(&self, device: &str) -> bool {
        match self {
            Target::Device(d) => &*d.device == device,
            Target::User { except, .. } => except.as_deref() != Some(device),
        }
    }
}

/// Metric label for a reason (bounded).
pub fn reason_label(reason: &str) -> &'static str {
    REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(at_s: u64, except: Option<&str>) -> Revocation {
        Revocation {
            at: at_s * 1000 + 500,
            reason: "lost_device".into(),
            signal: Uuid::new_v4(),
            except: except.map(str::to_string),
        }
    }

    #[test]
    fn a_connect_needs_no_record_when_the_rows_already_hold_it() {
        let now = 100 * SEEN_STANDS_MS;
        let dev = |seen: Option<u64>| AccessRow {
            last_seen: seen,
            ..Default::default()
        };
        let user = AccessRow {
            org: Some("clinic-a".into()),
            org_since: Some(500),
            ..Default::default()
        };
        let lately = Some(now - SEEN_STANDS_MS + 1);
        assert!(seen_lately(&user, &dev(lately), None, 900, now));
        assert!(seen_lately(&user, &dev(lately), Some("clinic-a"), 500, now));
        // Another organisation, or the same from a newer token, is recorded.
        assert!(!seen_lately(
            &user,
            &dev(lately),
            Some("clinic-b"),
            500,
            now
        ));
        assert!(!seen_lately(
            &user,
            &dev(lately),
            Some("clinic-a"),
            501,
            now
        ));
        // So is a device not seen lately, or never.
        let long_ago = Some(now - SEEN_STANDS_MS);
        assert!(!seen_lately(&user, &dev(long_ago), None, 900, now));
        assert!(!seen_lately(&user, &dev(None), None, 900, now));
        // A time a little ahead of this node's clock (another node's) stands; far ahead, not.
        assert!(seen_lately(&user, &dev(Some(now + 5_000)), None, 900, now));
        let ahead = Some(now + SEEN_STANDS_MS);
        assert!(!seen_lately(&user, &dev(ahead), None, 900, now));
    }

    #[test]
    fn tokens_issued_up_to_the_revocation_and_the_issuer_skew_are_refused() {
        let dev = AccessRow {
            revoked: Some(rev(100, None)),
            ..Default::default()
        };
        let user = AccessRow::default();
        assert!(matches!(
            verdict(&user, &dev, "d", 99),
            Verdict::LoggedOut {
                confirmed: false,
                ..
            }
        ));
        assert!(matches!(
            verdict(&user, &dev, "d", 100),
            Verdict::LoggedOut { .. }
        ));
        assert_eq!(verdict(&user, &dev, "d", 103), Verdict::Allowed);
    }

    #[test]
    fn a_revocation_covers_what_an_issuer_running_ahead_issued_before_it() {
        // The account service's clock may run up to ISSUER_SKEW_S ahead: a token it issued
        // just before the logout can carry an `iat` after it, and must not outlive it.
        let dev = AccessRow {
            revoked: Some(rev(100, None)), // at 100.5 s
            ..Default::default()
        };
        let user = AccessRow::default();
        for ahead in [101, 102] {
            assert!(
                matches!(verdict(&user, &dev, "d", ahead), Verdict::LoggedOut { .. }),
                "iat {ahead}"
            );
        }
        assert_eq!(verdict(&user, &dev, "d", 103), Verdict::Allowed);
    }

    #[test]
    fn user_revocation_spares_the_excepted_device_only() {
        let user = AccessRow {
            revoked: Some(rev(100, Some("laptop"))),
            ..Default::default()
        };
        let none = AccessRow::default();
        assert_eq!(verdict(&user, &none, "laptop", 50), Verdict::Allowed);
        assert!(matches!(
            verdict(&user, &none, "phone", 50),
            Verdict::LoggedOut { .. }
        ));
    }

    #[test]
    fn confirmation_counts_for_its_signal_only() {
        let r = rev(100, None);
        let mut dev = AccessRow {
            revoked: Some(r.clone()),
            confirmed: Some(Confirmation {
                signal: r.signal,
                at: 1,
            }),
            ..Default::default()
        };
        let user = AccessRow::default();
        assert!(matches!(
            verdict(&user, &dev, "d", 1),
            Verdict::LoggedOut {
                confirmed: true,
                ..
            }
        ));
        dev.revoked = Some(rev(200, None));
        assert!(matches!(
            verdict(&user, &dev, "d", 1),
            Verdict::LoggedOut {
                confirmed: false,
                ..
            }
        ));
    }

    #[test]
    fn a_revocation_stored_after_the_upgrade_check_is_seen_at_registration() {
        // Upgrade check: allowed. However long the 101 takes, the registration reads the rows
        // again, and a revocation stored meanwhile ends the session before anything else.
        let user = AccessRow::default();
        let mut dev = AccessRow::default();
        assert_eq!(verdict(&user, &dev, "d", 100), Verdict::Allowed);
        dev.apply(Change::Revoke(rev(100, None)));
        let (start, record) = start(&user, &dev, "d", 100, 10_000_000);
        assert!(matches!(start, Start::LoggedOut(_)) && record.is_none());
        let locked = AccessRow {
            locked: Some(Lock {
                at: 1,
                reason: "left".into(),
            }),
            ..Default::default()
        };
        assert_eq!(start_of(&locked, &AccessRow::default(), 100), Start::Locked);
    }

    fn start_of(user: &AccessRow, dev: &AccessRow, iat: u64) -> Start {
        start(user, dev, "d", iat, 10_000_000).0
    }

    #[test]
    fn a_login_after_a_logout_starts_when_its_token_was_issued_and_stays_there() {
        let mut dev = AccessRow::default();
        let user = AccessRow::default();
        assert_eq!(start_of(&user, &dev, 50), Start::Open { floor_ms: 0 });
        dev.apply(Change::Revoke(rev(100, None)));
        let (first, record) = start(&user, &dev, "d", 103, 10_000_000);
        assert_eq!(first, Start::Open { floor_ms: 103_000 });
        assert_eq!(record, Some(Change::Fresh(103_000)));
        dev.apply(Change::Fresh(103_000));
        // A refreshed token of the same login keeps the floor; nothing more is recorded.
        assert_eq!(
            start(&user, &dev, "d", 500, 10_000_000),
            (Start::Open { floor_ms: 103_000 }, None)
        );
        // A token whose iat lies ahead of the clock starts the login now, not in the future.
        dev.apply(Change::Revoke(rev(600, None)));
        assert_eq!(
            start_of(&user, &dev, 700),
            Start::Open { floor_ms: 700_000 }
        );
        assert_eq!(
            start(&user, &dev, "d", 9_999, 650_000).0,
            Start::Open { floor_ms: 650_000 }
        );
    }

    #[test]
    fn lock_refuses_new_tokens_and_unlock_does_not_resurrect_old_ones() {
        let mut user = AccessRow {
            locked: Some(Lock {
                at: 100_500,
                reason: "left".into(),
            }),
            revoked: Some(rev(100, None)),
            ..Default::default()
        };
        let none = AccessRow::default();
        assert_eq!(verdict(&user, &none, "d", 150), Verdict::Locked);
        assert!(matches!(
            verdict(&user, &none, "d", 90),
            Verdict::LoggedOut { .. }
        ));
        user.apply(Change::Lock(None));
        assert_eq!(verdict(&user, &none, "d", 150), Verdict::Allowed);
        assert!(matches!(
            verdict(&user, &none, "d", 90),
            Verdict::LoggedOut { .. }
        ));
    }

    #[test]
    fn logout_reasons_are_named_as_stored_and_locked_only_comes_with_a_lock() {
        let all = [
            LogoutReason::PasswordChanged,
            LogoutReason::LostDevice,
            LogoutReason::Admin,
            LogoutReason::Locked,
            LogoutReason::Security,
        ];
        let names: Vec<&str> = all.iter().map(|r| r.name()).collect();
        assert_eq!(names, REASONS);
        for r in all {
            let asked = LogoutReason::requested(r.name());
            assert_eq!(asked, (r != LogoutReason::Locked).then_some(r));
        }
        assert_eq!(LogoutReason::requested("other"), None);
    }
}
