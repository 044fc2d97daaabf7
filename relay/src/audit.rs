//! The access audit trail (HIPAA audit controls): who connected, failed to authenticate, was
//! logged off, logged out, locked; and every admin API call with its actor.
//!
//! Metadata only: an [`Event`] has no field that could hold a payload, a token or a key.
//!
//! **Tamper evidence.** Records are partitioned by subject (a user id, `#anon` for failed
//! logins that name no valid user, `#org/<org>` for org-wide calls) and month. Within a
//! partition each node keeps its own chain: record `n` stores `prev` (the hash of record `n-1`,
//! zeros for `n = 0`) and `hash = SHA-256(prev ‖ entry)`. Node ids are unique among live nodes,
//! so chains never fork and appends need no lightweight transactions. [`verify`] recomputes
//! every chain: an edited record breaks its hash, a deleted one breaks the numbering or the
//! link of its successor.
//!
//! Appends are queued to one writer task per node ([`Auditor`]) so a connect never waits for the
//! audit store; the queue is large and a drop is counted (`relay_audit_dropped_total`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::store::{MessageStore, StoreError, now_ms};

/// Events that may wait for the writer before new ones are dropped (and counted).
const QUEUE: usize = 65_536;
/// Partition of failed logins that name no valid user.
pub const ANONYMOUS: &str = "#anon";

/// Partition of org-wide admin calls.
pub fn org_subject(org: &str) -> String {
    format!("#org/{org}")
}

/// One access event. Ids are validated identifiers; `detail` fields are fixed vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Time, ms since the Unix epoch.
    pub ts: u64,
    /// `connect`, `disconnect`, `idle_logoff`, `auth_failed`, `auth_throttled`,
    /// `logout_requested`, `logout_delivered`, `logout_confirmed`, `lock`, `unlock`,
    /// `admin_request`.
    pub event: String,
    /// User concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Device concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
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
    /// Admin request: `METHOD /path` and the status answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// HTTP status of an admin request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl Event {
    /// An event of kind `event` now.
    pub fn new(event: &str) -> Self {
        Event {
            ts: now_ms(),
            event: event.into(),
            ..Default::default()
        }
    }

    /// Sets user and device.
    pub fn device(mut self, d: &crate::store::DeviceRef) -> Self {
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
    fn subject(&self) -> String {
        self.user.clone().unwrap_or_else(|| ANONYMOUS.into())
    }
}

