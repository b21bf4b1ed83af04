//! `drift bench`: measurements that print figures next to a baseline measured or computed in
//! the same run. Every node a benchmark needs runs inside the benchmark's own process, on
//! loopback, from a testnet directory generated in a private temporary directory.
//!
//! - [`gossip`]: convergence time and gossip bytes per node, next to the floor the reports
//!   alone need.
//! - [`transfer`]: the same bytes over plain TCP and over a drift stream (TCP + Noise + Yamux,
//!   and QUIC), received, counted and hashed: the cost of the encrypted transport.
//! - [`migrate`]: live migrations of a sandbox VM between two nodes in each mode, next to an
//!   idle VM of the same size and the raw stream throughput; every VM is verified page by page
//!   on the target.

pub mod gossip;
pub mod migrate;
pub mod qemu;
pub mod transfer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Config;
use crate::daemon::{self, Running};
use crate::testnet::{self, Topology};

pub use gossip::{gossip, GossipFigures};

/// A private temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new directory under the system's temporary directory, named after `what`.
    pub fn new(what: &str) -> anyhow::Result<Self> {
        // Short: unix socket paths inside it (VMs' QMP and migration sockets) must stay
        // under the kernel's 108 bytes.
        let base = std::env::temp_dir().join(format!(
            "drift-{what}-{:x}",
            crate::clock::now().as_millis() ^ (u64::from(std::process::id()) << 40)
        ));
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        Ok(Self(base))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses a byte count: a whole number with an optional unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`;
/// `K`, `M`, `G`, `T` mean the same binary units), e.g. `1GiB`, `256MiB`, `65536`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a whole number and a unit, e.g. 256MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?}; use B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Two nodes of one roster, started in this process and connected to each other.
#[derive(Debug)]
pub(crate) struct Pair {
    pub(crate) a: Running,
    pub(crate) b: Running,
}

impl Pair {
    /// Stops both nodes.
    pub(crate) async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

/// Writes a two-node testnet into `dir` (`node-1` and `node-2`) and loads its configs.
pub(crate) fn two_node_configs(dir: &Path, interval: Duration) -> anyhow::Result<[Config; 2]> {
    let generated = testnet::generate_with(dir, 2, 0, interval, Topology::Full)?;
    Ok([
        Config::load(&generated[0].config)?,
        Config::load(&generated[1].config)?,
    ])
}

/// Starts `a`, then `b`, and waits until each holds the other alive in its table.
pub(crate) async fn start_pair(configs: [Config; 2], timeout: Duration) -> anyhow::Result<Pair> {
    let [ca, cb] = configs;
    let a = daemon::start(ca).await.context("starting node-1")?;
    let b = match daemon::start(cb).await {
        Ok(b) => b,
        Err(e) => {
            a.shutdown().await;
            return Err(anyhow::Error::new(e).context("starting node-2"));
        }
    };
    let pair = Pair { a, b };
    if let Err(e) = wait_alive(&pair, timeout).await {
        pair.shutdown().await;
        return Err(e);
    }
    Ok(pair)
}

/// Waits until each node of `pair` holds the other alive in its table (so they are connected
/// and have heard from each other).
pub(crate) async fn wait_alive(pair: &Pair, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive = [&pair.a, &pair.b].iter().all(|r| {
            let roster = r.state.roster();
            let rows = r
                .state
                .table()
                .rows(&roster.roster, &r.state.me, Instant::now());
            rows.iter()
                .filter(|row| row.state == crate::table::Liveness::Alive)
                .count()
                == 2
        });
        if alive {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the two bench nodes did not see each other within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("64B"), Ok(64));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("256 mib"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_reason() {
        for bad in ["", "MiB", "1.5GiB", "-1", "12 parsecs"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(bad.trim()), "{bad}: {e}");
        }
        assert!(parse_size("99999999999TiB")
            .unwrap_err()
            .contains("too large"));
    }
}
