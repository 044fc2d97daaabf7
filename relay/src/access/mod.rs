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

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::audit::{Auditor, Event, EventKind};
use crate::fanout::{Hub, LiveLogout, Presence};
use crate::store::{DeviceRef, MessageStore, StoreError, now_ms};

pub mod model;

pub use model::{
    AccessRow, Change, Confirmation, ISSUER_SKEW_S, Lock, LogoutReason, REASONS, Revocation, Start,
    Target, Verdict, covers, reason_label, revocation, seen_lately, split, start, verdict,
};

/// The audit trail's way to the organisation a user belongs to now (their user row's).
pub fn org_lookup(store: Arc<dyn MessageStore>) -> crate::audit::OrgLookup {
    Arc::new(move |user: String| {
        let store = store.clone();
        Box::pin(async move { Ok(split(store.access(user, None).await?).0.org) })
    })
}

/// What the access check at the upgrade decided.
#[derive(Debug)]
pub struct Checked {
    /// Allowed, locked or logged out.
    pub verdict: Verdict,
    /// The user's organisation now.
    pub org: Option<String>,
    /// When allowed with no floor: the read its session may start on.
    pub opening: Option<Opening>,
    /// The rows already hold what the session's connect would record ([`seen_lately`]).
    pub seen_lately: bool,
}

/// An allowed session of a login that needs no floor (the device was never logged out, the
/// common case), as read by the check at its upgrade: [`LiveLogout::logouts_taken`] before
/// the read, plus one. Eight bytes, since every connection holds it until its session
/// starts; any other start is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening(NonZeroU64);

impl Opening {
    fn after(logouts: u64) -> Option<Opening> {
        NonZeroU64::new(logouts.wrapping_add(1)).map(Opening)
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
    /// Live sessions a logout closes: this node's hub, or the cluster (every node).
    pub live: Arc<dyn LiveLogout>,
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

    /// The verdict for a token of `device` issued at `iat` naming `org`, the user's
    /// organisation, and (when allowed) how its session starts, as of this read.
    pub async fn check(
        &self,
        device: &DeviceRef,
        iat: u64,
        org: Option<&str>,
    ) -> Result<Checked, StoreError> {
        // Before the read: a logout taken after it moves the count.
        let logouts = self.live.logouts_taken();
        let (user, dev) = self.rows(device).await?;
        let verdict = verdict(&user, &dev, &device.device, iat);
        let now = now_ms();
        let opening = match start(&user, &dev, &device.device, iat, now) {
            (Start::Open { floor_ms: 0 }, None) => logouts.and_then(Opening::after),
            _ => None,
        };
        Ok(Checked {
            verdict,
            seen_lately: seen_lately(&user, &dev, org, iat, now),
            org: user.org,
            opening,
        })
    }

    /// Decides, once the session is registered with the hub (and subscribed to the bus): a
    /// logout stored after this decision reaches the registered session live. No
    /// time-limited memory is involved, so however long the upgrade took, a revoked token
    /// never gets a session.
    ///
    /// The check's `opening` decides if no logout reached this node since the check's read
    /// (nor may have, the bus being down or having lost some): a logout stored after that
    /// read has either reached this node by now, and the rows are read again, or will reach
    /// the registered session live.
    ///
    /// A login after a logout of the device starts afresh: the first such session records
    /// when the login began, and every session of it skips what was accepted before.
    pub async fn session_start(
        &self,
        device: &DeviceRef,
        iat: u64,
        opening: Option<Opening>,
    ) -> Result<Start, StoreError> {
        let (start, record) = match opening {
            Some(o) if self.live.logouts_taken().and_then(Opening::after) == Some(o) => {
                (Start::Open { floor_ms: 0 }, None)
            }
            _ => {
                let (user, dev) = self.rows(device).await?;
                start(&user, &dev, &device.device, iat, now_ms())
            }
        };
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
        reason: LogoutReason,
        actor: &str,
    ) -> Result<Outcome, StoreError> {
        let reason = reason.name();
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
            self.keep_earlier_revocation(&user, spared).await?;
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
            ..Event::new(EventKind::LogoutRequested)
        });
        metrics::counter!("relay_logouts_requested_total", "reason" => reason_label(reason))
            .increment(devices.len() as u64);

        self.live
            .sign_out(&target, reason, revocation.signal, revocation.at);

        let (live, pushed) = self.reach(&user, &devices, revocation.signal).await;
        tracing::info!(user = %user, devices = devices.len(), live = live.len(), pushed = pushed.len(), reason, "logout requested");
        Ok(Outcome {
            signal: revocation.signal,
            devices,
            live,
            pushed,
        })
    }

    /// Before a logout of every device of `user` but `spared`: the spared device keeps only its
    /// newest tokens, so an earlier user-wide revocation still applies to it; copy that to its
    /// own row before the user row moves on.
    async fn keep_earlier_revocation(&self, user: &str, spared: &str) -> Result<(), StoreError> {
        let (user_row, rows) = split(
            self.store
                .access(user.to_string(), Some(spared.to_string()))
                .await?,
        );
        let Some(old) = user_row
            .revoked
            .filter(|r| r.except.as_deref() != Some(spared))
        else {
            return Ok(());
        };
        let own = rows.first().and_then(|(_, r)| r.revoked.clone());
        if own.is_none_or(|own| own.at < old.at) {
            let copy = Revocation {
                except: None,
                ..old
            };
            self.store
                .update_access(user.to_string(), spared.to_string(), Change::Revoke(copy))
                .await?;
        }
        Ok(())
    }

    /// Which of the logged-out `devices` are connected (closed live), and which were sent a
    /// background logout push.
    async fn reach(
        &self,
        user: &str,
        devices: &[String],
        signal: Uuid,
    ) -> (Vec<String>, Vec<String>) {
        let mut live = Vec::new();
        let mut pushed = Vec::new();
        for d in devices {
            let dref = DeviceRef::new(user, d);
            if self.presence.is_online(&dref) {
                live.push(d.clone());
            } else if self.push_logout(&dref, signal).await {
                pushed.push(d.clone());
            }
        }
        (live, pushed)
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
                ..Event::new(EventKind::LogoutDelivered).device(device)
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
            ..Event::new(EventKind::Lock)
        });
        self.logout(
            Target::User {
                user: user.into(),
                except: None,
            },
            LogoutReason::Locked,
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
            ..Event::new(EventKind::Unlock)
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
            ..Event::new(EventKind::LogoutConfirmed).device(device)
        });
        Ok(())
    }
}
