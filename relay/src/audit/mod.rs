//! The access audit trail (HIPAA audit controls): who connected, failed to authenticate, was
//! logged off, logged out, locked; and every admin API call with its actor.
//!
//! Metadata only: an [`Event`] has no field that could hold a payload, a token or a key.
//!
//! **Evidence, not just a log.** Records are partitioned by subject (a user id, `#anon` for
//! failed logins that name no known user, `#org/<org>` for org-wide calls) and month. Within a
//! partition each node keeps its own chain: record `n` stores `prev` (the MAC of record `n-1`,
//! zeros for `n = 0`) and `hash = HMAC-SHA256(audit key, chain ‖ n ‖ prev ‖ entry)`. The audit
//! key is held outside the database ([`AuditKeys`]), so someone who can write the database can
//! neither edit a record nor rebuild a chain. Node ids are unique among live nodes, so chains
//! never fork and appends need no lightweight transactions.
//!
//! Deleting the newest records, a whole month or one node's chain leaves a shorter chain that
//! still links; **checkpoints** catch that. At a fixed interval (and when the relay stops) the
//! writer emits a [`Checkpoint`]: the head of every chain it appended to, MAC'd with the audit
//! key, as a JSON line in the log stream and in an append-only file that operators ship to
//! write-once storage. [`verify`] recomputes every chain and holds it against the checkpoints:
//! an edited, inserted, reordered or deleted record is a finding, and so is a chain that ends
//! before, or differs from, the head a checkpoint names.
//!
//! Appends are queued to one writer task per node ([`Auditor`]) so a connect never waits for the
//! audit store; the queue is large and a drop is counted (`relay_audit_dropped_total`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use futures_util::future::BoxFuture;

use crate::store::{AuditLog, StoreError, now_ms};

pub mod model;

pub use model::{ANONYMOUS, Chain, Event, EventKind, Head, Record, civil_date, month_of};

/// Events that may wait for the writer before new ones are dropped (and counted).
const QUEUE: usize = 65_536;
/// Partition of org-wide admin calls.
pub fn org_subject(org: &str) -> String {
    format!("#org/{org}")
}

/// Length of an org report partition. An hour of a large org's events is read whole (a
/// 5,000-user org makes a few thousand), so a page never holds more than an hour or two in
/// memory; a month is 720 partitions, read several at a time.
const REPORT_BUCKET_MS: u64 = 3_600_000;

/// Partition of an org's reported events in the hour `bucket` (hours since the epoch): the
/// org report reads these alone, never another org's or a user's partitions.
pub fn org_report_subject(org: &str, bucket: u64) -> String {
    format!("#org-report/{org}/{bucket}")
}

/// The organisation a user belongs to now, for events whose recorder did not name it (given
/// by the access layer, which holds the user rows).
pub type OrgLookup =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<Option<String>, StoreError>> + Send + Sync>;

/// Errors of the audit key configuration.
#[derive(Debug, thiserror::Error)]
#[error("audit keys: {0}")]
pub struct KeyError(String);

/// The audit keys: HMAC-SHA256 keys held outside the database. The active one keys new records
/// and checkpoints; every listed one verifies, so keys rotate like the at-rest keys.
pub struct AuditKeys {
    keys: HashMap<String, hmac::Key>,
    active: String,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("AuditKeys")
            .field("active", &self.active)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl AuditKeys {
    /// Keys from `kid:base64key` entries (as the at-rest keys) and the id of the active one.
    pub fn parse(spec: &str, active: &str) -> Result<Self, KeyError> {
        let raw = crate::seal::parse_keys(spec).map_err(|e| match e {
            crate::seal::SealError::Config(m) => KeyError(m),
            other => KeyError(other.to_string()),
        })?;
        if !raw.contains_key(active) {
            return Err(KeyError(format!("active key `{active}` is not listed")));
        }
        let keys = raw
            .into_iter()
            .map(|(kid, k)| (kid, hmac::Key::new(hmac::HMAC_SHA256, &k)))
            .collect();
        Ok(AuditKeys {
            keys,
            active: active.to_string(),
        })
    }

    /// Id of the key that MACs new records and checkpoints.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// HMAC-SHA256 of length-prefixed `parts` under key `kid`; `None` if no such key.
    fn mac(&self, kid: &str, parts: &[&[u8]]) -> Option<[u8; 32]> {
        let mut ctx = hmac::Context::with_key(self.keys.get(kid)?);
        for part in parts {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.sign().as_ref().try_into().ok()
    }

    /// The MAC of record `n` of `chain`.
    fn link(
        &self,
        kid: &str,
        chain: &Chain,
        n: u64,
        prev: &[u8; 32],
        entry: &str,
    ) -> Option<[u8; 32]> {
        self.mac(
            kid,
            &[
                b"relay audit record v1",
                chain.subject.as_bytes(),
                &chain.month.to_be_bytes(),
                &[chain.node],
                &n.to_be_bytes(),
                prev,
                entry.as_bytes(),
            ],
        )
    }
}

/// One chain's last record as a checkpoint names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointHead {
    /// Partition subject.
    pub subject: String,
    /// Partition month.
    pub month: u32,
    /// Position of the chain's last record.
    pub n: u64,
    /// Its MAC, base64.
    pub hash: String,
}

/// Heads of the chains one node appended to, MAC'd with the audit key: kept outside the
/// database (log stream, append-only file), they make deleting the newest records, a month or
/// a node's chain evident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Always `"relay-audit-checkpoint/1"`.
    pub kind: String,
    /// Node whose chains these are.
    pub node: u8,
    /// When (ms since the Unix epoch).
    pub ts: u64,
    /// Audit key of the MAC.
    pub key_id: String,
    /// Chain heads, by subject and month.
    pub heads: Vec<CheckpointHead>,
    /// `HMAC-SHA256(key, every field above)`, base64.
    pub mac: String,
}

