//! The local control socket of a relay on the embedded store: `relay backup` asks the running
//! relay for an online backup through it (the store is locked by the process that has it open).
//!
//! A Unix socket at `<data_dir>/control.sock`, mode 0600: whoever may use it may already read
//! the data directory, so it needs no credential of its own. One JSON request per connection,
//! one JSON line back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::store::backup::Manifest;
use crate::store::embedded::EmbeddedStore;

/// Largest request line.
const MAX_REQUEST: u64 = 8 * 1024;
/// Time a client has to send its request line.
const REQUEST_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The socket of the relay whose data directory is `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// A request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// An online backup into this new directory (absolute path).
    Backup {
        /// Where.
        out: PathBuf,
    },
}

/// The answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The backup is written.
    Backup(Manifest),
    /// It failed, and why.
    Error(String),
}

/// Serves the socket until the task is dropped. Backups run one at a time.
pub async fn serve(listener: UnixListener, store: Arc<EmbeddedStore>, checkpoints: PathBuf) {
    let one_at_a_time = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (store, checkpoints, lock) =
            (store.clone(), checkpoints.clone(), one_at_a_time.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &store, checkpoints, &lock).await {
                tracing::warn!(error = %e, "control request not answered");
            }
        });
    }
}

/// Binds the socket (replacing one a previous run left), readable by this user only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn answer(
    stream: UnixStream,
    store: &EmbeddedStore,
    checkpoints: PathBuf,
    lock: &tokio::sync::Mutex<()>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A client that never finishes its line does not keep a task for ever.
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_WITHIN, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::Error(format!("bad request: {e}")),
        Ok(Request::Backup { out }) if !out.is_absolute() => {
            Reply::Error(format!("{}: give an absolute path", out.display()))
        }
        Ok(Request::Backup { out }) => match lock.try_lock() {
            Err(_) => Reply::Error("a backup is already running".into()),
            Ok(_running) => backup(store, out, checkpoints).await,
        },
    };
    let mut body = serde_json::to_vec(&reply).unwrap_or_default();
    body.push(b'\n');
    write.write_all(&body).await?;
    write.shutdown().await
}

/// Writes a backup and records it in the metrics.
pub async fn backup(store: &EmbeddedStore, out: PathBuf, checkpoints: PathBuf) -> Reply {
    let started = std::time::Instant::now();
    match store.backup(out.clone(), checkpoints).await {
        Ok(manifest) => {
            let rows: u64 = manifest.rows.values().sum();
            tracing::info!(out = %out.display(), rows, seconds = started.elapsed().as_secs_f64(), "backup written");
            metrics::gauge!("relay_last_backup_timestamp_seconds")
                .set(manifest.taken_at as f64 / 1000.0);
            Reply::Backup(manifest)
        }
        Err(e) => {
            metrics::counter!("relay_backup_failures_total").increment(1);
            tracing::error!(out = %out.display(), error = %e, "backup failed");
            Reply::Error(e.to_string())
        }
    }
}

/// Asks the relay running on `data_dir` for a backup into `out`. `Ok(None)`: no relay
/// answers there.
pub async fn request_backup(data_dir: &Path, out: PathBuf) -> std::io::Result<Option<Reply>> {
    let mut stream = match UnixStream::connect(socket_path(data_dir)).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut line = serde_json::to_vec(&Request::Backup { out })?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(std::io::Error::other)
}
