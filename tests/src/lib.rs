//! Shared helpers for the relay's integration tests: opening either store backend against real
//! services. The Python and Node end-to-end suites live beside this crate (`e2e_py/`,
//! `e2e_node/`); Cassandra is started by `scripts/cassandra` (which `scripts/test` runs).

#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub mod fake_push;
pub mod in_process;

use relay::config::ScyllaConfig;
use relay::seal::Keyring;
use relay::store::embedded::EmbeddedStore;
use relay::store::scylla::{self, ScyllaStore};
use relay::store::{DeliverySink, DeviceRef, InboxEntry, MessageStore, Retention};

/// Which backend a conformance case runs against.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// fjall in a temporary directory.
    Embedded,
    /// A fresh keyspace in the Cassandra started by `scripts/cassandra start`.
    Cassandra,
}

/// Records fan-out calls: (devices, seq).
#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<(Vec<DeviceRef>, u64)>>);

impl DeliverySink for Recorder {
    fn deliver(&self, devices: &[DeviceRef], entry: &InboxEntry) {
        if let Ok(mut v) = self.0.lock() {
            v.push((devices.to_vec(), entry.seq));
        }
    }
}

/// Where a backend keeps its data, so a test can reopen the same store.
pub struct Place {
    kind: Kind,
    dir: tempfile::TempDir,
    keyspace: String,
    keyring: Arc<Keyring>,
}

fn cassandra_port() -> u16 {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/cassandra/run/port");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|_| {
        panic!(
            "Cassandra is not running ({} missing): start it with `scripts/cassandra start` (scripts/test does)",
            file.display()
        )
    });
    text.trim().parse().expect("port file holds a port")
}

/// A ring with the given keys (`kid:base64`), `active` sealing.
pub fn keyring(spec: &str, active: &str) -> Arc<Keyring> {
    Arc::new(Keyring::parse(spec, active).expect("keyring"))
}

/// A random at-rest key entry `kid:base64`.
pub fn key_entry(kid: &str) -> String {
    format!("{kid}:{}", Keyring::generate_key_b64())
}

/// Audit keys for tests (one random key, `t1`).
pub fn audit_keys() -> Arc<relay::audit::AuditKeys> {
    Arc::new(relay::audit::AuditKeys::parse(&key_entry("t1"), "t1").expect("audit keys"))
}

/// Starts an audit writer for `node` with test keys; its checkpoints go to `file`, if given.
pub fn auditor(
    store: Arc<dyn relay::store::MessageStore>,
    node: u8,
    keys: Arc<relay::audit::AuditKeys>,
    file: Option<std::path::PathBuf>,
) -> (Arc<relay::audit::Auditor>, tokio::task::JoinHandle<()>) {
    let checkpoints = relay::audit::Checkpoints {
        interval: std::time::Duration::from_secs(3600),
        file,
    };
    relay::audit::Auditor::start(store, node, keys, checkpoints, None)
}

/// The access service over `store` on one node (its own hub, no push), with its audit writer.
pub fn access(
    store: Arc<dyn relay::store::MessageStore>,
) -> (relay::access::Access, tokio::task::JoinHandle<()>) {
    let (audit, audit_task) = auditor(store.clone(), 0, audit_keys(), None);
    let hub = Arc::new(relay::fanout::Hub::default());
    let access = relay::access::Access {
        store,
        hub: hub.clone(),
        presence: hub.clone(),
        live: hub,
        audit,
        dispatcher: None,
        ack_wait: std::time::Duration::from_secs(5),
    };
    (access, audit_task)
}

impl Place {
    /// A new empty place for `kind`.
    pub async fn new(kind: Kind) -> Place {
        Self::at_version(kind, scylla::SCHEMA_VERSION).await
    }

    /// A new empty place whose keyspace (Cassandra) has the migrations up to `version`.
    pub async fn at_version(kind: Kind, version: i32) -> Place {
        let place = Place {
            kind,
            dir: tempfile::tempdir().expect("tempdir"),
            keyspace: format!("conf_{}", uuid::Uuid::new_v4().simple()),
            keyring: keyring(&key_entry("k1"), "k1"),
        };
        if let Kind::Cassandra = kind {
            scylla::migrate_to(&place.scylla_config(), None, version)
                .await
                .expect("migrate");
        }
        place
    }

    /// The ScyllaDB configuration of this place's keyspace.
    pub fn scylla_config(&self) -> ScyllaConfig {
        ScyllaConfig {
            nodes: vec![format!("127.0.0.1:{}", cassandra_port())],
            keyspace: self.keyspace.clone(),
            replication: [("datacenter1".to_string(), 1)].into(),
            ..ScyllaConfig::default()
        }
    }

    /// The at-rest keyring this place's store was first opened with (`k1`): a store opens
    /// only with the keys that sealed its ids key.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.clone()
    }

    /// Opens the store here.
    pub async fn open(
        &self,
        keyring: Arc<Keyring>,
        retention: Retention,
        sink: Arc<dyn DeliverySink>,
    ) -> Arc<dyn MessageStore> {
        match self.kind {
            Kind::Embedded => Arc::new(
                EmbeddedStore::open(
                    &self.dir.path().join("store"),
                    relay::store::embedded::Memory {
                        cache_bytes: 32 << 20,
                        memtable_bytes: 8 << 20,
                        idle_flush: std::time::Duration::from_secs(30),
                    },
                    keyring,
                    sink,
                )
                .expect("open"),
            ),
            Kind::Cassandra => Arc::new(self.open_scylla(Some(0), keyring, retention, sink).await),
        }
    }

    /// Opens the ScyllaDB backend here with a fixed (`Some`) or leased (`None`) node id.
    pub async fn open_scylla(
        &self,
        node_id: Option<u8>,
        keyring: Arc<Keyring>,
        retention: Retention,
        sink: Arc<dyn DeliverySink>,
    ) -> ScyllaStore {
        ScyllaStore::open(&self.scylla_config(), node_id, keyring, retention, sink)
            .await
            .expect("open")
    }
}
