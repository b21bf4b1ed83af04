//! `drift bench`: measurements that print figures next to a baseline measured or computed in
//! the same run. Every node a benchmark needs runs inside the benchmark's own process, on
//! loopback, from a testnet directory generated in a private temporary directory.
//!
//! - [`gossip`]: convergence time and gossip bytes per node, next to the floor the reports
//!   alone need.
//! - [`transfer`]: the same bytes over plain TCP, rustls over TCP, a drift stream (TCP, Noise
//!   and Yamux, and QUIC) and drift's data plane (one and several connections), received,
//!   counted and hashed, with each end's CPU time: the cost of the encrypted transports.
//! - [`migrate`]: live migrations of a sandbox VM between two nodes in each mode, next to an
//!   idle VM of the same size, the raw stream throughput and the data plane's own rate; every
//!   VM is verified page by page on the target.

pub mod gossip;
pub mod migrate;
pub mod qemu;
pub mod transfer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::{Handle, Runtime};
use tokio_util::task::AbortOnDropHandle;

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

/// One side of a benchmark: `A` sends (node-1), `B` receives (node-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    A,
    B,
}

/// Where the two sides of a benchmark run.
#[derive(Debug, Clone)]
pub(crate) enum Ends {
    /// Both on the caller's runtime.
    Shared,
    /// Each on a runtime of its own ([`EndRuntime`]), so each side's CPU time reads apart.
    Apart([End; 2]),
}

/// One side's runtime, and its threads.
#[derive(Debug, Clone)]
pub(crate) struct End {
    handle: Handle,
    threads: Arc<Threads>,
}

impl Ends {
    /// Side `A` on `a`, side `B` on `b`.
    pub(crate) fn apart(a: &EndRuntime, b: &EndRuntime) -> Self {
        Self::Apart([a.end(), b.end()])
    }

    fn handle(&self, side: Side) -> Handle {
        match self {
            Self::Shared => Handle::current(),
            Self::Apart(ends) => ends[side as usize].handle.clone(),
        }
    }

    /// Spawns `task` on `side`'s runtime; dropping the handle aborts it.
    pub(crate) fn spawn<F>(&self, side: Side, task: F) -> AbortOnDropHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        AbortOnDropHandle::new(self.handle(side).spawn(task))
    }

    /// Runs `make()` to its end on `side`'s runtime: every task it spawns lands there. The
    /// future need not be `Send` (a node's start is not): it is driven from a blocking thread
    /// of the caller's runtime, or awaited in place when the sides share it.
    pub(crate) async fn run<F, T>(
        &self,
        side: Side,
        make: impl FnOnce() -> F + Send + 'static,
    ) -> anyhow::Result<T>
    where
        F: Future<Output = T>,
        T: Send + 'static,
    {
        match self {
            Self::Shared => Ok(make().await),
            Self::Apart(_) => {
                let handle = self.handle(side);
                tokio::task::spawn_blocking(move || handle.block_on(make()))
                    .await
                    .with_context(|| format!("running on side {side:?}'s runtime"))
            }
        }
    }

    /// CPU time so far of each side's threads, in nanoseconds; `None` when the sides share
    /// the caller's runtime (their CPU time cannot be told apart).
    pub(crate) fn cpu_ns(&self) -> Option<[u64; 2]> {
        match self {
            Self::Shared => None,
            Self::Apart([a, b]) => Some([a.threads.cpu_ns(), b.threads.cpu_ns()]),
        }
    }
}

/// A multi-thread tokio runtime for one side of a benchmark, whose threads (workers and
/// blocking threads alike) are counted as they start and stop, for their CPU time. Dropping it
/// shuts it down without waiting (allowed inside an async context).
#[derive(Debug)]
pub(crate) struct EndRuntime {
    rt: Option<Runtime>,
    end: End,
}

