//! Prometheus metrics: the recorder, its histogram buckets, and build info. Metric names are
//! written where they are recorded; this file is where their buckets are chosen. No label ever
//! carries a user or device id.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the global recorder and returns the handle that renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, String> {
    // Sub-millisecond to seconds: accept waits on a group commit (an fsync).
    let latency = [
        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];
    let counts = [
        1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 10_000.0, 100_000.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("relay_store_commit_batch_size".into()),
                &counts,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("relay_replay_messages".into()), &counts)
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    metrics::gauge!("relay_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}
