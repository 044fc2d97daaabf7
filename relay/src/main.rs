//! The `relay` binary: `serve` (default), `token` (mint a device token), `keygen`, `migrate`,
//! `check`, `audit verify`, `admin-credential`, `backup`, `restore`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use relay::auth::{self, Claims, Minter};
use relay::config::{Config, LogFormat, parse_duration};
use relay::seal::Keyring;
use relay::server;

/// Exit code for bad configuration (EX_USAGE): nothing was bound.
const EXIT_CONFIG: u8 = 64;

/// jemalloc, not the system allocator: under connection churn glibc's per-thread arenas kept
/// growing (fragmentation) where jemalloc levels off, and it was faster too (BENCHMARKS.md).
/// Its background thread returns freed pages to the system while the relay is idle
/// (`background_thread:true`, set at build time in `.cargo/config.toml`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Real-time relay for end-to-end-encrypted clinical messaging"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// TOML configuration file.
    #[arg(long, global = true, env = "RELAY_CONFIG_FILE")]
    config: Option<PathBuf>,
    /// Public listener address (overrides `listen`).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Admin listener address (overrides `admin_listen`).
    #[arg(long, global = true)]
    admin_listen: Option<String>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, global = true)]
    data_dir: Option<String>,
    /// Any setting, as `section.key=value` (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Mint a device token, signed with the dev key (or --key).
    Token(TokenArgs),
    /// Create the ScyllaDB keyspace if missing and apply missing schema migrations.
    Migrate,
    /// Validate the configuration (file, environment, flags) and exit: 0 if usable, 64 if not.
    Check,
    /// The access audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The message archive.
    #[command(subcommand)]
    Archive(ArchiveCommand),
    /// Create an admin API credential: prints the token (give it to the caller) and the
    /// `[[admin.credentials]]` entry holding only its SHA-256.
    AdminCredential {
        /// Name recorded as the actor in the audit trail.
        #[arg(long)]
        name: String,
        /// `support`, `org_admin` or `account_service`.
        #[arg(long)]
        role: String,
        /// The organisation (org_admin only).
        #[arg(long)]
        org: Option<String>,
    },
    /// Back up the store. Embedded backend: an online backup into a new directory (`--out`),
    /// written by the running relay (or from the store itself when no relay runs on it).
    /// ScyllaDB: record that the backup job took snapshot `--record-snapshot` of every node.
    Backup {
        /// New directory for the backup (embedded backend).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Tag of the snapshot just taken and shipped (ScyllaDB backend).
        #[arg(long)]
        record_snapshot: Option<String>,
        /// When that snapshot was taken: Unix ms or RFC 3339 UTC (default: now).
        #[arg(long)]
        taken_at: Option<String>,
    },
    /// Restore an embedded-store backup into a new data directory (`--data-dir`), then check
    /// that the configured keys open it and that its audit trail verifies.
    Restore {
        /// The backup directory (`relay backup --out`).
        #[arg(long)]
        from: PathBuf,
    },
    /// Generate keys: an Ed25519 token-signing pair and an at-rest key.
    Keygen {
        /// Directory to write `token-signing-key.pem` and `token-signing-key.pub.pem` into.
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ArchiveCommand {
    /// Look archived messages up by sequence and id (support, legal holds, restore drills):
    /// prints one JSON line each with its metadata and the SHA-256 of its (end-to-end
    /// encrypted) body, never the body. Exit 0 if every one is there and opens with the keys,
    /// 1 if one is missing, 2 if one does not open. Embedded backend: on a stopped node.
    Get {
        /// File of `SEQ ID` lines (`-`: standard input).
        #[arg(long)]
        messages: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute every keyed chain and hold it against the checkpoints: exit 0 if intact, 1 if a
    /// record was edited, inserted, reordered or deleted (the newest ones, a month or a node's
    /// chain included, as far as the checkpoints reach). Embedded backend: run it on a stopped
    /// node (the store is locked while a relay runs).
    Verify {
        /// Only this user's partitions.
        #[arg(long)]
        user: Option<String>,
        /// Checkpoint files (JSON lines, as the relay writes them; log lines holding a
        /// checkpoint work too). Default: this node's `audit.checkpoint_file`, if it exists.
        #[arg(long = "checkpoints")]
        checkpoints: Vec<std::path::PathBuf>,
    },
}

#[derive(Args)]
struct TokenArgs {
    /// User id (`sub`).
    #[arg(long)]
    user: String,
    /// Device id (`dev`).
    #[arg(long)]
    device: String,
    /// Organisation id.
    #[arg(long)]
    org: Option<String>,
    /// Lifetime, e.g. 12h.
    #[arg(long, default_value = "24h")]
    ttl: String,
    /// Absolute expiry in Unix seconds (overrides --ttl; may be in the past, for tests).
    #[arg(long)]
    expires_at: Option<u64>,
    /// Session epoch (`sep`).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Allow the device to send urgent messages (the `urgent` claim).
    #[arg(long)]
    urgent: bool,
    /// Audience; defaults to the configured `auth.audience`.
    #[arg(long)]
    audience: Option<String>,
    /// PKCS#8 private key (Ed25519 or P-256); defaults to the dev key in the data directory.
    #[arg(long)]
    key: Option<PathBuf>,
}

fn load_config(common: &Common) -> Result<Config, relay::config::ConfigError> {
    let mut overrides = Vec::new();
    for (key, value) in [
        ("listen", &common.listen),
        ("admin_listen", &common.admin_listen),
        ("data_dir", &common.data_dir),
    ] {
        if let Some(v) = value {
            overrides.push((key.to_string(), format!("{v:?}")));
        }
    }
    for kv in &common.set {
        match kv.split_once('=') {
            Some((k, v)) => overrides.push((k.trim().to_string(), v.to_string())),
            None => {
                return Err(relay::config::ConfigError(vec![format!(
                    "--set `{kv}`: expected KEY=VALUE"
                )]));
            }
        }
    }
    let env = std::env::vars().filter(|(k, _)| k != "RELAY_CONFIG_FILE");
    Config::load(common.config.as_deref(), env, &overrides)
}

fn init_logs(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keygen { out_dir }) = &cli.command {
        return keygen(out_dir);
    }
    let config = match load_config(&cli.common) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if !matches!(command, Command::Serve) {
        for w in &config.warnings {
            eprintln!("relay: warning: {w}");
        }
    }
    match command {
        Command::Serve => serve(config),
        Command::Token(args) => token(&config, args),
        Command::Keygen { .. } => ExitCode::SUCCESS, // handled above: needs no configuration
        Command::Migrate => migrate(&config),
        Command::Audit(AuditCommand::Verify { user, checkpoints }) => {
            audit_verify(&config, user.as_deref(), checkpoints)
        }
        Command::AdminCredential { name, role, org } => admin_credential(&name, &role, org),
        Command::Archive(ArchiveCommand::Get { messages }) => archive_get(&config, &messages),
        Command::Backup {
            out,
            record_snapshot,
            taken_at,
        } => backup(&config, out, record_snapshot, taken_at),
        Command::Restore { from } => restore(&config, &from),
        // The serving relay only warns of unknown variables; the check is where to find them.
        Command::Check if !config.warnings.is_empty() => ExitCode::from(EXIT_CONFIG),
        Command::Check => {
            println!(
                "configuration OK: mode {:?}, backend {:?}, listen {}, admin {}",
                config.mode, config.storage.backend, config.listen, config.admin_listen
            );
            ExitCode::SUCCESS
        }
    }
}

/// Threads for blocking work: the embedded store's reads (but inbox pages: its reader threads)
/// and writes off the writer thread, audit file appends, backups. Tokio's default (512) let a connect storm start hundreds
/// of threads whose stacks and allocator caches stayed in the relay's memory; the writes
/// serialize on the store's journal anyway, and a page read is a few point lookups.
const BLOCKING_THREADS: usize = 16;

fn serve(config: Config) -> ExitCode {
    init_logs(&config);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    relay::metrics::report_jemalloc();
    runtime.block_on(async move {
        let metrics = match relay::metrics::install() {
            Ok(h) => h,
            Err(e) => {
                eprintln!("relay: metrics: {e}");
                return ExitCode::FAILURE;
            }
        };
        let server = match server::start(config, metrics).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("relay: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))
}

fn backup(
    config: &Config,
    out: Option<PathBuf>,
    snapshot: Option<String>,
    taken_at: Option<String>,
) -> ExitCode {
    use relay::config::Backend;
    use relay::control::Reply;
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("relay backup: {e}");
        ExitCode::FAILURE
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match (config.storage.backend, out, snapshot) {
        (Backend::Embedded, Some(out), None) => rt.block_on(async {
            let out = match std::path::absolute(&out) {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            let reply = match relay::control::request_backup(&config.data_dir, out.clone()).await {
                Ok(Some(reply)) => reply,
                Err(e) => return fail(&format!("the running relay did not answer: {e}")),
                // No relay runs here: back up the store directly.
                Ok(None) => match server::open_embedded_for_tool(config).await {
                    Ok(store) => {
                        let reply =
                            relay::control::backup(&store, out.clone(), config.checkpoint_file())
                                .await;
                        let _ = relay::store::MessageStore::close(&store).await;
                        reply
                    }
                    Err(e) => return fail(&e),
                },
            };
            match reply {
                Reply::Backup(m) => {
                    println!(
                        "backup written to {}: {} rows as of {} (backup point; later writes are not in it), {} ms",
                        out.display(),
                        m.rows.values().sum::<u64>(),
                        relay::admin::rfc3339(m.taken_at),
                        m.finished_at.saturating_sub(m.taken_at),
                    );
                    ExitCode::SUCCESS
                }
                Reply::Error(e) => fail(&e),
            }
        }),
        (Backend::Scylla, None, Some(tag)) => {
            let at = match taken_at.as_deref().map(relay::admin::parse_time) {
                None => relay::store::now_ms(),
                Some(Some(at)) => at,
                Some(None) => return fail(&"--taken-at: Unix ms or RFC 3339 UTC"),
            };
            rt.block_on(async {
                let store = match server::open_store_for_tool(config).await {
                    Ok(s) => s,
                    Err(e) => return fail(&e),
                };
                let backup = relay::store::Backup { taken_at: at, tag };
                let done = store.record_backup(backup).await;
                let _ = store.close().await;
                match done {
                    Ok(()) => {
                        println!("snapshot recorded as of {}", relay::admin::rfc3339(at));
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                }
            })
        }
        (Backend::Embedded, _, _) => fail(&"the embedded backend backs up with --out DIR"),
        (Backend::Scylla, _, _) => fail(
            &"ScyllaDB is backed up by snapshots of every node (DEPLOY.md, \"Backups\"); record one with --record-snapshot TAG",
        ),
    }
}

fn archive_get(config: &Config, messages: &std::path::Path) -> ExitCode {
    use sha2::{Digest as _, Sha256};
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("relay archive get: {e}");
        ExitCode::from(2)
    };
    let text = if messages == std::path::Path::new("-") {
        let mut s = String::new();
        match std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
            Ok(_) => s,
            Err(e) => return fail(&e),
        }
    } else {
        match std::fs::read_to_string(messages) {
            Ok(s) => s,
            Err(e) => return fail(&format!("{}: {e}", messages.display())),
        }
    };
    let mut wanted = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut parts = line.split_whitespace();
        let parsed = parts
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .zip(parts.next().and_then(|s| uuid::Uuid::parse_str(s).ok()));
        match parsed {
            Some(m) => wanted.push(m),
            None => return fail(&format!("line {}: expected `SEQ ID`", i + 1)),
        }
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    rt.block_on(async {
        let store = match server::open_store_for_tool(config).await {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        let (mut missing, mut unreadable) = (0, 0);
        for (seq, id) in wanted {
            let line = match store.archived(seq, id).await {
                Ok(Some(m)) => serde_json::json!({
                    "seq": seq, "id": id, "found": true, "ts": m.entry.ts,
                    "from": { "user": &*m.entry.from.user, "device": &*m.entry.from.device },
                    "to": m.to, "urgent": m.entry.urgent, "bytes": m.entry.body.len(),
                    "body_sha256": Sha256::digest(&m.entry.body)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>(),
                }),
                Ok(None) => {
                    missing += 1;
                    serde_json::json!({ "seq": seq, "id": id, "found": false })
                }
                Err(e) => {
                    unreadable += 1;
                    serde_json::json!({ "seq": seq, "id": id, "found": true, "error": e.to_string() })
                }
            };
            println!("{line}");
        }
        let _ = store.close().await;
        match (missing, unreadable) {
            (0, 0) => ExitCode::SUCCESS,
            (_, 0) => ExitCode::from(1),
            _ => ExitCode::from(2),
        }
    })
}

fn restore(config: &Config, from: &std::path::Path) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("relay restore: {e}");
        ExitCode::FAILURE
    };
    if config.storage.backend != relay::config::Backend::Embedded {
        return fail(&"restores embedded backups; ScyllaDB restores from snapshots (DEPLOY.md)");
    }
    let started = std::time::Instant::now();
    let restored = match relay::store::backup::restore(from, &config.data_dir) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let keys = match server::resolve_audit_keys(config) {
        Ok(k) => k,
        Err(e) => return fail(&e),
    };
    let checkpoints = config.checkpoint_file();
    let checkpoints = if checkpoints.exists() {
        match read_checkpoints(&[checkpoints]) {
            Ok(c) => c,
            Err(e) => return fail(&e),
        }
    } else {
        Vec::new()
    };
    rt.block_on(async {
        // Opening it checks that the configured keys open its ids key.
        let store = match server::open_store_for_tool(config).await {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        // The restored data is as new as the backup it came from.
        let m = &restored.manifest;
        let from_backup = relay::store::Backup {
            taken_at: m.taken_at,
            tag: from.display().to_string(),
        };
        if let Err(e) = store.record_backup(from_backup).await {
            let _ = store.close().await;
            return fail(&e);
        }
        let verified = relay::audit::verify(
            &*store,
            None,
            config.retention().audit_ms,
            &keys,
            &checkpoints,
        )
        .await;
        let _ = store.close().await;
        println!(
            "restored {} rows into {} in {:.1} s (copy {:.1} s): the store as of {}; what was accepted after that is not in it",
            m.rows.values().sum::<u64>(),
            restored.store.display(),
            started.elapsed().as_secs_f64(),
            restored.copy_s,
            relay::admin::rfc3339(m.taken_at),
        );
        match verified {
            Ok(v) if v.findings.is_empty() => {
                println!(
                    "audit trail intact: {} records in {} partitions, {} checkpoints",
                    v.records, v.partitions, v.checkpoints
                );
                ExitCode::SUCCESS
            }
            Ok(v) => {
                for f in v.findings.iter().take(20) {
                    eprintln!("audit finding: {} {} #{}: {}", f.chain.subject, f.chain.month, f.n, f.problem);
                }
                fail(&format!("the restored audit trail has {} findings", v.findings.len()))
            }
            Err(e) => fail(&e),
        }
    })
}

/// SIGTERM and SIGINT both drain gracefully, so Ctrl-C exercises the same path as a deploy.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Every checkpoint in `files`: one per line, bare (the checkpoint file) or in the `checkpoint`
/// field of a JSON log line (other log lines are skipped). Anything else is an error: a
/// checkpoint that cannot be read must not pass for one that is missing.
fn read_checkpoints(files: &[std::path::PathBuf]) -> Result<Vec<relay::audit::Checkpoint>, String> {
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = || format!("{}:{}: not a checkpoint", path.display(), i + 1);
            if let Ok(c) = serde_json::from_str::<relay::audit::Checkpoint>(line) {
                out.push(c);
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad())?;
            let Some(fields) = v.get("fields") else {
                return Err(bad());
            };
            if let Some(c) = fields.get("checkpoint") {
                out.push(serde_json::from_str(c.as_str().ok_or_else(bad)?).map_err(|_| bad())?);
            }
        }
    }
    Ok(out)
}

fn audit_verify(
    config: &Config,
    user: Option<&str>,
    mut checkpoint_files: Vec<std::path::PathBuf>,
) -> ExitCode {
    if checkpoint_files.is_empty() && config.checkpoint_file().exists() {
        checkpoint_files.push(config.checkpoint_file());
    }
    let checkpoints = match read_checkpoints(&checkpoint_files) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay audit verify: {e}");
            return ExitCode::from(2);
        }
    };
    let keys = match server::resolve_audit_keys(config) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("relay audit verify: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay audit verify: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        let store = match server::open_store_for_tool(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("relay audit verify: {e}");
                return ExitCode::from(2);
            }
        };
        let result = relay::audit::verify(
            &*store,
            user,
            config.retention().audit_ms,
            &keys,
            &checkpoints,
        )
        .await;
        let _ = store.close().await;
        match result {
            Ok(v) if v.findings.is_empty() => {
                println!(
                    "audit trail intact: {} records in {} partitions, {} checkpoints",
                    v.records, v.partitions, v.checkpoints
                );
                if v.checkpoints == 0 {
                    println!("no checkpoints given: deleted newest records, months or node chains cannot be seen");
                }
                ExitCode::SUCCESS
            }
            Ok(v) => {
                for f in &v.findings {
                    println!(
                        "TAMPERED subject={} month={} node={} n={}: {}",
                        f.chain.subject, f.chain.month, f.chain.node, f.n, f.problem
                    );
                }
                println!(
                    "audit trail NOT intact: {} problems in {} records, {} partitions",
                    v.findings.len(),
                    v.records,
                    v.partitions
                );
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("relay audit verify: {e}");
                ExitCode::from(2)
            }
        }
    })
}