const CHECKPOINT_KIND: &str = "relay-audit-checkpoint/1";

impl Checkpoint {
    fn body_mac(&self, keys: &AuditKeys) -> Option<[u8; 32]> {
        let unsigned = Checkpoint {
            mac: String::new(),
            ..self.clone()
        };
        let body = serde_json::to_vec(&unsigned).ok()?;
        keys.mac(&self.key_id, &[b"relay audit checkpoint v1", &body])
    }

    /// A checkpoint of `heads` (chains of `node`), MAC'd with the active key.
    pub fn sign(keys: &AuditKeys, node: u8, ts: u64, heads: Vec<CheckpointHead>) -> Self {
        let mut c = Checkpoint {
            kind: CHECKPOINT_KIND.into(),
            node,
            ts,
            key_id: keys.active_id().into(),
            heads,
            mac: String::new(),
        };
        c.mac = c.body_mac(keys).map(|m| B64.encode(m)).unwrap_or_default();
        c
    }

    /// Whether the MAC holds under one of `keys`.
    pub fn authentic(&self, keys: &AuditKeys) -> bool {
        self.kind == CHECKPOINT_KIND
            && self
                .body_mac(keys)
                .is_some_and(|m| B64.encode(m) == self.mac)
    }
}

/// Where checkpoints go besides the log stream, and how often.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// Interval between checkpoints (each names the chains appended to since the last).
    pub interval: Duration,
    /// Append-only file of JSON lines, synced after each line.
    pub file: Option<std::path::PathBuf>,
}

/// Queues events for the audit store; cheap to call from any task.
pub struct Auditor {
    tx: mpsc::Sender<Msg>,
    node: u8,
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
    Checkpoint(oneshot::Sender<()>),
}

impl Auditor {
    /// Starts the writer task for `node`.
    pub fn start(
        store: Arc<dyn AuditLog>,
        node: u8,
        keys: Arc<AuditKeys>,
        checkpoints: Checkpoints,
        orgs: Option<OrgLookup>,
    ) -> (Arc<Auditor>, tokio::task::JoinHandle<()>) {
        Self::start_with_heads(store, node, keys, checkpoints, orgs, MAX_HEADS)
    }

