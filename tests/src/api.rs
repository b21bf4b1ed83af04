//! What the multi-node tests of the autopilot share: the nodes' admin APIs as one value, and
//! the steps every such test takes (rewrite `[balance]`, restart, check that every VM is on
//! exactly one host and clean).

#![allow(clippy::unwrap_used)] // test harness: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use drift_node::autopilot::DecisionRecord;
use drift_node::control::{
    client, CreateVm, DecisionsView, MigrationsView, TableView, VerifyView, VmsView,
};
use drift_node::hypervisor::{RunState, VmView};
use drift_protocol::NodeId;

use crate::Cluster;

/// Replaces the `[balance]` section (the last one of a generated config).
pub fn set_balance(config: &Path, settings: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let end = text.find("\n[balance]\n").unwrap_or(text.len());
    std::fs::write(config, format!("{}\n[balance]\n{settings}", &text[..end])).unwrap();
}

/// A cluster of `n` nodes started with balancing off (so a test builds its starting state
/// first), converged within `converge`.
pub fn start_unbalanced(n: usize, report_interval: Duration, converge: Duration) -> Cluster {
    let mut c = Cluster::generate(n, report_interval);
    for node in &c.nodes {
        set_balance(&node.node.config, "enabled = false\n");
    }
    for node in &mut c.nodes {
        node.start();
    }
    c.wait_converged(converge).unwrap();
    c
}

/// Talks to the nodes' admin APIs.
#[derive(Debug)]
pub struct Api {
    rt: tokio::runtime::Runtime,
}

impl Default for Api {
    fn default() -> Self {
        Self::new()
    }
}

impl Api {
    pub fn new() -> Self {
        Self {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    pub fn vms(&self, c: &Cluster, i: usize) -> Option<Vec<VmView>> {
        let v: VmsView = self
            .rt
            .block_on(client::get(&c.nodes[i].node.socket, "/v1/vms"))
            .ok()?;
        Some(v.vms)
    }

    pub fn migrations(&self, c: &Cluster, i: usize) -> Option<MigrationsView> {
        self.rt
            .block_on(client::get(&c.nodes[i].node.socket, "/v1/migrations"))
            .ok()
    }

    pub fn decisions(&self, c: &Cluster, i: usize) -> Option<DecisionsView> {
        self.rt
            .block_on(client::get(&c.nodes[i].node.socket, "/v1/decisions"))
            .ok()
    }

    pub fn table(&self, c: &Cluster, i: usize) -> Option<TableView> {
        self.rt
            .block_on(client::get(&c.nodes[i].node.socket, "/v1/table"))
            .ok()
    }

    pub fn create(&self, c: &Cluster, i: usize, name: &str, mib: u64, demand: f64, only: &[&str]) {
        let req = CreateVm {
            name: name.into(),
            memory_mib: mib,
            vcpus: 1,
            demand,
            dirty_mib_per_s: DIRTY_MIB_PER_S,
            page_random_pct: None,
            jurisdictions: only.iter().map(|s| s.to_string()).collect(),
            regions: Vec::new(),
            anti_affinity: None,
            qemu: None,
        };
        let r: Result<VmView, _> = self.rt.block_on(client::post(
            &c.nodes[i].node.socket,
            "/v1/vms",
            serde_json::to_vec(&req).unwrap(),
        ));
        if let Err(e) = r {
            panic!("creating {name} on node {i}: {e}");
        }
    }

    pub fn verify(&self, c: &Cluster, i: usize, vm: &str) -> Result<(), String> {
        let v: VerifyView = self
            .rt
            .block_on(client::post(
                &c.nodes[i].node.socket,
                &format!("/v1/vms/{vm}/verify"),
                Vec::new(),
            ))
            .map_err(|e| e.to_string())?;
        let r = v.report;
        if r.bad_count == 0 && r.missing == 0 {
            Ok(())
        } else {
            Err(format!("{vm}: {r:?}"))
        }
    }

    /// The VMs of every node, in node order.
    pub fn placement(&self, c: &Cluster) -> Vec<Vec<VmView>> {
        (0..c.nodes.len())
            .map(|i| {
                self.vms(c, i)
                    .unwrap_or_else(|| panic!("node {i} does not answer"))
            })
            .collect()
    }

    /// Whether a migration is running (or resolving) anywhere.
    pub fn moving(&self, c: &Cluster) -> bool {
        (0..c.nodes.len()).any(|i| {
            self.migrations(c, i).is_none_or(|m| {
                m.migrations
                    .iter()
                    .any(|m| m.state == "running" || m.state == "resolving")
            })
        })
    }

    /// Committed moves, from the sources' records: `(vm, from, to)` as node indices.
    pub fn moves(&self, c: &Cluster) -> Vec<(String, usize, usize)> {
        let index = |id: &NodeId| c.nodes.iter().position(|n| &n.node.id == id);
        let mut out = Vec::new();
        for i in 0..c.nodes.len() {
            let m = self.migrations(c, i).unwrap();
            for m in m.migrations {
                if m.role == "source" && m.state == "committed" {
                    out.push((m.vm.clone(), i, index(&m.peer).unwrap()));
                }
            }
        }
        out
    }

    /// Every node's decisions.
    pub fn all_decisions(&self, c: &Cluster) -> Vec<Vec<DecisionRecord>> {
        (0..c.nodes.len())
            .map(|i| {
                self.decisions(c, i)
                    .map(|d| d.decisions)
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// How fast the tests' VMs dirty memory.
pub const DIRTY_MIB_PER_S: f64 = 0.5;

/// Stops every node, rewrites its `[balance]` section, starts them all again.
pub fn restart_all(c: &mut Cluster, balance: &str) {
    for n in &mut c.nodes {
        assert!(
            n.terminate(Duration::from_secs(20)),
            "{} did not stop cleanly",
            n.node.name
        );
        set_balance(&n.node.config, balance);
    }
    for n in &mut c.nodes {
        n.start();
    }
    c.wait_converged(Duration::from_secs(90)).unwrap();
}

/// Every VM is on exactly one host, running, and its memory verifies page by page.
pub fn all_there_and_clean(api: &Api, c: &Cluster, expected: &BTreeSet<String>) {
    let placement = api.placement(c);
    let mut seen = BTreeMap::<String, usize>::new();
    for (i, vms) in placement.iter().enumerate() {
        for v in vms {
            assert_eq!(
                v.state,
                RunState::Running,
                "{} on node {i}: {:?}",
                v.name,
                v.state
            );
            if let Some(j) = seen.insert(v.name.clone(), i) {
                panic!("{} is on node {j} and node {i}", v.name);
            }
            api.verify(c, i, &v.name).unwrap();
        }
    }
    let names: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(&names, expected, "VMs lost or created");
}