fn admin_credential(name: &str, role: &str, org: Option<String>) -> ExitCode {
    if !["support", "org_admin", "account_service"].contains(&role) {
        eprintln!("relay admin-credential: --role must be support, org_admin or account_service");
        return ExitCode::from(EXIT_CONFIG);
    }
    if (role == "org_admin") != org.is_some() {
        eprintln!("relay admin-credential: --org is required for org_admin, and only for it");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (token, digest) = relay::admin::new_credential();
    println!("token (give to the caller, store nowhere else): {token}");
    println!();
    println!("[[admin.credentials]]");
    println!("name = {name:?}");
    println!("role = {role:?}");
    if let Some(org) = org {
        println!("org = {org:?}");
    }
    println!("token_sha256 = \"{digest}\"");
    ExitCode::SUCCESS
}

fn migrate(config: &Config) -> ExitCode {
    let sc = &config.storage.scylla;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Existing rows move to pseudonymous keys under the relays' at-rest keys (migration 9);
    // dev mode's keys are used if they exist, never generated here.
    let dev_keys = server::dev_secrets_dir(&config.data_dir).join("at-rest.keys");
    let keys_known =
        config.at_rest.keys.is_some() || config.at_rest.keys_file.is_some() || dev_keys.exists();
    let keyring = keys_known
        .then(|| server::resolve_keys(config).ok())
        .flatten()
        .map(|(_, keyring)| keyring);
    match runtime.block_on(relay::store::scylla::migrate(sc, keyring.as_ref())) {
        Ok(applied) if applied.is_empty() => {
            println!(
                "keyspace `{}` is up to date (schema version {})",
                sc.keyspace,
                relay::store::scylla::SCHEMA_VERSION
            );
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!("keyspace `{}`: applied migrations {applied:?}", sc.keyspace);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(config: &Config, args: TokenArgs) -> ExitCode {
    let key_path = args
        .key
        .unwrap_or_else(|| server::dev_signing_key_path(&config.data_dir));
    let pem = match std::fs::read_to_string(&key_path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "relay token: cannot read {}: {e}\n(run the relay once in dev mode to generate its key, or pass --key)",
                key_path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let now = relay::store::now_ms() / 1000;
    let exp = match (args.expires_at, parse_duration(&args.ttl)) {
        (Some(at), _) => at,
        (None, Some(ttl)) => now + ttl.max(Duration::from_secs(1)).as_secs(),
        (None, None) => {
            eprintln!("relay token: --ttl `{}` is not a duration", args.ttl);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let claims = Claims {
        sub: args.user,
        dev: args.device,
        org: args.org,
        iat: now,
        exp,
        sep: args.epoch,
        nbf: None,
        urgent: args.urgent,
        aud: args
            .audience
            .unwrap_or_else(|| config.auth.audience.clone()),
    };
    match Minter::from_pem(&pem).and_then(|m| m.mint(&claims)) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(out_dir: &std::path::Path) -> ExitCode {
    let key = match auth::generate_ed25519() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("relay keygen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let write = |name: &str, text: &str| -> std::io::Result<()> {
        std::fs::create_dir_all(out_dir)?;
        std::fs::write(out_dir.join(name), text)
    };
    if let Err(e) = write("token-signing-key.pem", &key.private_pem)
        .and_then(|()| write("token-signing-key.pub.pem", &key.public_pem))
    {
        eprintln!("relay keygen: {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "wrote {}/token-signing-key.pem (private) and token-signing-key.pub.pem (public)",
        out_dir.display()
    );
    println!(
        "at-rest key (for at_rest.keys as `kid:key`): {}",
        Keyring::generate_key_b64()
    );
    println!(
        "audit key (for audit.keys as `kid:key`; keep it apart from the database): {}",
        Keyring::generate_key_b64()
    );
    ExitCode::SUCCESS
}