    /// [`start`](Self::start) with room for `max_heads` chain heads in memory (tests use few).
    pub fn start_with_heads(
        store: Arc<dyn AuditLog>,
        node: u8,
        keys: Arc<AuditKeys>,
        checkpoints: Checkpoints,
        orgs: Option<OrgLookup>,
        max_heads: usize,
    ) -> (Arc<Auditor>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            store,
            node,
            keys,
            checkpoints,
            orgs,
            max_heads: max_heads.max(1),
            heads: HashMap::new(),
            unchecked: HashMap::new(),
        };
        let task = tokio::spawn(writer.run(rx));
        (Arc::new(Auditor { tx, node }), task)
    }

    /// Records `event` (stamped with this node).
    pub fn record(&self, mut event: Event) {
        event.node = self.node;
        metrics::counter!("relay_audit_events_total", "event" => event.event.name()).increment(1);
        if self.tx.try_send(Msg::Event(Box::new(event))).is_err() {
            metrics::counter!("relay_audit_dropped_total").increment(1);
            tracing::error!("audit queue full or closed: an access event was dropped");
        }
    }

    /// Waits until everything recorded so far is stored (bounded), so a query that follows
    /// sees this node's events.
    pub async fn flush(&self, within: Duration) {
        self.ask(Msg::Flush, within).await
    }

    /// Stores everything recorded so far, then writes a checkpoint of it (bounded): at shutdown,
    /// so that the last records are covered too.
    pub async fn checkpoint(&self, within: Duration) {
        self.ask(Msg::Checkpoint, within).await
    }

    async fn ask(&self, msg: impl FnOnce(oneshot::Sender<()>) -> Msg, within: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(msg(tx)).await.is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
    }
}

/// Chain heads per checkpoint line.
const CHECKPOINT_HEADS: usize = 1_000;

/// Chain heads this node knows; re-read from the store on a miss.
const MAX_HEADS: usize = 100_000;

/// Chain heads read from the store at once.
const HEAD_READS: usize = 32;

struct Writer {
    store: Arc<dyn AuditLog>,
    node: u8,
    keys: Arc<AuditKeys>,
    checkpoints: Checkpoints,
    orgs: Option<OrgLookup>,
    max_heads: usize,
    heads: HashMap<Chain, Head>,
    /// Heads stored since the last checkpoint.
    unchecked: HashMap<Chain, Head>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(self.checkpoints.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut buf = Vec::new();
        loop {
            tokio::select! {
                n = rx.recv_many(&mut buf, 512) => {
                    if n == 0 {
                        break;
                    }
                    self.batch(&mut buf).await;
                }
                _ = tick.tick() => self.checkpoint().await,
            }
        }
        self.checkpoint().await;
    }