/// Month number (months since 1970-01) of a time in ms; the partition bucket.
pub fn month_of(ms: u64) -> u32 {
    // Civil-from-days (Howard Hinnant), enough for year and month.
    let days = (ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    ((year - 1970) * 12 + month - 1).clamp(0, i64::from(u32::MAX)) as u32
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
    /// The event as JSON, exactly as hashed.
    pub entry: String,
    /// Hash of the previous record in the chain.
    pub prev: [u8; 32],
    /// `SHA-256(prev ‖ entry)`.
    pub hash: [u8; 32],
}

fn link(prev: &[u8; 32], entry: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(entry.as_bytes());
    h.finalize().into()
}

/// Queues events for the audit store; cheap to call from any task.
pub struct Auditor {
    tx: mpsc::Sender<Msg>,
    node: u8,
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

impl Auditor {
    /// Starts the writer task for `node`.
    pub fn start(
        store: Arc<dyn MessageStore>,
        node: u8,
    ) -> (Arc<Auditor>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(writer(rx, store, node));
        (Arc::new(Auditor { tx, node }), task)
    }

    /// Records `event` (stamped with this node).
    pub fn record(&self, mut event: Event) {
        event.node = self.node;
        metrics::counter!("relay_audit_events_total", "event" => event_label(&event.event))
            .increment(1);
        if self.tx.try_send(Msg::Event(Box::new(event))).is_err() {
            metrics::counter!("relay_audit_dropped_total").increment(1);
            tracing::error!("audit queue full or closed: an access event was dropped");
        }
    }

    /// Waits until everything recorded so far is stored (bounded), so a query that follows
    /// sees this node's events.
    pub async fn flush(&self, within: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
    }
}

/// Metric label for an event kind (a fixed set, so the label stays bounded).
fn event_label(kind: &str) -> &'static str {
    match kind {
        "connect" => "connect",
        "disconnect" => "disconnect",
        "idle_logoff" => "idle_logoff",
        "auth_failed" => "auth_failed",
        "auth_throttled" => "auth_throttled",
        "logout_requested" => "logout_requested",
        "logout_delivered" => "logout_delivered",
        "logout_confirmed" => "logout_confirmed",
        "lock" => "lock",
        "unlock" => "unlock",
        "admin_request" => "admin_request",
        _ => "other",
    }
}

/// Chain heads this node knows; re-read from the store on a miss.
const MAX_HEADS: usize = 100_000;

async fn writer(mut rx: mpsc::Receiver<Msg>, store: Arc<dyn MessageStore>, node: u8) {
    let mut heads: HashMap<Chain, (u64, [u8; 32])> = HashMap::new();
    let mut buf = Vec::new();
    while rx.recv_many(&mut buf, 512).await > 0 {
        let mut records = Vec::new();
        let mut flushes = Vec::new();
        for msg in buf.drain(..) {
            match msg {
                Msg::Flush(done) => flushes.push(done),
                Msg::Event(event) => {
                    let chain = Chain {
                        subject: event.subject(),
                        month: month_of(event.ts),
                        node,
                    };
                    if heads.len() >= MAX_HEADS {
                        heads.clear();
                    }
                    if !heads.contains_key(&chain) {
                        let head = retry(|| store.audit_tail(chain.clone())).await;
                        let head = head.map_or((u64::MAX, [0u8; 32]), |(n, h)| (n, h));
                        heads.insert(chain.clone(), head);
                    }
                    let Some(head) = heads.get_mut(&chain) else {
                        continue;
                    };
                    let entry = serde_json::to_string(&event).unwrap_or_default();
                    let n = head.0.wrapping_add(1);
                    let hash = link(&head.1, &entry);
                    records.push(Record {
                        chain,
                        n,
                        ts: event.ts,
                        entry,
                        prev: head.1,
                        hash,
                    });
                    *head = (n, hash);
                }
            }
        }
        if !records.is_empty() {
            let count = records.len() as u64;
            retry(|| store.audit_append(records.clone())).await;
            metrics::counter!("relay_audit_records_written_total").increment(count);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Retries a store call until it succeeds: the audit trail waits out an outage rather than
/// losing records (the queue in front absorbs the wait; beyond it, events are counted dropped).
async fn retry<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => {
                metrics::counter!("relay_audit_store_errors_total").increment(1);
                tracing::warn!(error = %e, "audit store write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A problem [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Chain it is in.
    pub chain: Chain,
    /// Record position.
    pub n: u64,
    /// What is wrong.
    pub problem: &'static str,
}

/// Checks one partition's records (any order). `expired_before`: a chain whose first record
/// is older than this may start after 0 (its oldest records left by retention).
pub fn verify_partition(records: &[Record], expired_before: u64) -> (u64, Vec<Finding>) {
    let mut chains: HashMap<&Chain, Vec<&Record>> = HashMap::new();
    for r in records {
        chains.entry(&r.chain).or_default().push(r);
    }
    let mut findings = Vec::new();
    for (chain, mut recs) in chains {
        recs.sort_by_key(|r| r.n);
        let mut expect: Option<(u64, [u8; 32])> = None;
        for r in recs {
            let finding = |problem| Finding {
                chain: chain.clone(),
                n: r.n,
                problem,
            };
            if link(&r.prev, &r.entry) != r.hash {
                findings.push(finding(
                    "record edited: its hash does not match its contents",
                ));
            }
            match expect {
                None if r.n != 0 && r.ts >= expired_before => {
                    findings.push(finding(
                        "records missing before this one (chain starts late)",
                    ));
                }
                None if r.n == 0 && r.prev != [0; 32] => {
                    findings.push(finding("first record links to a predecessor"));
                }
                Some((n, _)) if r.n != n + 1 => {
                    findings.push(finding(
                        "records missing before this one (gap in numbering)",
                    ));
                }
                Some((_, hash)) if r.prev != hash => {
                    findings.push(finding(
                        "does not link to the previous record (edited or replaced)",
                    ));
                }
                _ => {}
            }
            expect = Some((r.n, r.hash));
        }
    }
    findings.sort_by(|a, b| (&a.chain, a.n).cmp(&(&b.chain, b.n)));
    (records.len() as u64, findings)
}

/// Outcome of verifying a store's audit trail.
#[derive(Debug, Default)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Partitions checked.
    pub partitions: u64,
    /// Problems.
    pub findings: Vec<Finding>,
}

/// Verifies every partition (or those of `subject`).
pub async fn verify(
    store: &dyn MessageStore,
    subject: Option<&str>,
    retention_ms: u64,
) -> Result<Verified, StoreError> {
    let expired_before = now_ms().saturating_sub(retention_ms.saturating_sub(31 * 86_400_000));
    let mut out = Verified::default();
    for (s, month) in store.audit_partitions().await? {
        if subject.is_some_and(|want| want != s) {
            continue;
        }
        let records = store.audit_read(s, month).await?;
        let (n, findings) = verify_partition(&records, expired_before);
        out.records += n;
        out.partitions += 1;
        out.findings.extend(findings);
    }
    Ok(out)
}

/// A page of audit query results.
#[derive(Debug, Serialize)]
pub struct Page {
    /// Events, oldest first.
    pub events: Vec<Event>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Events of `subject` (optionally one device) with `from <= ts < to`, oldest first, `limit`
/// per page, after `cursor` (from a previous page's `next`).
pub async fn query(
    store: &dyn MessageStore,
    subject: &str,
    device: Option<&str>,
    from: u64,
    to: u64,
    limit: usize,
    cursor: Option<(u64, u8, u64)>,
) -> Result<Page, StoreError> {
    let mut rows: Vec<((u64, u8, u64), Event)> = Vec::new();
    // An inclusive range cannot wrap, whatever the months are.
    for month in month_of(from)..=month_of(to.saturating_sub(1)) {
        for r in store.audit_read(subject.to_string(), month).await? {
            let key = (r.ts, r.chain.node, r.n);
            if r.ts < from || r.ts >= to || cursor.is_some_and(|c| key <= c) {
                continue;
            }
            let Ok(event) = serde_json::from_str::<Event>(&r.entry) else {
                continue;
            };
            if device.is_some_and(|d| event.device.as_deref() != Some(d)) {
                continue;
            }
            rows.push((key, event));
        }
    }
    rows.sort_by_key(|(k, _)| *k);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more
        .then(|| {
            rows.last()
                .map(|((ts, node, n), _)| format!("{ts}.{node}.{n}"))
        })
        .flatten();
    Ok(Page {
        events: rows.into_iter().map(|(_, e)| e).collect(),
        next,
    })
}

/// Parses a `cursor` from [`Page::next`].
pub fn parse_cursor(s: &str) -> Option<(u64, u8, u64)> {
    let mut it = s.split('.');
    let c = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    it.next().is_none().then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(entries: &[&str]) -> Vec<Record> {
        let chain = Chain {
            subject: "alice".into(),
            month: 671,
            node: 0,
        };
        let mut prev = [0u8; 32];
        entries
            .iter()
            .enumerate()
            .map(|(n, e)| {
                let hash = link(&prev, e);
                let r = Record {
                    chain: chain.clone(),
                    n: n as u64,
                    ts: now_ms(),
                    entry: e.to_string(),
                    prev,
                    hash,
                };
                prev = hash;
                r
            })
            .collect()
    }

    #[test]
    fn months_are_calendar_months() {
        assert_eq!(month_of(0), 0);
        assert_eq!(month_of(1_767_225_600_000), 56 * 12); // 2026-01-01
        assert_eq!(month_of(1_767_225_599_999), 56 * 12 - 1); // 2025-12-31
        assert_eq!(month_of(1_772_323_200_000), 56 * 12 + 2); // 2026-03-01
    }

    #[test]
    fn intact_chain_verifies_and_edits_or_deletions_do_not() {
        let recs = chain_of(&["a", "b", "c", "d"]);
        assert_eq!(verify_partition(&recs, 0), (4, vec![]));

        let mut edited = recs.clone();
        edited[1].entry = "B".into();
        let (_, f) = verify_partition(&edited, 0);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].n, 1);

        // An edit that also recomputes the record's own hash breaks the next link.
        let mut rehashed = recs.clone();
        rehashed[1].entry = "B".into();
        rehashed[1].hash = link(&rehashed[1].prev, "B");
        let (_, f) = verify_partition(&rehashed, 0);
        assert_eq!(f.iter().map(|f| f.n).collect::<Vec<_>>(), vec![2]);

        let mut deleted = recs.clone();
        deleted.remove(2);
        let (_, f) = verify_partition(&deleted, 0);
        assert_eq!(f.iter().map(|f| f.n).collect::<Vec<_>>(), vec![3]);

        let mut first_gone = recs;
        first_gone.remove(0);
        assert_eq!(verify_partition(&first_gone, 0).1.len(), 1);
        // ... unless retention removed it.
        assert!(verify_partition(&first_gone, u64::MAX).1.is_empty());
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor("17.3.9"), Some((17, 3, 9)));
        assert_eq!(parse_cursor("17.3"), None);
        assert_eq!(parse_cursor("17.300.9"), None);
    }
}
