//! A real-time relay for end-to-end-encrypted clinical messaging.
//!
//! Devices hold authenticated WebSocket sessions; the relay stores each opaque, already
//! encrypted message (sealed again at rest), answers `accepted` once it is durable, and delivers
//! it to every device of its recipients, in order, at least once. See `ARCHITECTURE.md` for the
//! map and `PROTOCOL.md` for the wire protocol.
//!
//! Layout:
//! - [`config`]: the typed configuration and its loading;
//! - [`auth`]: device tokens, checked before the upgrade, and failed-login limits;
//! - [`ids`]: the vocabulary: devices, time, sequence numbers, durations;
//! - [`access`]: remote logout and account lock (`access::model`: the rows and verdicts);
//! - [`audit`]: the tamper-evident access audit trail (`audit::model`: events and records);
//! - [`admin`]: the admin API (logout, lock, devices, presence, audit queries);
//! - [`protocol`]: frame shapes, codes and close codes (the only place that knows them);
//! - [`session`]: one device's session: `state` (logic, no IO) and `driver` (the socket);
//! - [`fanout`]: live connections on this node and their bounded queues;
//! - [`store`]: the [`store::MessageStore`] trait, its embedded and ScyllaDB backends;
//! - [`cluster`]: many nodes on a NATS bus: cross-node delivery, presence, displacement;
//! - [`pager`]: push wake-ups and urgent pages (the `push` crate talks to APNs/FCM);
//! - [`seal`]: AES-256-GCM at-rest encryption under a rotating keyring;
//! - [`listener`]: HTTP/WebSocket/TLS listeners; [`server`]: wiring and shutdown;
//! - [`control`]: the local socket `relay backup` reaches a running relay through;
//! - [`metrics`]: the Prometheus recorder.
//!
//! The modules form layers, checked by `scripts/layers`: see ARCHITECTURE.md, "Layers".

#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod control;
pub mod fanout;
pub mod ids;
pub mod listener;
pub mod metrics;
pub mod pager;
pub mod protocol;
pub mod seal;
pub mod server;
pub mod session;
pub mod store;
