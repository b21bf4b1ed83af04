//! `drift bench gossip --nodes N` starts N nodes in this process on loopback (a sparse
//! bootstrap graph: a ring plus chords), measures the time until every table holds every node
//! alive, then the transport bytes each node receives per second over a window, next to the
//! floor `N × report frame size × report rate` (what a node must receive if every report
//! reached it exactly once with no framing, encryption or gossip overhead).

use std::time::{Duration, Instant};

use anyhow::Context;
use drift_protocol::codec::encode_frame;
use drift_protocol::{LoadReport, SecretKey, Signed, Timestamp};
use serde::Serialize;

use super::TempDir;
use crate::config::Config;
use crate::daemon::{self, Running};
use crate::table::Liveness;
use crate::testnet::{self, Topology};

/// Figures of one gossip run.
#[derive(Debug, Clone, Serialize)]
pub struct GossipFigures {
    pub nodes: usize,
    pub interval_ms: u64,
    /// From the start of the first node until every table holds every node alive.
    pub convergence_ms: u64,
    pub window_s: f64,
    /// Bytes of one encoded, signed load report frame.
    pub report_frame_bytes: usize,
    /// N × report frame bytes × reports per second.
    pub floor_bytes_per_node_per_s: f64,
    /// Transport bytes (after Noise and Yamux, all protocols) received per node per second.
    pub recv_bytes_per_node_per_s_mean: f64,
    pub recv_bytes_per_node_per_s_max: f64,
    /// mean / floor.
    pub overhead_ratio: f64,
    /// Reports accepted per node per second (≈ (N - 1) / interval when nothing is lost).
    pub reports_accepted_per_node_per_s: f64,
}

fn report_frame_len() -> usize {
    let key = SecretKey::from_bytes(&[7; 32]);
    let report = LoadReport {
        node: key.public(),
        seq: 1_795_000_000_000,
        issued_at: Timestamp(1_795_000_000_000),
        roster_epoch: 1,
        cpu_permille: 437,
        mem_used_mib: 30_000,
        mem_total_mib: 65_536,
        power_mw: 187_000,
        power_measured: false,
        vm_count: 0,
        vm_demand_permille: 0,
        reserved_permille: 0,
        standby: false,
    };
    encode_frame(&Signed::sign(&report, &key)).len()
}

fn all_converged(nodes: &[Running], n: usize) -> bool {
    let now = Instant::now();
    nodes.iter().all(|r| {
        let roster = r.state.roster();
        let rows = r.state.table().rows(&roster.roster, &r.state.me, now);
        rows.iter()
            .filter(|row| row.state == Liveness::Alive)
            .count()
            == n
    })
}

/// Runs the gossip benchmark.
pub async fn gossip(
    n: usize,
    interval: Duration,
    window: Duration,
    timeout: Duration,
) -> anyhow::Result<GossipFigures> {
    let dir = TempDir::new("gossip")?;
    let generated = testnet::generate_with(dir.path(), n, 0, interval, Topology::Sparse)?;
    let started = Instant::now();
    let mut nodes = Vec::with_capacity(n);
    for g in &generated {
        let config = Config::load(&g.config)?;
        nodes.push(
            daemon::start(config)
                .await
                .with_context(|| format!("starting {}", g.name))?,
        );
    }
    let deadline = started + timeout;
    while !all_converged(&nodes, n) {
        if Instant::now() > deadline {
            for r in nodes {
                r.shutdown().await;
            }
            anyhow::bail!("{n} nodes did not converge within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let convergence = started.elapsed();

    let accepted = |nodes: &[Running]| -> u64 {
        nodes
            .iter()
            .map(|r| {
                r.state
                    .counters
                    .reports_accepted
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    };
    let before: Vec<u64> = nodes.iter().map(|r| r.mesh.bandwidth().0).collect();
    let accepted_before = accepted(&nodes);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let rates: Vec<f64> = nodes
        .iter()
        .zip(&before)
        .map(|(r, b)| r.mesh.bandwidth().0.saturating_sub(*b) as f64 / secs)
        .collect();
    let accepted_rate = (accepted(&nodes) - accepted_before) as f64 / secs / n as f64;
    for r in nodes {
        r.shutdown().await;
    }
    let frame = report_frame_len();
    let floor = n as f64 * frame as f64 / interval.as_secs_f64();
    let mean = rates.iter().sum::<f64>() / n as f64;
    let max = rates.iter().copied().fold(0.0, f64::max);
    Ok(GossipFigures {
        nodes: n,
        interval_ms: interval.as_millis() as u64,
        convergence_ms: convergence.as_millis() as u64,
        window_s: secs,
        report_frame_bytes: frame,
        floor_bytes_per_node_per_s: floor,
        recv_bytes_per_node_per_s_mean: mean,
        recv_bytes_per_node_per_s_max: max,
        overhead_ratio: mean / floor,
        reports_accepted_per_node_per_s: accepted_rate,
    })
}