    async fn batch(&mut self, buf: &mut Vec<Msg>) {
        // Forget heads only between batches: a head read back from the store while this
        // batch's records are still unwritten would be stale, and its next record would
        // overwrite a queued one.
        if self.heads.len() >= self.max_heads {
            self.heads.clear();
        }
        self.resolve_orgs(buf).await;
        let mut links = Vec::new();
        let (mut flushes, mut checkpoints) = (Vec::new(), Vec::new());
        for msg in buf.drain(..) {
            let event = match msg {
                Msg::Flush(done) => {
                    flushes.push(done);
                    continue;
                }
                Msg::Checkpoint(done) => {
                    checkpoints.push(done);
                    continue;
                }
                Msg::Event(event) => event,
            };
            let entry: Arc<str> = serde_json::to_string(&event).unwrap_or_default().into();
            let month = month_of(event.ts);
            let mut subjects = vec![event.subject()];
            if let Some(org) = event.org.as_deref().filter(|_| event.event.reported()) {
                // The same record again in the org's report partition, chained like the rest.
                subjects.push(org_report_subject(org, event.ts / REPORT_BUCKET_MS));
            }
            for subject in subjects {
                let chain = Chain {
                    subject,
                    month,
                    node: self.node,
                };
                links.push((chain, event.ts, entry.clone()));
            }
        }
        let mut missing = HashSet::new();
        for (chain, _, _) in &links {
            if !self.heads.contains_key(chain) {
                missing.insert(chain.clone());
            }
        }
        self.read_heads(missing).await;
        let records: Vec<Record> = links
            .into_iter()
            .filter_map(|(chain, ts, entry)| self.link(chain, ts, &entry))
            .collect();
        if !records.is_empty() {
            let count = records.len() as u64;
            retry(|| self.store.audit_append(records.clone())).await;
            metrics::counter!("relay_audit_records_written_total").increment(count);
            for r in records {
                self.unchecked.insert(r.chain, (r.n, r.hash));
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
        if !checkpoints.is_empty() {
            self.checkpoint().await;
            for done in checkpoints {
                let _ = done.send(());
            }
        }
    }

    /// Reads the heads of the chains this node does not know yet, together: in a storm of new
    /// users every connect starts a chain, and a round trip each would hold the trail back.
    async fn read_heads(&mut self, missing: HashSet<Chain>) {
        use futures_util::StreamExt as _;
        let store = &self.store;
        let heads: Vec<(Chain, Option<Head>)> = futures_util::stream::iter(missing)
            .map(|chain| async move {
                let head = retry(|| store.audit_tail(chain.clone())).await;
                (chain, head)
            })
            .buffer_unordered(HEAD_READS)
            .collect()
            .await;
        for (chain, head) in heads {
            self.heads
                .insert(chain, head.unwrap_or((u64::MAX, [0u8; 32])));
        }
    }

    /// The next record of `chain`, linked to its head ([`Writer::read_heads`] read it).
    fn link(&mut self, chain: Chain, ts: u64, entry: &str) -> Option<Record> {
        let head = self.heads.get_mut(&chain)?;
        let n = head.0.wrapping_add(1);
        let kid = self.keys.active_id();
        let hash = self.keys.link(kid, &chain, n, &head.1, entry)?;
        let record = Record {
            chain,
            n,
            ts,
            entry: entry.to_string(),
            prev: head.1,
            hash,
            key_id: kid.to_string(),
        };
        *head = (n, hash);
        Some(record)
    }

    /// Names the organisation of reported events whose recorder did not: the user's current
    /// one, looked up once per user and batch.
    async fn resolve_orgs(&self, buf: &mut [Msg]) {
        let Some(lookup) = &self.orgs else {
            return;
        };
        let mut known: HashMap<String, Option<String>> = HashMap::new();
        for msg in buf.iter_mut() {
            let Msg::Event(event) = msg else {
                continue;
            };
            if event.org.is_some() || event.org_known || !event.event.reported() {
                continue;
            }
            let Some(user) = event.user.clone() else {
                continue;
            };
            if !known.contains_key(&user) {
                let org = retry(|| lookup(user.clone())).await;
                known.insert(user.clone(), org);
            }
            event.org = known.get(&user).cloned().flatten();
        }
    }

    /// Emits a checkpoint of the heads stored since the last one (none if nothing was).
    async fn checkpoint(&mut self) {
        if self.unchecked.is_empty() {
            return;
        }
        let mut heads: Vec<CheckpointHead> = self
            .unchecked
            .iter()
            .map(|(c, (n, hash))| CheckpointHead {
                subject: c.subject.clone(),
                month: c.month,
                n: *n,
                hash: B64.encode(hash),
            })
            .collect();
        heads.sort_by(|a, b| (&a.subject, a.month).cmp(&(&b.subject, b.month)));
        // Many chains make several lines, so no log line grows with the number of users.
        let ts = now_ms();
        let lines: Vec<String> = heads
            .chunks(CHECKPOINT_HEADS)
            .map(|part| {
                let checkpoint = Checkpoint::sign(&self.keys, self.node, ts, part.to_vec());
                serde_json::to_string(&checkpoint).unwrap_or_default()
            })
            .collect();
        for line in &lines {
            tracing::info!(target: "relay::audit::checkpoint", checkpoint = %line, "audit checkpoint");
        }
        let count = lines.len() as u64;
        if let Some(path) = self.checkpoints.file.clone() {
            let write =
                tokio::task::spawn_blocking(move || append_line(&path, &lines.join("\n"))).await;
            if !matches!(write, Ok(Ok(()))) {
                // Kept for the next checkpoint; the log stream has this one.
                metrics::counter!("relay_audit_checkpoint_errors_total").increment(1);
                tracing::error!("audit checkpoint file not written; retrying next interval");
                return;
            }
        }
        self.unchecked.clear();
        metrics::counter!("relay_audit_checkpoints_total").increment(count);
        metrics::gauge!("relay_audit_last_checkpoint_timestamp_seconds")
            .set(now_ms() as f64 / 1000.0);
    }
}

/// Appends one line to an append-only file and syncs it.
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

/// First and longest wait between tries of a failing audit store write.
const STORE_RETRY_FIRST: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Retries a store call until it succeeds: the audit trail waits out an outage rather than
/// losing records (the queue in front absorbs the wait; beyond it, events are counted dropped).
async fn retry<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = STORE_RETRY_FIRST;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => {
                metrics::counter!("relay_audit_store_errors_total").increment(1);
                tracing::warn!(error = %e, "audit store write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(STORE_RETRY_MAX);
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
pub fn verify_partition(
    records: &[Record],
    expired_before: u64,
    keys: &AuditKeys,
) -> (u64, Vec<Finding>) {
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
            match keys.link(&r.key_id, chain, r.n, &r.prev, &r.entry) {
                _ if r.key_id.is_empty() => findings.push(finding(
                    "not keyed (no audit key id): anyone who can write the database could have written it",
                )),
                None => findings.push(finding("keyed with an audit key not configured here")),
                Some(mac) if mac != r.hash => findings.push(finding(
                    "record edited, moved or forged: its MAC does not match",
                )),
                Some(_) => {}
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

/// Holds the stored chains against the checkpoints: every chain head a checkpoint names (of
/// `subject`, or all) must be in the store, unchanged, unless its month is older than
/// `expired_month` (left by retention). `stored`: every stored chain, with the MACs of (at least)
/// the positions the checkpoints name.
pub fn verify_checkpoints(
    checkpoints: &[Checkpoint],
    stored: &HashMap<Chain, HashMap<u64, [u8; 32]>>,
    expired_month: u32,
    keys: &AuditKeys,
    subject: Option<&str>,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut latest: HashMap<Chain, (u64, &str)> = HashMap::new();
    for (line, c) in checkpoints.iter().enumerate() {
        if !c.authentic(keys) {
            findings.push(Finding {
                chain: Chain {
                    subject: "(checkpoints)".into(),
                    month: 0,
                    node: c.node,
                },
                n: line as u64 + 1,
                problem: "checkpoint forged or altered: its MAC does not match",
            });
            continue;
        }
        for h in c
            .heads
            .iter()
            .filter(|h| subject.is_none_or(|s| s == h.subject))
        {
            let chain = Chain {
                subject: h.subject.clone(),
                month: h.month,
                node: c.node,
            };
            let e = latest.entry(chain).or_insert((h.n, &h.hash));
            if h.n >= e.0 {
                *e = (h.n, &h.hash);
            }
        }
    }
    for (chain, (n, hash)) in latest {
        if chain.month < expired_month {
            continue;
        }
        let problem = match stored.get(&chain) {
            None => "chain deleted: a checkpoint names it (a deleted month or node's chain)",
            Some(records) => match records.get(&n) {
                None => "records deleted: the chain ends before the head a checkpoint names",
                Some(mac) if B64.encode(mac) != hash => {
                    "record replaced: it differs from the head a checkpoint names"
                }
                Some(_) => continue,
            },
        };
        findings.push(Finding { chain, n, problem });
    }
    findings.sort_by(|a, b| (&a.chain, a.n).cmp(&(&b.chain, b.n)));
    findings
}

/// Outcome of verifying a store's audit trail.
#[derive(Debug, Default)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Partitions checked.
    pub partitions: u64,
    /// Checkpoints held against the store.
    pub checkpoints: u64,
    /// Problems.
    pub findings: Vec<Finding>,
}

/// Verifies every partition (or those of `subject`), and holds them against `checkpoints`.
pub async fn verify(
    store: &dyn AuditLog,
    subject: Option<&str>,
    retention_ms: u64,
    keys: &AuditKeys,
    checkpoints: &[Checkpoint],
) -> Result<Verified, StoreError> {
    let now = now_ms();
    let expired_before = now.saturating_sub(retention_ms.saturating_sub(31 * 86_400_000));
    let expired_month = month_of(now.saturating_sub(retention_ms));
    let mut partitions: std::collections::BTreeSet<(String, u32)> =
        store.audit_partitions().await?.into_iter().collect();
    // A partition a checkpoint names is read even if the store no longer lists it.
    for c in checkpoints {
        partitions.extend(c.heads.iter().map(|h| (h.subject.clone(), h.month)));
    }
    let mut out = Verified {
        checkpoints: checkpoints.len() as u64,
        ..Verified::default()
    };
    // Only the positions checkpoints name are kept, so a six-year trail verifies in bounded memory.
    let named: std::collections::HashSet<(&str, u32, u8, u64)> = checkpoints
        .iter()
        .flat_map(|c| {
            c.heads
                .iter()
                .map(|h| (h.subject.as_str(), h.month, c.node, h.n))
        })
        .collect();
    let mut stored: HashMap<Chain, HashMap<u64, [u8; 32]>> = HashMap::new();
    for (s, month) in partitions {
        if subject.is_some_and(|want| want != s) {
            continue;
        }
        let records = store.audit_read(s, month).await?;
        if records.is_empty() {
            continue;
        }
        let (n, findings) = verify_partition(&records, expired_before, keys);
        out.records += n;
        out.partitions += 1;
        out.findings.extend(findings);
        for r in records {
            let at = (r.chain.subject.as_str(), r.chain.month, r.chain.node, r.n);
            let wanted = named.contains(&at);
            let chain = stored.entry(r.chain).or_default();
            if wanted {
                chain.insert(r.n, r.hash);
            }
        }
    }
    out.findings.extend(verify_checkpoints(
        checkpoints,
        &stored,
        expired_month,
        keys,
        subject,
    ));
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

/// Position of a record in query order: time, node, position in the chain.
pub type Cursor = (u64, u8, u64);

/// Events of `subject` (optionally one device) with `from <= ts < to`, oldest first, `limit`
/// per page, after `cursor` (from a previous page's `next`).
pub async fn query(
    store: &dyn AuditLog,
    subject: &str,
    device: Option<&str>,
    from: u64,
    to: u64,
    limit: usize,
    cursor: Option<Cursor>,
) -> Result<Page, StoreError> {
    let mut rows = Vec::new();
    // An inclusive range cannot wrap, whatever the months are.
    for month in month_of(from)..=month_of(to.saturating_sub(1)) {
        let records = store.audit_read(subject.to_string(), month).await?;
        rows.extend(matching(records, from, to, cursor, device));
    }
    Ok(page(rows, limit))
}

/// Most org report partitions read at once.
const REPORT_READ_AHEAD: u64 = 16;

/// The access report of `org`: its users' reported events (`EventKind::reported`) with `from <= ts < to` while
/// they belonged to it, oldest first, paged like [`query`]. Reads the org's hourly report
/// partitions from the cursor on, one at first and twice as many each round while the page
/// is not full (a busy org fills it from one hour, a quiet one's month is few rounds), and
/// stops at the round that fills it.
pub async fn org_report(
    store: &dyn AuditLog,
    org: &str,
    from: u64,
    to: u64,
    limit: usize,
    cursor: Option<Cursor>,
) -> Result<Page, StoreError> {
    let mut next = cursor.map_or(from, |c| c.0.max(from)) / REPORT_BUCKET_MS;
    let last = to.saturating_sub(1) / REPORT_BUCKET_MS;
    let (mut width, mut rows) = (1, Vec::new());
    while next <= last && rows.len() <= limit {
        let end = last.min(next + width - 1);
        let reads = (next..=end).map(|bucket| {
            let subject = org_report_subject(org, bucket);
            store.audit_read(subject, month_of(bucket * REPORT_BUCKET_MS))
        });
        for records in futures_util::future::try_join_all(reads).await? {
            rows.extend(matching(records, from, to, cursor, None));
        }
        (next, width) = (end + 1, (width * 2).min(REPORT_READ_AHEAD));
    }
    Ok(page(rows, limit))
}

/// The events of `records` in the range, after the cursor, of the device if one is given.
fn matching(
    records: Vec<Record>,
    from: u64,
    to: u64,
    cursor: Option<Cursor>,
    device: Option<&str>,
) -> impl Iterator<Item = (Cursor, Event)> + '_ {
    records.into_iter().filter_map(move |r| {
        let key = (r.ts, r.chain.node, r.n);
        if r.ts < from || r.ts >= to || cursor.is_some_and(|c| key <= c) {
            return None;
        }
        let event = serde_json::from_str::<Event>(&r.entry).ok()?;
        if device.is_some_and(|d| event.device.as_deref() != Some(d)) {
            return None;
        }
        Some((key, event))
    })
}

/// The first `limit` rows in order, and the cursor after them when more follow.
fn page(mut rows: Vec<(Cursor, Event)>, limit: usize) -> Page {
    rows.sort_by_key(|(k, _)| *k);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more
        .then(|| {
            rows.last()
                .map(|((ts, node, n), _)| format!("{ts}.{node}.{n}"))
        })
        .flatten();
    Page {
        events: rows.into_iter().map(|(_, e)| e).collect(),
        next,
    }
}

/// Parses a `cursor` from [`Page::next`].
pub fn parse_cursor(s: &str) -> Option<Cursor> {
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

    fn keys() -> AuditKeys {
        let spec = format!("a1:{},a2:{}", B64.encode([7u8; 32]), B64.encode([9u8; 32]));
        AuditKeys::parse(&spec, "a1").expect("keys")
    }

    fn chain(subject: &str, month: u32, node: u8) -> Chain {
        Chain {
            subject: subject.into(),
            month,
            node,
        }
    }

    fn chain_of(keys: &AuditKeys, c: &Chain, entries: &[&str]) -> Vec<Record> {
        let mut prev = [0u8; 32];
        entries
            .iter()
            .enumerate()
            .map(|(n, e)| {
                let hash = keys.link("a1", c, n as u64, &prev, e).expect("key");
                let r = Record {
                    chain: c.clone(),
                    n: n as u64,
                    ts: now_ms(),
                    entry: e.to_string(),
                    prev,
                    hash,
                    key_id: "a1".into(),
                };
                prev = hash;
                r
            })
            .collect()
    }

    fn positions(f: &[Finding]) -> Vec<u64> {
        f.iter().map(|f| f.n).collect()
    }

    #[test]
    fn months_are_calendar_months() {
        assert_eq!(month_of(0), 0);
        assert_eq!(month_of(1_767_225_600_000), 56 * 12); // 2026-01-01
        assert_eq!(month_of(1_767_225_599_999), 56 * 12 - 1); // 2025-12-31
        assert_eq!(month_of(1_772_323_200_000), 56 * 12 + 2); // 2026-03-01
    }

    #[test]
    fn intact_chain_verifies_and_edited_inserted_reordered_or_deleted_records_do_not() {
        let k = keys();
        let c = chain("alice", 671, 0);
        let recs = chain_of(&k, &c, &["a", "b", "c", "d"]);
        assert_eq!(verify_partition(&recs, 0, &k), (4, vec![]));

        let mut edited = recs.clone();
        edited[1].entry = "B".into();
        assert_eq!(positions(&verify_partition(&edited, 0, &k).1), vec![1]);

        // Rebuilding the chain from the edit on needs the audit key: with plain SHA-256 (what
        // the chain used to be) or another key, every rebuilt record is a finding.
        let mut rebuilt = recs.clone();
        rebuilt[1].entry = "B".into();
        let mut prev = rebuilt[0].hash;
        for r in &mut rebuilt[1..] {
            use sha2::Digest as _;
            r.prev = prev;
            r.hash = sha2::Sha256::new()
                .chain_update(prev)
                .chain_update(&r.entry)
                .finalize()
                .into();
            r.key_id = String::new();
            prev = r.hash;
        }
        assert_eq!(
            positions(&verify_partition(&rebuilt, 0, &k).1),
            vec![1, 2, 3]
        );
        let other = AuditKeys::parse(&format!("a1:{}", B64.encode([1u8; 32])), "a1").expect("k");
        let forged = chain_of(&other, &c, &["a", "B", "c", "d"]);
        assert_eq!(verify_partition(&forged, 0, &k).1.len(), 4);

        // Swapping two records' places, or moving a record to another chain, breaks its MAC.
        let mut swapped = recs.clone();
        swapped.swap(1, 2);
        (swapped[1].n, swapped[2].n) = (1, 2);
        assert!(!verify_partition(&swapped, 0, &k).1.is_empty());
        let mut moved = recs.clone();
        for r in &mut moved {
            r.chain = chain("bob", 671, 0);
        }
        assert_eq!(verify_partition(&moved, 0, &k).1.len(), 4);

        // An inserted record shifts the numbering.
        let mut inserted = recs.clone();
        let mut extra = recs[1].clone();
        extra.n = 2;
        inserted.insert(2, extra);
        for r in &mut inserted[3..] {
            r.n += 1;
        }
        assert!(!verify_partition(&inserted, 0, &k).1.is_empty());

        let mut deleted = recs.clone();
        deleted.remove(2);
        assert_eq!(positions(&verify_partition(&deleted, 0, &k).1), vec![3]);

        let mut first_gone = recs;
        first_gone.remove(0);
        assert_eq!(verify_partition(&first_gone, 0, &k).1.len(), 1);
        // ... unless retention removed it.
        assert!(verify_partition(&first_gone, u64::MAX, &k).1.is_empty());
    }

    #[test]
    fn records_keyed_with_a_retired_key_verify_while_it_is_listed() {
        let k = keys();
        let c = chain("alice", 671, 0);
        let mut recs = chain_of(&k, &c, &["a", "b"]);
        let next = k.link("a2", &c, 2, &recs[1].hash, "c").expect("a2");
        recs.push(Record {
            n: 2,
            entry: "c".into(),
            prev: recs[1].hash,
            hash: next,
            key_id: "a2".into(),
            ..recs[1].clone()
        });
        assert!(verify_partition(&recs, 0, &k).1.is_empty());
        let only_a2 = AuditKeys::parse(&format!("a2:{}", B64.encode([9u8; 32])), "a2").expect("k");
        assert_eq!(
            positions(&verify_partition(&recs, 0, &only_a2).1),
            vec![0, 1]
        );
    }

    fn stored(records: &[Record]) -> HashMap<Chain, HashMap<u64, [u8; 32]>> {
        let mut out: HashMap<Chain, HashMap<u64, [u8; 32]>> = HashMap::new();
        for r in records {
            out.entry(r.chain.clone()).or_default().insert(r.n, r.hash);
        }
        out
    }

    fn head(r: &Record) -> CheckpointHead {
        CheckpointHead {
            subject: r.chain.subject.clone(),
            month: r.chain.month,
            n: r.n,
            hash: B64.encode(r.hash),
        }
    }

    #[test]
    fn checkpoints_reveal_deleted_newest_records_months_and_node_chains() {
        let k = keys();
        let alice_may = chain_of(&k, &chain("alice", 671, 0), &["a", "b", "c", "d"]);
        let alice_june = chain_of(&k, &chain("alice", 672, 0), &["e", "f"]);
        let bob_node1 = chain_of(&k, &chain("bob", 672, 1), &["g", "h"]);
        let node0 = Checkpoint::sign(&k, 0, 1, vec![head(&alice_may[3]), head(&alice_june[1])]);
        let node1 = Checkpoint::sign(&k, 1, 1, vec![head(&bob_node1[1])]);
        let all: Vec<Record> = [&alice_may[..], &alice_june[..], &bob_node1[..]].concat();
        let cps = [node0.clone(), node1.clone()];
        assert!(verify_checkpoints(&cps, &stored(&all), 0, &k, None).is_empty());

        // The two newest records of a chain: the rest still links, the checkpoint does not.
        let newest_gone: Vec<Record> = all
            .iter()
            .filter(|r| !(r.chain.month == 671 && r.n >= 2))
            .cloned()
            .collect();
        let (_, f) = verify_partition(&newest_gone[..2], 0, &k);
        assert!(f.is_empty(), "a truncated chain still links");
        let f = verify_checkpoints(&cps, &stored(&newest_gone), 0, &k, None);
        assert_eq!((f.len(), f[0].chain.month, f[0].n), (1, 671, 3));

        // A whole month, and one node's chain.
        let month_gone: Vec<Record> = all
            .iter()
            .filter(|r| r.chain.month != 672 || r.chain.node != 0)
            .cloned()
            .collect();
        let f = verify_checkpoints(&cps, &stored(&month_gone), 0, &k, None);
        assert_eq!(
            f.iter()
                .map(|f| (f.chain.month, f.chain.node))
                .collect::<Vec<_>>(),
            vec![(672, 0)]
        );
        let node_gone: Vec<Record> = all.iter().filter(|r| r.chain.node != 1).cloned().collect();
        let f = verify_checkpoints(&cps, &stored(&node_gone), 0, &k, None);
        assert_eq!(
            f.iter()
                .map(|f| f.chain.subject.as_str())
                .collect::<Vec<_>>(),
            vec!["bob"]
        );
        // ... unless retention took the month; or the subject asked about is another.
        assert!(verify_checkpoints(&cps, &stored(&month_gone), 673, &k, None).is_empty());
        assert!(verify_checkpoints(&cps, &stored(&node_gone), 0, &k, Some("alice")).is_empty());

        // A head replaced by another record of the same number.
        let mut replaced = all.clone();
        replaced[3].hash = [1; 32];
        assert_eq!(
            verify_checkpoints(&cps, &stored(&replaced), 0, &k, None).len(),
            1
        );

        // A checkpoint edited to hide the deletion is itself a finding, and then not trusted.
        let mut edited = node0.clone();
        edited.heads[0].n = 1;
        let f = verify_checkpoints(&[edited, node1], &stored(&newest_gone), 0, &k, None);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].chain.subject, "(checkpoints)");
        // Later checkpoints name later heads; the latest counts.
        let later = Checkpoint::sign(&k, 0, 2, vec![head(&alice_may[1])]);
        let f = verify_checkpoints(&[node0, later], &stored(&newest_gone), 0, &k, None);
        assert_eq!(f.len(), 1);
        // A checkpoint survives a JSON round trip (the file and the log line).
        let line = serde_json::to_string(&cps[1]).expect("json");
        assert!(
            serde_json::from_str::<Checkpoint>(&line)
                .expect("parse")
                .authentic(&k)
        );
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor("17.3.9"), Some((17, 3, 9)));
        assert_eq!(parse_cursor("17.3"), None);
        assert_eq!(parse_cursor("17.300.9"), None);
    }
}