impl EndRuntime {
    /// A runtime of `workers` worker threads, named `drift-bench-{name}`.
    pub(crate) fn new(name: &str, workers: usize) -> anyhow::Result<Self> {
        let threads = Arc::new(Threads::default());
        let (on_start, on_stop) = (threads.clone(), threads.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(format!("drift-bench-{name}"))
            .on_thread_start(move || on_start.started())
            .on_thread_stop(move || on_stop.stopped())
            .enable_all()
            .build()
            .with_context(|| format!("starting the {name} runtime"))?;
        let end = End {
            handle: rt.handle().clone(),
            threads,
        };
        Ok(Self { rt: Some(rt), end })
    }

    fn end(&self) -> End {
        self.end.clone()
    }
}

impl Drop for EndRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The threads of one runtime: those alive by id, and the CPU time of those that ended (each
/// reads its own as it stops).
#[derive(Debug, Default)]
pub(crate) struct Threads(Mutex<ThreadSet>);

#[derive(Debug, Default)]
struct ThreadSet {
    live: Vec<i32>,
    ended_ns: u64,
}

impl Threads {
    fn lock(&self) -> std::sync::MutexGuard<'_, ThreadSet> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the calling thread in.
    fn started(&self) {
        let tid = nix::unistd::gettid().as_raw();
        self.lock().live.push(tid);
    }

    /// Counts the calling thread out, keeping the CPU time it used.
    fn stopped(&self) {
        let tid = nix::unistd::gettid().as_raw();
        let used = thread_cpu_ns(tid).unwrap_or(0);
        let mut set = self.lock();
        set.live.retain(|&t| t != tid);
        set.ended_ns += used;
    }

    /// CPU time used so far by every thread counted in, in nanoseconds.
    pub(crate) fn cpu_ns(&self) -> u64 {
        let set = self.lock();
        set.ended_ns
            + set
                .live
                .iter()
                .filter_map(|&tid| thread_cpu_ns(tid))
                .sum::<u64>()
    }
}

/// CPU time (user + system) used by thread `tid` of this process, in nanoseconds: the
/// scheduler's exact figure (`schedstat`), else `stat`'s utime + stime in clock ticks.
pub(crate) fn thread_cpu_ns(tid: i32) -> Option<u64> {
    let dir = format!("/proc/self/task/{tid}");
    if let Some(ns) = std::fs::read_to_string(format!("{dir}/schedstat"))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
    {
        return Some(ns);
    }
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let ticks = stat_ticks(&stat)?;
    Some((ticks as f64 * 1e9 / crate::hypervisor::qemu::clock_ticks()) as u64)
}

/// utime + stime of a `stat` line, in clock ticks (fields 14 and 15; the command name may
/// hold spaces and parentheses, so fields are counted from after the last `)`).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Two nodes of one roster, started in this process and connected to each other.
#[derive(Debug)]
pub(crate) struct Pair {
    pub(crate) a: Running,
    pub(crate) b: Running,
    /// Where each node runs: `a` on side `A`, `b` on side `B`.
    pub(crate) ends: Ends,
}

impl Pair {
    /// Stops both nodes, each on its own runtime.
    pub(crate) async fn shutdown(self) {
        let Self { a, b, ends } = self;
        let _ = ends.run(Side::A, move || a.shutdown()).await;
        let _ = ends.run(Side::B, move || b.shutdown()).await;
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

/// Starts `a`, then `b`, on the caller's runtime, and waits until each holds the other alive
/// in its table.
pub(crate) async fn start_pair(configs: [Config; 2], timeout: Duration) -> anyhow::Result<Pair> {
    start_pair_on(configs, timeout, Ends::Shared).await
}

/// [`start_pair`], node `a` on side `A` of `ends` and node `b` on side `B`.
pub(crate) async fn start_pair_on(
    configs: [Config; 2],
    timeout: Duration,
    ends: Ends,
) -> anyhow::Result<Pair> {
    let [ca, cb] = configs;
    let a = ends
        .run(Side::A, move || daemon::start(ca))
        .await?
        .context("starting node-1")?;
    start_second(a, cb, ends, timeout, "node-2").await
}

/// Starts node b (`cb`, named `what` in errors) next to a started node a, on its side's
/// runtime, and waits until they see each other; on any failure node a is stopped too.
pub(crate) async fn start_second(
    a: Running,
    cb: Config,
    ends: Ends,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<Pair> {
    let b = ends
        .run(Side::B, move || daemon::start(cb))
        .await
        .and_then(|r| r.map_err(anyhow::Error::from));
    let b = match b {
        Ok(b) => b,
        Err(e) => {
            let _ = ends.run(Side::A, move || a.shutdown()).await;
            return Err(e.context(format!("starting {what}")));
        }
    };
    let pair = Pair { a, b, ends };
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
    use super::*;

    #[test]
    fn stat_lines_give_utime_plus_stime() {
        let line = "4242 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 1234 56 7 8 20 0 3 0";
        assert_eq!(stat_ticks(line), Some(1290));
        assert_eq!(stat_ticks("4242 (short) S 1 2"), None);
        let tid = nix::unistd::gettid().as_raw();
        assert!(
            thread_cpu_ns(tid).is_some(),
            "this thread's CPU time is readable"
        );
    }

    /// Keeps the calling thread busy until it has used `d` of CPU time.
    fn burn(d: Duration) {
        let tid = nix::unistd::gettid().as_raw();
        let until = thread_cpu_ns(tid).unwrap() + d.as_nanos() as u64;
        let mut x = 0u64;
        while thread_cpu_ns(tid).unwrap() < until {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
    }

    #[test]
    fn a_thread_that_ended_still_counts() {
        let threads = Arc::new(Threads::default());
        let t = threads.clone();
        std::thread::spawn(move || {
            t.started();
            burn(Duration::from_millis(50));
            t.stopped();
        })
        .join()
        .unwrap();
        let ns = threads.cpu_ns();
        assert!(ns >= 50_000_000, "{ns} ns");
        assert!(threads.lock().live.is_empty());
    }

    #[tokio::test]
    async fn each_side_counts_only_its_own_threads_and_drops_inside_async_code() {
        let (a, b) = (
            EndRuntime::new("a", 2).unwrap(),
            EndRuntime::new("b", 2).unwrap(),
        );
        let ends = Ends::apart(&a, &b);
        let [a0, b0] = ends.cpu_ns().unwrap();
        ends.spawn(Side::A, async { burn(Duration::from_millis(100)) })
            .await
            .unwrap();
        let [a1, b1] = ends.cpu_ns().unwrap();
        assert!(a1 - a0 >= 100_000_000, "side A used {} ns", a1 - a0);
        assert!(b1 - b0 < 50_000_000, "side B used {} ns", b1 - b0);
        // A future that is not Send runs too, and the tasks it spawns land on its side.
        let spawned_on = ends
            .run(Side::B, || async {
                let here = std::rc::Rc::new(());
                let tid = tokio::spawn(async { nix::unistd::gettid().as_raw() }).await;
                drop(here);
                tid.unwrap()
            })
            .await
            .unwrap();
        assert!(b.end.threads.lock().live.contains(&spawned_on));
        assert!(!a.end.threads.lock().live.contains(&spawned_on));
        drop((a, b));
        assert!(Ends::Shared.cpu_ns().is_none());
    }

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
