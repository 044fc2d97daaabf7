//! Wiring: resolve keys, open the store, bind the listeners, run, and drain on shutdown.
//!
//! Shutdown order: stop accepting, tell every session to close with 1012 (each first answers its
//! in-flight sends), wait for sessions up to the grace period, send the queued pushes in what is
//! left of it, then let the store finish queued writes and sync. Nothing the relay answered
//! `accepted` is lost.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::audit::{AuditKeys, Auditor, Checkpoints};
use crate::auth::{self, FailureLimits, Verifier};
use crate::cluster::Cluster;
use crate::config::{Backend, Config, Mode, NodeId};
use crate::fanout::{Hub, LiveLogout, Presence};
use crate::listener::{self, App, Side};
use crate::pager::{self, Pager};
use crate::protocol::close;
use crate::seal::Keyring;
use crate::session::budget::{ReplayMemory, SenderQuota};
use crate::session::seen::LastSeen;
use crate::session::{SessionContext, state::Limits};
use crate::store::DeliverySink;
use crate::store::embedded::EmbeddedStore;
use crate::store::scylla::ScyllaStore;
use crate::store::{DeviceRef, MAX_NODES, MessageStore, now_ms};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Key material missing or unreadable.
    #[error("keys: {0}")]
    Keys(#[from] KeysError),
    /// TLS certificate or key unusable.
    #[error("tls: {0}")]
    Tls(#[from] listener::TlsError),
    /// The store would not open.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Push provider credentials unusable.
    #[error("push: {0}")]
    Push(#[from] pager::ProviderError),
    /// Cluster mode could not start.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A listener would not bind.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Why the relay's keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A key file that could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Keys that are required and not configured (production mode generates none).
    #[error("{0} not configured")]
    Missing(&'static str),
    /// Token keys that do not parse or could not be generated.
    #[error(transparent)]
    Token(#[from] auth::KeyError),
    /// At-rest keys that do not parse.
    #[error("at-rest keys: {0}")]
    AtRest(#[from] crate::seal::SealError),
    /// Audit keys that do not parse.
    #[error(transparent)]
    Audit(#[from] crate::audit::KeyError),
}

/// Where dev mode keeps its generated keys: beside the store, never inside it.
pub fn dev_secrets_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("dev-secrets")
}

/// File of the dev token-signing key.
pub fn dev_signing_key_path(data_dir: &Path) -> PathBuf {
    dev_secrets_dir(data_dir).join("token-signing-key.pem")
}

fn read(path: &Path) -> Result<String, StartError> {
    std::fs::read_to_string(path).map_err(|source| {
        KeysError::File {
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

fn write_secret(path: &Path, text: &str) -> Result<(), StartError> {
    let err = |source: std::io::Error| -> StartError {
        KeysError::File {
            path: path.to_path_buf(),
            source,
        }
        .into()
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(err)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(err)
}

/// Token verifier and at-rest keyring from configuration, generating dev keys when allowed.
pub fn resolve_keys(config: &Config) -> Result<(Verifier, Keyring), StartError> {
    let dev = config.mode == Mode::Dev;
    let secrets = dev_secrets_dir(&config.data_dir);
    let public_pem = match (&config.auth.public_keys, &config.auth.public_keys_file) {
        (Some(pem), _) => pem.clone(),
        (None, Some(path)) => read(path)?,
        (None, None) if dev => {
            let private = dev_signing_key_path(&config.data_dir);
            let public = secrets.join("token-signing-key.pub.pem");
            if !private.exists() {
                let key = auth::generate_ed25519().map_err(KeysError::from)?;
                write_secret(&private, &key.private_pem)?;
                write_secret(&public, &key.public_pem)?;
                tracing::warn!(path = %private.display(), "DEV MODE: generated a token-signing key; not for production");
            }
            read(&public)?
        }
        (None, None) => return Err(KeysError::Missing("token public keys").into()),
    };
    let verifier = Verifier::new(
        &public_pem,
        &config.auth.audience,
        config.auth.leeway.0.as_secs(),
        config.auth.max_token_lifetime.0.as_secs(),
    )
    .map_err(KeysError::from)?;

    let (spec, active) = match (&config.at_rest.keys, &config.at_rest.keys_file) {
        (Some(spec), _) => (spec.clone(), config.at_rest.active.clone()),
        (None, Some(path)) => (read(path)?, config.at_rest.active.clone()),
        (None, None) if dev => {
            let path = secrets.join("at-rest.keys");
            if !path.exists() {
                write_secret(&path, &format!("dev1:{}\n", Keyring::generate_key_b64()))?;
                tracing::warn!(path = %path.display(), "DEV MODE: generated an at-rest key; not for production");
            }
            (
                read(&path)?,
                config.at_rest.active.clone().or(Some("dev1".into())),
            )
        }
        (None, None) => return Err(KeysError::Missing("at-rest keys").into()),
    };
    let active = active.ok_or(KeysError::Missing("at_rest.active"))?;
    let keyring = Keyring::parse(spec.trim(), &active).map_err(KeysError::from)?;
    Ok((verifier, keyring))
}

/// The audit keys from configuration (dev mode generates one beside the other dev keys).
pub fn resolve_audit_keys(config: &Config) -> Result<AuditKeys, StartError> {
    let a = &config.audit;
    let (spec, active) = match (&a.keys, &a.keys_file) {
        (Some(spec), _) => (spec.clone(), a.active.clone()),
        (None, Some(path)) => (read(path)?, a.active.clone()),
        (None, None) if config.mode == Mode::Dev => {
            let path = dev_secrets_dir(&config.data_dir).join("audit.keys");
            if !path.exists() {
                write_secret(&path, &format!("dev1:{}\n", Keyring::generate_key_b64()))?;
                tracing::warn!(path = %path.display(), "DEV MODE: generated an audit key; not for production");
            }
            (read(&path)?, a.active.clone().or(Some("dev1".into())))
        }
        (None, None) => return Err(KeysError::Missing("audit keys").into()),
    };
    let active = active.ok_or(KeysError::Missing("audit.active"))?;
    Ok(AuditKeys::parse(spec.trim(), &active).map_err(KeysError::from)?)
}

/// Receives nothing: for tools that open the store without serving devices.
struct NoDelivery;

impl DeliverySink for NoDelivery {
    fn deliver(&self, _: &[DeviceRef], _: &crate::store::InboxEntry) {}
}

fn embedded_memory(config: &Config) -> crate::store::embedded::Memory {
    let e = &config.storage.embedded;
    crate::store::embedded::Memory {
        cache_bytes: e.cache_bytes,
        memtable_bytes: e.memtable_bytes,
        idle_flush: e.idle_flush.0,
    }
}

/// Opens the configured store for a tool (`relay audit verify`). The embedded store cannot be
/// opened while a relay runs on the same data directory.
pub async fn open_store_for_tool(config: &Config) -> Result<Arc<dyn MessageStore>, StartError> {
    let (_, keyring) = resolve_keys(config)?;
    let keyring = Arc::new(keyring);
    Ok(match config.storage.backend {
        Backend::Embedded => Arc::new(EmbeddedStore::open(
            &config.data_dir.join("store"),
            embedded_memory(config),
            keyring,
            Arc::new(NoDelivery),
        )?),
        // A fixed id and no appends: the tool takes no node-id lease.
        Backend::Scylla => Arc::new(
            ScyllaStore::open(
                &config.storage.scylla,
                Some(MAX_NODES - 1),
                keyring,
                config.retention(),
                Arc::new(NoDelivery),
            )
            .await?,
        ),
    })
}

/// Opens the embedded store of a stopped relay for a tool (`relay backup`).
pub async fn open_embedded_for_tool(config: &Config) -> Result<EmbeddedStore, StartError> {
    let (_, keyring) = resolve_keys(config)?;
    Ok(EmbeddedStore::open(
        &config.data_dir.join("store"),
        embedded_memory(config),
        Arc::new(keyring),
        Arc::new(NoDelivery),
    )?)
}

/// A running relay.
pub struct Server {
    /// Bound public address.
    pub public_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    app: Arc<App>,
    store: Arc<dyn MessageStore>,
    dispatcher: Option<Arc<push::Dispatcher<DeviceRef>>>,
    cluster: Option<Arc<Cluster>>,
    cluster_tasks: Option<crate::cluster::Tasks>,
    background: Vec<tokio::task::JoinHandle<()>>,
    audit_task: tokio::task::JoinHandle<()>,
}

/// Where the store hands committed messages: this node's hub, or the cluster (the hub and the
/// bus); through the pager first when push is configured.
fn delivery_sink(
    hub: &Arc<Hub>,
    cluster: &Option<Arc<Cluster>>,
    pager: Option<&Arc<Pager>>,
) -> Arc<dyn DeliverySink> {
    let (delivery, presence): (Arc<dyn DeliverySink>, Arc<dyn Presence>) = match cluster {
        Some(c) => (c.clone(), c.clone()),
        None => (hub.clone(), hub.clone()),
    };
    match pager {
        Some(pager) => Arc::new(pager::PagingSink {
            delivery,
            presence,
            pager: pager.clone(),
        }),
        None => delivery,
    }
}

/// Opens the configured backend with `sink` for its committed messages: the store, this node's
/// id (leased from ScyllaDB with `node_id = "auto"`), and the embedded store again for the
/// control socket.
async fn open_store(
    config: &Config,
    keyring: Arc<Keyring>,
    sink: Arc<dyn DeliverySink>,
) -> Result<(Arc<dyn MessageStore>, u8, Option<Arc<EmbeddedStore>>), StartError> {
    let fixed_id = match config.node_id {
        NodeId::Fixed(id) => Some(id),
        NodeId::Auto => None,
    };
    match config.storage.backend {
        Backend::Embedded => {
            let store = Arc::new(EmbeddedStore::open(
                &config.data_dir.join("store"),
                embedded_memory(config),
                keyring,
                sink,
            )?);
            Ok((store.clone(), fixed_id.unwrap_or(0), Some(store)))
        }
        Backend::Scylla => {
            let sc = &config.storage.scylla;
            tracing::info!(nodes = ?sc.nodes, keyspace = %sc.keyspace, consistency = %sc.consistency, "connecting to ScyllaDB");
            let store = ScyllaStore::open(sc, fixed_id, keyring, config.retention(), sink).await?;
            let id = store.node_id();
            Ok((Arc::new(store), id, None))
        }
    }
}

/// The per-session limits from configuration.
fn session_limits(config: &Config) -> Limits {
    let l = &config.limits;
    Limits {
        max_body_bytes: l.max_body_bytes,
        max_recipients: l.max_recipients,
        send_rate_per_s: l.send_rate_per_s,
        send_burst: l.send_burst,
        max_errors_per_minute: l.max_errors_per_minute,
        max_refused_per_minute: l.max_refused_per_minute,
        urgent_per_minute: l.urgent_per_minute,
        inbound_bytes_per_s: l.inbound_bytes_per_s as f64,
        // Room for the largest frame twice: one maximal send never waits.
        inbound_burst_bytes: (2 * config.max_frame_bytes()).max(l.inbound_bytes_per_s) as f64,
        ping_interval: config.session.ping_interval.0,
        idle_timeout: config.session.idle_timeout.0,
        max_pipelined_sends: l.max_pipelined_sends,
    }
}

/// Starts the push dispatcher and the pager task that feeds it, when push is configured.
fn start_push(
    config: &Config,
    providers: Option<(Option<push::apns::Apns>, Option<push::fcm::Fcm>)>,
    store: &Arc<dyn MessageStore>,
    pager: &Arc<Pager>,
    pager_inbox: pager::Inbox,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Option<Arc<push::Dispatcher<DeviceRef>>> {
    let (apns, fcm) = providers?;
    let p = &config.push;
    let for_gone = store.clone();
    let dispatcher = Arc::new(push::Dispatcher::start(
        push::DispatcherConfig {
            capacity: p.queue_capacity,
            workers: p.workers,
            max_attempts: p.max_attempts,
            ..Default::default()
        },
        apns,
        fcm,
        Arc::new(move |device: &DeviceRef, dead: &push::DeviceToken| {
            pager::forget_token(for_gone.clone(), device, dead)
        }),
    ));
    background.push(tokio::spawn(pager::run(
        pager_inbox,
        pager.clone(),
        store.clone(),
        dispatcher.clone(),
        pager::Timing {
            coalesce_window: p.coalesce_window.0,
            urgent_ack_timeout: p.urgent_ack_timeout.0,
            urgent_repeats: p.urgent_repeats,
        },
    )));
    tracing::info!(
        apns = p.apns.is_some(),
        fcm = p.fcm.is_some(),
        "push enabled"
    );
    Some(dispatcher)
}

/// Binds the control socket `relay backup` reaches the running relay through.
fn spawn_control(
    config: &Config,
    embedded: Arc<EmbeddedStore>,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let path = crate::control::socket_path(&config.data_dir);
    match crate::control::bind(&path) {
        Ok(socket) => background.push(tokio::spawn(crate::control::serve(
            socket,
            embedded,
            config.checkpoint_file(),
        ))),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "control socket not bound: `relay backup` cannot reach this relay")
        }
    }
}

/// The audit writer of this node, with its keys and checkpoint file.
fn start_audit(
    config: &Config,
    store: &Arc<dyn MessageStore>,
    node_id: u8,
) -> Result<(Arc<Auditor>, tokio::task::JoinHandle<()>), StartError> {
    let audit_keys = Arc::new(resolve_audit_keys(config)?);
    tracing::info!(active_key = audit_keys.active_id(), checkpoint_file = %config.checkpoint_file().display(), "audit keys loaded");
    Ok(Auditor::start(
        store.clone(),
        node_id,
        audit_keys,
        Checkpoints {
            interval: config.audit.checkpoint_interval.0,
            file: Some(config.checkpoint_file()),
        },
        Some(crate::access::org_lookup(store.clone())),
    ))
}

/// Binds a listener; the address it got (port 0 picks one).
fn bind_at(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listener = bind(addr).map_err(|e| StartError::Bind(addr, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Bind(addr, e))?;
    Ok((listener, local))
}

/// What the listeners share: the sessions' context, token checks, sign-in limits, connection
/// caps, the admin API and the drain signals.
fn listener_state(
    config: Config,
    verifier: Verifier,
    metrics: PrometheusHandle,
    node_id: u8,
    sessions: Arc<SessionContext>,
    tracker: TaskTracker,
) -> App {
    let l = &config.limits;
    let a = &config.access;
    App {
        failures: FailureLimits::new(
            a.failed_auth_per_ip,
            a.failed_auth_per_account,
            a.failed_auth_window.0,
        ),
        node_id,
        admin: crate::admin::Admin {
            access: sessions.access.clone(),
            store: sessions.store.clone(),
            credentials: config.admin.credentials.clone(),
            confirm_within: a.logout_confirm_within.0,
        },
        connections: Arc::new(Semaphore::new(l.max_connections)),
        sources: listener::SourceCounts::new(l.max_connections_per_ip),
        max_message_bytes: config.max_frame_bytes(),
        verifier,
        sessions,
        metrics,
        draining: CancellationToken::new(),
        shutdown: CancellationToken::new(),
        tracker,
        config,
    }
}

/// Starts the relay: everything is bound and serving when this returns.
pub async fn start(config: Config, metrics: PrometheusHandle) -> Result<Server, StartError> {
    if config.mode == Mode::Dev {
        tracing::warn!(
            "DEV MODE: generated keys, loopback only. Set mode = \"production\" for real deployments"
        );
    }
    let (verifier, keyring) = resolve_keys(&config)?;
    tracing::info!(active_key = keyring.active_id(), "at-rest keyring loaded");
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(c), Some(k)) => Some(listener::tls_acceptor(c, k)?),
        _ => None,
    };
    let hub = Arc::new(Hub::default());
    let keyring = Arc::new(keyring);
    let providers = if config.push.enabled() {
        Some(pager::providers(&config.push)?)
    } else {
        None
    };
    let (pager, pager_inbox) = Pager::new();
    let (cluster, cluster_tasks) = if config.cluster.enabled() {
        let (c, tasks) = Cluster::start(&config.cluster, keyring.clone(), hub.clone()).await?;
        (Some(c), Some(tasks))
    } else {
        (None, None)
    };
    let sink = delivery_sink(&hub, &cluster, providers.is_some().then_some(&pager));
    let (store, node_id, embedded) = open_store(&config, keyring, sink).await?;

    if let Some(c) = &cluster {
        c.set_store(store.clone(), node_id);
    }
    let mut background = Vec::new();
    let dispatcher = start_push(
        &config,
        providers,
        &store,
        &pager,
        pager_inbox,
        &mut background,
    );

    let (auditor, audit_task) = start_audit(&config, &store, node_id)?;
    let (presence, live): (Arc<dyn Presence>, Arc<dyn LiveLogout>) = match &cluster {
        Some(c) => (c.clone(), c.clone()),
        None => (hub.clone(), hub.clone()),
    };
    let access = Arc::new(Access {
        store: store.clone(),
        hub: hub.clone(),
        presence,
        live,
        audit: auditor.clone(),
        dispatcher: dispatcher.clone(),
        ack_wait: config.access.logout_ack_wait.0,
    });

    let (public, public_addr) = bind_at(config.listen)?;
    let (admin, admin_addr) = bind_at(config.admin_listen)?;

    let l = &config.limits;
    let tracker = TaskTracker::new();
    let sessions = Arc::new(SessionContext {
        tasks: tracker.clone(),
        last_seen: LastSeen::new(store.clone(), tracker.clone()),
        store: store.clone(),
        hub,
        limits: Arc::new(session_limits(&config)),
        outbound_queue: l.outbound_queue,
        write_timeout: l.write_timeout.0,
        push_apps: config.push.app_ids.clone(),
        pager: dispatcher.as_ref().map(|_| pager.clone()),
        cluster: cluster.clone(),
        access,
        replay_memory: ReplayMemory::new(l.replay_memory),
        quota: SenderQuota::new(l.sender_bytes_per_day),
    });
    let app = Arc::new(listener_state(
        config, verifier, metrics, node_id, sessions, tracker,
    ));

    background.push(tokio::spawn(listener::serve(
        public,
        app.clone(),
        tls,
        Side::Public,
    )));
    background.push(tokio::spawn(listener::serve(
        admin,
        app.clone(),
        None,
        Side::Admin,
    )));
    background.push(tokio::spawn(upkeep(app.clone(), store.clone())));
    if let Some(embedded) = embedded {
        spawn_control(&app.config, embedded, &mut background);
    }
    tracing::info!(%public_addr, %admin_addr, path = listener::WS_PATH, "relay listening");
    Ok(Server {
        public_addr,
        admin_addr,
        app,
        store,
        dispatcher,
        cluster,
        cluster_tasks,
        background,
        audit_task,
    })
}

/// Binds with a deep accept backlog: after a deploy or an outage every device reconnects at once,
/// and a full backlog drops SYNs, which clients only retry after a second.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// How often gauges are refreshed and expired sign-in counters pruned.
const METRICS_TICK: Duration = Duration::from_secs(5);
/// The safety net for logouts whose live signal was lost: how often this node reads the pending
/// logouts and closes the local sessions they cover (ARCHITECTURE.md, "Remote logout").
const LOGOUT_SAFETY_NET: Duration = Duration::from_secs(5);
/// How often the time of the last good backup is read for its metric.
const BACKUP_CHECK: Duration = Duration::from_secs(60);
/// At shutdown: how long the audit writer has to store and checkpoint the last events, and the
/// bus to carry the last deliveries.
const AUDIT_FINAL_CHECKPOINT: Duration = Duration::from_secs(5);
const BUS_FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Periodic work: metrics upkeep and retention expiry.
async fn upkeep(app: Arc<App>, store: Arc<dyn MessageStore>) {
    let retention = app.config.retention();
    let mut metrics_tick = tokio::time::interval(METRICS_TICK);
    let mut sweep = tokio::time::interval(app.config.retention.sweep_interval.0);
    let mut logouts = tokio::time::interval(LOGOUT_SAFETY_NET);
    let mut backups = tokio::time::interval(BACKUP_CHECK);
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = metrics_tick.tick() => {
                metrics::gauge!("relay_store_ready").set(if store.ready() { 1.0 } else { 0.0 });
                app.metrics.run_upkeep();
                app.failures.prune();
            }
            _ = logouts.tick() => match store.pending_logouts().await {
                Ok(pending) => {
                    let overdue_before = now_ms().saturating_sub(app.config.access.logout_confirm_within.0.as_millis() as u64);
                    let overdue = pending.iter().filter(|(_, at)| *at < overdue_before).count();
                    metrics::gauge!("relay_logouts_pending").set(pending.len() as f64);
                    metrics::gauge!("relay_logouts_overdue").set(overdue as f64);
                    app.sessions.access.enforce(&pending).await;
                }
                Err(e) => tracing::warn!(error = %e, "pending logouts not read"),
            },
            // Another node or the backup job may have recorded one: 0 until one is.
            _ = backups.tick() => match store.last_backup().await {
                Ok(last) => {
                    let at = last.map_or(0.0, |b| b.taken_at as f64 / 1000.0);
                    metrics::gauge!("relay_last_backup_timestamp_seconds").set(at);
                }
                Err(e) => tracing::warn!(error = %e, "last backup not read"),
            },
            _ = sweep.tick() => match store.expire(now_ms(), retention).await {
                Ok(n) => {
                    metrics::counter!("relay_retention_expired_rows_total", "table" => "archive").increment(n.archive);
                    metrics::counter!("relay_retention_expired_rows_total", "table" => "inbox").increment(n.inbox);
                    metrics::counter!("relay_retention_expired_rows_total", "table" => "idempotency").increment(n.idempotency);
                    metrics::counter!("relay_retention_expired_rows_total", "table" => "audit").increment(n.audit);
                    if n != Default::default() {
                        tracing::info!(archive = n.archive, inbox = n.inbox, idempotency = n.idempotency, "retention expiry");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "retention expiry failed"),
            },
        }
    }
}

impl Server {
    /// Drains and stops: see the module docs for the order.
    pub async fn shutdown(self) {
        let grace = self.app.config.shutdown_grace.0;
        let started = tokio::time::Instant::now();
        tracing::info!(
            grace_s = grace.as_secs(),
            sessions = self.app.sessions.hub.online(),
            "draining"
        );
        // Stop taking connections (readiness fails, so balancers move on), then close the
        // devices: spread out in cluster mode, where they reconnect to the other nodes.
        self.app.draining.cancel();
        if self.cluster.is_some() {
            let spread = self.app.config.cluster.drain_spread.0.min(grace / 2);
            self.app.sessions.hub.drain(close::RESTART, spread).await;
        }
        self.app.sessions.hub.close(close::RESTART);
        self.app.shutdown.cancel();
        self.app.tracker.close();
        if tokio::time::timeout(grace, self.app.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; dropping remaining connections");
        }
        for task in self.background {
            task.abort();
        }
        // Queued pushes (logout pushes among them) go out within what is left of the grace.
        if let Some(d) = &self.dispatcher {
            let left = d.drain(grace.saturating_sub(started.elapsed())).await;
            if left > 0 {
                tracing::warn!(left, "grace period over; queued pushes not sent");
            }
        }
        // Sessions are gone: their last audit events are queued. Store them before the store
        // closes, and checkpoint them so that the newest records are covered too.
        self.app
            .sessions
            .access
            .audit
            .checkpoint(AUDIT_FINAL_CHECKPOINT)
            .await;
        self.audit_task.abort();
        match self.store.close().await {
            Ok(()) => tracing::info!("store flushed; stopped"),
            Err(e) => tracing::error!(error = %e, "store close failed"),
        }
        if let Some(c) = &self.cluster {
            // Last deliveries out, then tell the others to forget this node's devices now.
            c.leave();
            c.flush(BUS_FINAL_FLUSH).await;
        }
        if let Some(t) = self.cluster_tasks {
            t.abort();
        }
    }
}
