//! Remote logout and account lock: which credentials the relay still honours, and carrying out
//! a logout on every node, live, by push, and at the next reconnect.
//!
//! Tokens are issued by the platform's account service; the relay cannot recall them, so it
//! remembers revocations instead. A **revocation** (of one device, or of every device of a user
//! but one) refuses every token issued at or before its time (`iat`, whole seconds). A new
//! login after the wipe gets a newer token and works. A **lock** refuses every token of the user
//! while it lasts and revokes the sessions that existed when it began, so an unlock never
//! resurrects them.
//!
//! The state is stored (both backends, one partition per user: a row per device, and a user
//! row with the device id `""`), so every node checks it at the upgrade; live sessions are
//! closed through the hub, and on other nodes through the cluster bus.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::audit::{Auditor, Event};
use crate::fanout::{Hub, Presence};
use crate::store::{DeviceRef, MessageStore, StoreError, now_ms};

/// Why a device was logged out. Travels in the `logout` frame and the audit trail.
pub const REASONS: &[&str] = &[
    "password_changed",
    "lost_device",
    "admin",
    "locked",
    "security",
];

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
    /// The device connected or disconnected; the user's org when the token names one.
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

/// The audit trail's way to the organisation a user belongs to now (their user row's).
pub fn org_lookup(store: Arc<dyn MessageStore>) -> crate::audit::OrgLookup {
    Arc::new(move |user: String| {
        let store = store.clone();
        Box::pin(async move { Ok(split(store.access(user, None).await?).0.org) })
    })
}

/// Splits the rows of [`MessageStore::access`] into the user row and the device rows.
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

/// What a logout did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The signal devices confirm.
    pub signal: Uuid,
    /// Devices logged out.
    pub devices: Vec<String>,
    /// Of them, connected somewhere in the cluster: closed live.
    pub live: Vec<String>,
    /// Of them, offline with a push registration: sent a background logout push.
    pub pushed: Vec<String>,
}

/// Carries out logouts and locks; the admin API's back end.
pub struct Access {
    /// Storage.
    pub store: Arc<dyn MessageStore>,
    /// This node's sessions.
    pub hub: Arc<Hub>,
    /// Cluster-wide presence (this node's hub on a single node).
    pub presence: Arc<dyn Presence>,
    /// Other nodes, in cluster mode.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The audit trail.
    pub audit: Arc<Auditor>,
    /// Background pushes, when push is configured.
    pub dispatcher: Option<Arc<push::Dispatcher<DeviceRef>>>,
    /// How long a session waits for `logout_ack` before closing.
    pub ack_wait: Duration,
}

impl Access {
    /// The user row and the device row of `device`.
    async fn rows(&self, device: &DeviceRef) -> Result<(AccessRow, AccessRow), StoreError> {
        let rows = self
            .store
            .access(device.user.to_string(), Some(device.device.to_string()))
            .await?;
        let (user, devices) = split(rows);
        let dev = devices
            .into_iter()
            .next()
            .map(|(_, r)| r)
            .unwrap_or_default();
        Ok((user, dev))
    }

    /// The verdict for a token of `device` issued at `iat`, and the user's organisation.
    pub async fn check(
        &self,
        device: &DeviceRef,
        iat: u64,
    ) -> Result<(Verdict, Option<String>), StoreError> {
        let (user, dev) = self.rows(device).await?;
        Ok((verdict(&user, &dev, &device.device, iat), user.org))
    }

    /// Decides again, from the stored state, once the session is registered with the hub (and
    /// subscribed to the bus): a logout stored before this read is seen here, and one stored
    /// after it reaches the registered session live. No time-limited memory is involved, so
    /// however long the upgrade took, a revoked token never gets a session.
    ///
    /// A login after a logout of the device starts afresh: the first such session records
    /// when the login began, and every session of it skips what was accepted before.
    pub async fn session_start(&self, device: &DeviceRef, iat: u64) -> Result<Start, StoreError> {
        let (user, dev) = self.rows(device).await?;
        let (start, record) = start(&user, &dev, &device.device, iat, now_ms());
        if let Some(change) = record {
            self.store
                .update_access(device.user.to_string(), device.device.to_string(), change)
                .await?;
        }
        Ok(start)
    }

