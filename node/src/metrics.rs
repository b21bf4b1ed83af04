//! The node's Prometheus metrics: what `GET /metrics` serves (on the admin socket, and on
//! `[control] metrics_listen` where set).
//!
//! Two kinds of series. Events are counted where they happen, in families this module owns
//! ([`Metrics`]: migrations by outcome, their downtime and duration, bytes moved, offers
//! refused). States are read from the node when scraped ([`render`]: reports, peers, hosts by
//! liveness, roster epoch, audit records), so they can never disagree with `drift status`.
//! libp2p's own metrics (transport bytes by protocol and direction) come first, from the
//! registry the mesh fills.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::migration::record::{Record, Role};
use crate::state::NodeState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    role: &'static str,
    mode: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

type Histograms = Family<ModeLabels, Histogram, fn() -> Histogram>;

/// Downtime buckets: 0.5 ms to about 16 s.
fn downtime_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Duration buckets: 50 ms to about 30 min.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

/// The event counters of one node.
#[derive(Debug)]
pub struct Metrics {
    migrations: Family<MigrationLabels, Counter>,
    downtime: Histograms,
    duration: Histograms,
    bytes_sent: Counter,
    offers_refused: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            migrations: Family::default(),
            downtime: Family::new_with_constructor(downtime_histogram),
            duration: Family::new_with_constructor(duration_histogram),
            bytes_sent: Counter::default(),
            offers_refused: Family::default(),
        }
    }
}

impl Metrics {
    /// A migration record reached its end: counted by role, mode and outcome; a source's
    /// figures (downtime, total time, bytes) go to the histograms.
    pub fn migration_finished(&self, r: &Record) {
        let mode = mode_label(r.mode);
        self.migrations
            .get_or_create(&MigrationLabels {
                role: match r.role {
                    Role::Source => "source",
                    Role::Target => "target",
                },
                mode,
                outcome: r.outcome(),
            })
            .inc();
        if r.role != Role::Source {
            return;
        }
        if let Some(p) = &r.progress {
            if let Some(ms) = p.downtime_ms {
                self.downtime
                    .get_or_create(&ModeLabels { mode })
                    .observe(ms / 1000.0);
            }
            self.duration
                .get_or_create(&ModeLabels { mode })
                .observe(p.total_ms.unwrap_or_default() / 1000.0);
            self.bytes_sent.inc_by(p.bytes_sent);
        }
    }

    /// An offer this node refused, by the reason's label.
    pub fn offer_refused(&self, reason: &str) {
        self.offers_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "drift_migrations",
            "Migrations that ended, by this node's role, the mode and the outcome",
            self.migrations.clone(),
        );
        r.register(
            "drift_migration_downtime_seconds",
            "Downtime of migrations this node sent (the guest paused), by mode",
            self.downtime.clone(),
        );
        r.register(
            "drift_migration_duration_seconds",
            "Total time of migrations this node sent, by mode",
            self.duration.clone(),
        );
        r.register(
            "drift_migration_sent_bytes",
            "Bytes of guest state this node sent in migrations that ended",
            self.bytes_sent.clone(),
        );
        r.register(
            "drift_offers_refused",
            "Migration offers this node refused, by reason",
            self.offers_refused.clone(),
        );
    }
}

fn mode_label(mode: drift_protocol::migration::Mode) -> &'static str {
    use drift_protocol::migration::Mode;
    match mode {
        Mode::PreCopy => "precopy",
        Mode::PostCopy => "postcopy",
        Mode::Hybrid => "hybrid",
    }
}

fn counter(r: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    r.register(name, help, c);
}

fn gauge(r: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    r.register(name, help, g);
}

/// The whole text exposition (OpenMetrics): libp2p's registry, then the node's own series.
/// `peers` is the number of connected peers (the mesh task knows it).
pub fn render(
    state: &NodeState,
    metrics: &Metrics,
    libp2p: &Registry,
    peers: usize,
) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    metrics.register(&mut r);
    let c = &state.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, value) in [
        (
            "drift_reports_accepted",
            "Load reports accepted into the table",
            load(&c.reports_accepted),
        ),
        (
            "drift_reports_published",
            "Load reports this node published",
            load(&c.reports_published),
        ),
        (
            "drift_report_publish_failures",
            "Load reports this node could not publish",
            load(&c.publish_failures),
        ),
        (
            "drift_connections_denied",
            "Connections refused because the peer is not a roster member",
            load(&c.connections_denied),
        ),
        (
            "drift_rosters_adopted",
            "Roster epochs adopted",
            load(&c.rosters_adopted),
        ),
        (
            "drift_rosters_refused",
            "Roster announcements refused",
            load(&c.rosters_refused),
        ),
    ] {
        counter(&mut r, name, help, value);
    }
    let rejected = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in c.rejections() {
        rejected.get_or_create(&ReasonLabels { reason }).inc_by(n);
    }
    r.register(
        "drift_reports_rejected",
        "Load reports refused, by reason",
        rejected,
    );
    gauge(&mut r, "drift_peers", "Connected peers", peers as i64);
    let hosts = Family::<StateLabels, Gauge>::default();
    for (state, n) in state.hosts_by_liveness() {
        hosts.get_or_create(&StateLabels { state }).set(n as i64);
    }
    r.register("drift_hosts", "Roster hosts by liveness", hosts);
    gauge(
        &mut r,
        "drift_roster_epoch",
        "The roster epoch in force",
        state.roster().roster.epoch as i64,
    );
    gauge(
        &mut r,
        "drift_audit_records",
        "Records in this node's audit log",
        state.audit_head().map_or(0, |(seq, _)| seq as i64 + 1),
    );
    gauge(
        &mut r,
        "drift_vms",
        "VMs on this node",
        state.vms.specs().len() as i64,
    );
    let h = &state.head_counters;
    for (name, help, value) in [
        (
            "drift_audit_heads_witnessed",
            "Peers' audit heads this node countersigned and keeps",
            load(&h.witnessed),
        ),
        (
            "drift_audit_heads_published",
            "Audit heads this node published",
            load(&h.published),
        ),
        (
            "drift_audit_forks",
            "Peers seen showing two audit histories",
            load(&h.forks),
        ),
    ] {
        counter(&mut r, name, help, value);
    }
    let heads_rejected = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in h.rejections() {
        heads_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }
    r.register(
        "drift_audit_heads_rejected",
        "Audit heads refused, by reason",
        heads_rejected,
    );
    let mut text = String::new();
    encode_registry(&mut text, libp2p)?;
    encode_registry(&mut text, &r)?;
    encode_eof(&mut text)?;
    Ok(text)
}
