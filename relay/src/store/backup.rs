//! Online backup and restore of the embedded store.
//!
//! A backup is a copy of every table as of one point: a fjall cross-table snapshot, taken
//! between two of the writer's batches (each batch commits atomically), so it holds every
//! message that was accepted before that point and nothing half-written. Writes go on while the
//! copy is read: the only pause is the instant of opening the snapshot, and the copy rests
//! between batches so that the writer keeps most of the machine. Rows are copied as
//! stored (sealed values, pseudonymous keys), so the backup is no easier to read than the
//! store; the keys stay with the operator.
//!
//! Layout of a backup directory: `store/` (a fjall database with the same tables),
//! `audit-checkpoints.jsonl` (the node's checkpoints up to the backup point, copied before the
//! snapshot opens, so every head they name is in the copy) and `backup.json`, the
//! [`Manifest`], written last: a directory without it is an unfinished backup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fjall::{Database, KeyspaceCreateOptions, PersistMode, Readable as _};
use serde::{Deserialize, Serialize};

use super::embedded::{EmbeddedStore, Tables};
use super::{Backup, MessageStore as _, StoreError, now_ms};

/// `backup.json`'s `format`.
pub const FORMAT: &str = "relay-embedded-backup/1";
/// Rows per write batch of the copy.
const CHUNK: usize = 10_000;
/// After each batch the copy rests as long as the batch took, so that it takes at most about
/// half of one core and of the disk from the writer, whose group commits go on meanwhile.
const REST: f64 = 1.0;

/// What a backup holds; written last, as `backup.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The backup point: when the snapshot opened (ms since the Unix epoch). Everything
    /// accepted before it is in the backup; nothing accepted after it is (the RPO).
    pub taken_at: u64,
    /// When the copy was complete (ms).
    pub finished_at: u64,
    /// Relay version that wrote it.
    pub relay_version: String,
    /// Rows copied, by table.
    pub rows: BTreeMap<String, u64>,
}

impl EmbeddedStore {
    /// Writes an online backup of the whole store into the new directory `out` (see
    /// `backup.rs`), with the checkpoint file at `checkpoints`, and records it.
    pub async fn backup(&self, out: PathBuf, checkpoints: PathBuf) -> Result<Manifest, StoreError> {
        let t = self.tables()?;
        let dir = out.clone();
        let manifest = tokio::task::spawn_blocking(move || write(&t, &dir, &checkpoints))
            .await
            .map_err(|e| failed("task", e))??;
        self.record_backup(Backup {
            taken_at: manifest.taken_at,
            tag: out.display().to_string(),
        })
        .await?;
        Ok(manifest)
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("backup: {what}: {e}"))
}

/// Copies every table of `t` as of now into a new backup directory `out`, with the checkpoint
/// file at `checkpoints` (if it exists). Blocking; run it off the async threads.
pub(super) fn write(t: &Tables, out: &Path, checkpoints: &Path) -> Result<Manifest, StoreError> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| failed("out", e))?
            .next()
            .is_some()
    {
        return Err(StoreError::Refused(format!(
            "backup: {} is not empty; give a new directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| failed("create out", e))?;
    if checkpoints.exists() {
        std::fs::copy(checkpoints, out.join("audit-checkpoints.jsonl"))
            .map_err(|e| failed("copy checkpoints", e))?;
    }
    let snapshot = t.db.snapshot();
    let taken_at = now_ms();
    let copy = Database::builder(out.join("store"))
        .open()
        .map_err(|e| failed("create copy", e))?;
    let mut rows = BTreeMap::new();
    for (name, table) in t.named() {
        let target = copy
            .keyspace(name, KeyspaceCreateOptions::default)
            .map_err(|e| failed("create table", e))?;
        let mut batch = copy.batch();
        let mut n = 0u64;
        let mut chunk_started = Instant::now();
        for guard in snapshot.iter(table) {
            let (k, v) = guard.into_inner().map_err(|e| failed("read", e))?;
            batch.insert(&target, k, v);
            n += 1;
            if batch.len() >= CHUNK {
                std::mem::replace(&mut batch, copy.batch())
                    .commit()
                    .map_err(|e| failed("write", e))?;
                std::thread::sleep(chunk_started.elapsed().mul_f64(REST));
                chunk_started = Instant::now();
            }
        }
        batch.commit().map_err(|e| failed("write", e))?;
        rows.insert(name.to_string(), n);
    }
    drop(snapshot);
    copy.persist(PersistMode::SyncAll)
        .map_err(|e| failed("sync", e))?;
    drop(copy);
    let manifest = Manifest {
        format: FORMAT.into(),
        taken_at,
        finished_at: now_ms(),
        relay_version: env!("CARGO_PKG_VERSION").into(),
        rows,
    };
    write_synced(&out.join("backup.json"), &manifest)?;
    Ok(manifest)
}

/// Writes `value` as JSON to `path` through a synced temporary file and a rename.
fn write_synced(path: &Path, value: &impl Serialize) -> Result<(), StoreError> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec_pretty(value).map_err(|e| failed("manifest", e))?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| failed("manifest", e))?;
    f.write_all(&body).map_err(|e| failed("manifest", e))?;
    f.sync_all().map_err(|e| failed("manifest", e))?;
    std::fs::rename(&tmp, path).map_err(|e| failed("manifest", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed("sync directory", e))?;
    }
    Ok(())
}

/// Reads a finished backup's manifest.
pub fn manifest(from: &Path) -> Result<Manifest, StoreError> {
    let text = std::fs::read(from.join("backup.json")).map_err(|e| {
        StoreError::Refused(format!(
            "restore: {} has no readable backup.json ({e}): not a finished backup",
            from.display()
        ))
    })?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| StoreError::Refused(format!("restore: backup.json: {e}")))?;
    if m.format != FORMAT {
        return Err(StoreError::Refused(format!(
            "restore: backup format `{}`, this relay reads `{FORMAT}`",
            m.format
        )));
    }
    Ok(m)
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The backup's manifest.
    pub manifest: Manifest,
    /// The restored store's directory.
    pub store: PathBuf,
    /// Seconds the copy took.
    pub copy_s: f64,
}

/// Copies the backup at `from` into the new data directory `data_dir` (which must not hold a
/// store): `store/` and the checkpoint file. The caller then opens it with the keys, which
/// checks that they open it.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Restored, StoreError> {
    let started = Instant::now();
    let manifest = manifest(from)?;
    let store = data_dir.join("store");
    if store.exists() {
        return Err(StoreError::Refused(format!(
            "restore: {} already holds a store; restore into a new data directory",
            data_dir.display()
        )));
    }
    copy_dir(&from.join("store"), &store).map_err(|e| failed("copy store", e))?;
    let checkpoints = from.join("audit-checkpoints.jsonl");
    if checkpoints.exists() {
        std::fs::copy(&checkpoints, data_dir.join("audit-checkpoints.jsonl"))
            .map_err(|e| failed("copy checkpoints", e))?;
    }
    Ok(Restored {
        manifest,
        store,
        copy_s: started.elapsed().as_secs_f64(),
    })
}

/// Copies a directory tree, syncing each file.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}