    /// Logs `target` out: durable first, then live on every node, then pushes to offline
    /// devices. `actor` is the admin credential, for the audit trail.
    pub async fn logout(
        &self,
        target: Target,
        reason: &str,
        actor: &str,
    ) -> Result<Outcome, StoreError> {
        let user = target.user().to_string();
        let now = now_ms();
        let (device, except) = target.parts();
        let revocation = Revocation {
            at: now,
            reason: reason.into(),
            signal: Uuid::new_v4(),
            except: except.clone(),
        };
        let mut devices: Vec<String> = match &target {
            Target::Device(d) => vec![d.device.to_string()],
            Target::User { .. } => {
                let known = self.store.devices(user.clone()).await?;
                known.into_iter().filter(|d| target.includes(d)).collect()
            }
        };
        devices.sort();
        devices.dedup();
        if let Target::User {
            except: Some(spared),
            ..
        } = &target
        {
            // The spared device keeps only its newest tokens: an earlier user-wide revocation
            // still applies to it, so copy that to its own row before the user row moves on.
            let (user_row, rows) = split(
                self.store
                    .access(user.clone(), Some(spared.clone()))
                    .await?,
            );
            if let Some(old) = user_row
                .revoked
                .filter(|r| r.except.as_deref() != Some(spared))
            {
                let own = rows.first().and_then(|(_, r)| r.revoked.clone());
                if own.is_none_or(|own| own.at < old.at) {
                    let copy = Revocation {
                        except: None,
                        ..old
                    };
                    self.store
                        .update_access(user.clone(), spared.clone(), Change::Revoke(copy))
                        .await?;
                }
            }
        }
        if matches!(target, Target::User { .. }) {
            self.store
                .update_access(
                    user.clone(),
                    String::new(),
                    Change::Revoke(revocation.clone()),
                )
                .await?;
        }
        let per_device = Revocation {
            except: None,
            ..revocation.clone()
        };
        for d in &devices {
            self.store
                .update_access(user.clone(), d.clone(), Change::Revoke(per_device.clone()))
                .await?;
            self.store
                .set_pending_logout(DeviceRef::new(&user, d), Some(now))
                .await?;
        }
        self.audit.record(Event {
            user: Some(user.clone()),
            device,
            reason: Some(reason.into()),
            actor: Some(actor.into()),
            signal: Some(revocation.signal),
            via: except.map(|e| format!("all_but:{e}")),
            ..Event::new("logout_requested")
        });
        metrics::counter!("relay_logouts_requested_total", "reason" => reason_label(reason))
            .increment(devices.len() as u64);

        // Live: this node now, the others through the bus.
        self.hub
            .logout(&target, reason, revocation.signal, revocation.at);
        if let Some(c) = &self.cluster {
            c.logout(&target, reason, revocation.signal, revocation.at);
        }

        let mut live = Vec::new();
        let mut pushed = Vec::new();
        for d in &devices {
            let dref = DeviceRef::new(&user, d);
            if self.presence.is_online(&dref) {
                live.push(d.clone());
            } else if self.push_logout(&dref, revocation.signal).await {
                pushed.push(d.clone());
            }
        }
        tracing::info!(user = %user, devices = devices.len(), live = live.len(), pushed = pushed.len(), reason, "logout requested");
        Ok(Outcome {
            signal: revocation.signal,
            devices,
            live,
            pushed,
        })
    }

    /// Safety net for logouts whose live signal never arrived (bus down, a control message
    /// lost): a session on this node that began before a pending logout of its device is
    /// logged out now. `pending` comes from [`MessageStore::pending_logouts`].
    pub async fn enforce(&self, pending: &[(DeviceRef, u64)]) {
        for (device, requested_at) in pending {
            if self
                .hub
                .connected_since(device)
                .is_none_or(|s| s >= *requested_at)
            {
                continue;
            }
            let Ok(rows) = self
                .store
                .access(device.user.to_string(), Some(device.device.to_string()))
                .await
            else {
                continue;
            };
            let (_, rows) = split(rows);
            if let Some(r) = rows.into_iter().next().and_then(|(_, row)| row.revoked) {
                tracing::info!(user = %device.user, device = %device.device, "closing a session a logout missed");
                let target = Target::Device(device.clone());
                self.hub.logout(&target, &r.reason, r.signal, r.at);
            }
        }
    }

    /// Sends a background logout push and forgets the device's push registration, so it gets
    /// no more wake-ups. Whether a push was queued.
    async fn push_logout(&self, device: &DeviceRef, signal: Uuid) -> bool {
        let Some(dispatcher) = &self.dispatcher else {
            return false;
        };
        let token = match self.store.push_token(device.clone()).await {
            Ok(Some(t)) => t,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "push token lookup failed; logout waits for reconnect");
                return false;
            }
        };
        let queued = matches!(
            dispatcher.enqueue(device.clone(), token, push::Push::Logout { signal }),
            push::dispatch::Enqueued::Queued
        );
        if queued {
            if let Err(e) = self.store.set_push_token(device.clone(), None).await {
                tracing::warn!(error = %e, "push registration of a logged-out device not removed");
            }
            self.audit.record(Event {
                via: Some("push".into()),
                signal: Some(signal),
                ..Event::new("logout_delivered").device(device)
            });
        }
        queued
    }

    /// Locks `user`: refuses their tokens and logs every device out.
    pub async fn lock(&self, user: &str, reason: &str, actor: &str) -> Result<Outcome, StoreError> {
        self.store
            .update_access(
                user.into(),
                String::new(),
                Change::Lock(Some(Lock {
                    at: now_ms(),
                    reason: reason.into(),
                })),
            )
            .await?;
        self.audit.record(Event {
            user: Some(user.into()),
            reason: Some(reason.into()),
            actor: Some(actor.into()),
            ..Event::new("lock")
        });
        self.logout(
            Target::User {
                user: user.into(),
                except: None,
            },
            "locked",
            actor,
        )
        .await
    }

    /// Unlocks `user`. Sessions revoked by the lock stay revoked: the user logs in again.
    pub async fn unlock(&self, user: &str, actor: &str) -> Result<(), StoreError> {
        self.store
            .update_access(user.into(), String::new(), Change::Lock(None))
            .await?;
        self.audit.record(Event {
            user: Some(user.into()),
            actor: Some(actor.into()),
            ..Event::new("unlock")
        });
        Ok(())
    }

    /// The device confirmed that it wiped its data.
    pub async fn confirm(&self, device: &DeviceRef, signal: Uuid) -> Result<(), StoreError> {
        let user = device.user.to_string();
        self.store
            .update_access(
                user,
                device.device.to_string(),
                Change::Confirm(Confirmation {
                    signal,
                    at: now_ms(),
                }),
            )
            .await?;
        self.store.set_pending_logout(device.clone(), None).await?;
        metrics::counter!("relay_logouts_confirmed_total").increment(1);
        self.audit.record(Event {
            signal: Some(signal),
            ..Event::new("logout_confirmed").device(device)
        });
        Ok(())
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
}
