#!/usr/bin/env python3
"""A soak of a drift cluster on one machine (not run in CI).

Starts `drift testnet` (NODES `drift run` processes, the balancing autopilot on), then for
DURATION shifts the load: every STEP seconds a sandbox VM with a random CPU demand is created
on a random node, and once the cluster holds MAX_VMS, a random VM is destroyed first. The
autopilot moves VMs off the hosts that become overloaded. At the end it waits for every
migration to settle and checks:

- no node panicked (its log) and every node still runs;
- every migration resolved (none `running` or `resolving` on any node);
- no VM lost or doubled: every VM the script created and did not destroy is on exactly one
  node, and no VM is on two;
- the RSS of every node at the start and at the end, and the CPU each node used while the
  cluster stood idle before the load, per second;
- the RSS of every node every SAMPLE seconds from convergence to the end, summarised as a time
  series (mean, max and min across nodes per sample, with the anonymous part, the node's own,
  apart from the file-backed part, the binary's pages shared by every node), and at the start
  and the end each node's anonymous, [heap] and shared memory (from /proc/PID/smaps) and
  thread count (mean across nodes), to tell warm-up to a plateau from growth without bound.

At the end the testnet is stopped and so are the sandbox VMs (their `drift vmm` processes
outlive their nodes by design). With --no-load no VM is created: the cluster stands idle for
DURATION (a baseline for the RSS curve). Environment variables reach the nodes (e.g.
MALLOC_ARENA_MAX=2 to cap glibc's arenas).

    deploy/soak.py [--drift target/release/drift] [--nodes 20] [--duration 1800] [--step 10]
                   [--sample 60] [--no-load]

Every loop is bounded in count and time; the cluster talks only to 127.0.0.1.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time


def drift(binary, *args, check=True, timeout=60):
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"drift {' '.join(args)}: {out.stderr.strip()}")
    return out


def read_json(binary, sock, what):
    out = drift(binary, what, "--json", "--socket", sock, check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def node_pids(dirpath, nodes):
    """The pid of each node's `drift run`, by its config path on the command line."""
    pids = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"run" not in cmd:
            continue
        for i in range(1, nodes + 1):
            if os.path.join(dirpath, f"node-{i}", "drift.toml").encode() in cmd:
                pids[i] = int(pid)
    return pids


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_detail(pid):
    """KiB of the process's anonymous memory, of its [heap], of shared memory it maps (a
    sandbox VM's memfd during a migration), and its thread count; None if it is gone."""
    anon = heap = shmem = 0
    threads = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            name = ""
            for line in f:
                first = line.split(None, 1)[0]
                # A mapping's header: range perms offset dev inode [name].
                if not first.endswith(":"):
                    parts = line.split(None, 5)
                    name = parts[5].strip() if len(parts) > 5 else ""
                elif first == "Anonymous:":
                    anon += int(line.split()[1])
                elif first == "Rss:" and name == "[heap]":
                    heap += int(line.split()[1])
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    shmem = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except OSError:
        return None
    return {"anon": anon, "heap": heap, "shmem": shmem, "threads": threads}


def memory_summary(pids):
    """Means across nodes of memory_detail, in MiB (threads as a count)."""
    details = [d for d in (memory_detail(pid) for pid in pids.values()) if d]
    if not details:
        return "no node running"
    mean = lambda k: sum(d[k] for d in details) / len(details)
    return (f"anonymous {mean('anon') / 1024:.1f} MiB, [heap] {mean('heap') / 1024:.1f} MiB, "
            f"shared {mean('shmem') / 1024:.1f} MiB, threads {mean('threads'):.1f} "
            f"(max {max(d['threads'] for d in details)})")


class RssSampler:
    """Samples the RSS (and its parts) of every node every `interval` seconds on a thread of
    its own, at most `max_samples` times, until stopped."""

    def __init__(self, pids, interval, max_samples):
        self.pids, self.interval, self.max_samples = pids, interval, max_samples
        self.samples = []  # (seconds since start, {node: RSS MiB})
        self.start = time.time()
        self.stop_event = threading.Event()
        self.sample()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self):
        rss = {}
        for i, pid in self.pids.items():
            try:
                rss[i] = rss_parts_mib(pid)
            except OSError:
                pass
        self.samples.append((time.time() - self.start, rss))

    def run(self):
        for _ in range(self.max_samples):
            if self.stop_event.wait(self.interval):
                return
            self.sample()

    def stop(self):
        self.stop_event.set()
        self.thread.join(timeout=10)
        self.sample()

    def report(self):
        lines = ["RSS MiB per node over time (s since convergence: total mean / max / min; "
                 "anonymous mean / max; file-backed mean; nodes):"]
        for t, rss in self.samples:
            if rss:
                total = [r["VmRSS"] for r in rss.values()]
                anon = [r["RssAnon"] for r in rss.values()]
                file = [r["RssFile"] for r in rss.values()]
                lines.append(f"  {t:6.0f} s: {mean(total):5.1f} / {max(total):5.1f} / "
                             f"{min(total):5.1f};  {mean(anon):5.1f} / {max(anon):5.1f};  "
                             f"{mean(file):5.1f}  ({len(rss)})")
        return "\n".join(lines)

    def latest(self):
        """The last sample: 'RSS mean M, max X MiB (anonymous mean A)'."""
        rss = self.samples[-1][1]
        if not rss:
            return "RSS: no node running"
        total = [r["VmRSS"] for r in rss.values()]
        return (f"RSS mean {mean(total):.1f}, max {max(total):.1f} MiB "
                f"(anonymous mean {mean([r['RssAnon'] for r in rss.values()]):.1f})")


def mean(values):
    return sum(values) / len(values)


def rss_parts_mib(pid):
    """VmRSS and its parts RssAnon, RssFile (the binary's pages, shared by every node) and
    RssShmem, in MiB."""
    parts = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                parts[key] = int(line.split()[1]) / 1024
    return parts


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drift", default="target/release/drift")
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--duration", type=int, default=1800, help="seconds of shifting load")
    p.add_argument("--step", type=int, default=10, help="seconds between load changes")
    p.add_argument("--max-vms", type=int, default=40)
    p.add_argument("--idle", type=int, default=60, help="seconds of idle CPU measurement")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sample", type=int, default=60, help="seconds between RSS samples")
    p.add_argument("--no-load", action="store_true",
                   help="create no VM: the cluster stands idle for DURATION (baseline)")
    args = p.parse_args()
    if args.sample <= 0 or args.step <= 0:
        p.error("--sample and --step must be positive")
    malloc_env = {k: v for k, v in os.environ.items()
                  if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if malloc_env:
        print(f"allocator environment of the nodes: {malloc_env}", flush=True)
    rng = random.Random(args.seed)
    binary = os.path.abspath(args.drift)
    work = tempfile.mkdtemp(prefix="drift-soak-")
    sock = lambda i: os.path.join(work, f"node-{i}", "drift.sock")
    log = open(os.path.join(work, "testnet.log"), "w")
    testnet = subprocess.Popen(
        [binary, "testnet", "--nodes", str(args.nodes), "--dir", work, "--interval", "1s"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    failures = []
    sampler = None
    try:
        # Converged: node-1's table holds every node alive (at most 180 s).
        deadline = time.time() + 180
        while time.time() < deadline:
            t = read_json(binary, sock(1), "table")
            if t and sum(r["state"] == "alive" for r in t["rows"]) == args.nodes:
                break
            time.sleep(1)
        else:
            raise RuntimeError("the testnet did not converge in 180 s")
        pids = node_pids(work, args.nodes)
        if len(pids) != args.nodes:
            raise RuntimeError(f"found {len(pids)} node processes of {args.nodes}")
        rss_start = {i: rss_mib(pid) for i, pid in pids.items()}
        memory_start = memory_summary(pids)
        # Bounded: idle + load + settle (300 s), with a margin.
        sampler = RssSampler(pids, args.sample,
                             (args.idle + args.duration + 300) // args.sample + 10)
        cpu0 = {i: cpu_seconds(pid) for i, pid in pids.items()}
        time.sleep(args.idle)
        idle_cpu = {i: (cpu_seconds(pid) - cpu0[i]) / args.idle for i, pid in pids.items()}
        print(f"converged; idle CPU per node over {args.idle} s: mean "
              f"{sum(idle_cpu.values()) / len(idle_cpu) * 100:.2f} %, max "
              f"{max(idle_cpu.values()) * 100:.2f} % of a core", flush=True)

        live = {}  # VM name -> node it was created on
        created = destroyed = 0
        steps = args.duration // args.step
        for step in range(steps):
            started = time.time()
            if args.no_load:
                if step % 30 == 0:
                    print(f"{step * args.step} s: idle (no load); {sampler.latest()}",
                          flush=True)
                time.sleep(args.step)
                continue
            if len(live) >= args.max_vms:
                name = rng.choice(sorted(live))
                where = locate(binary, sock, args.nodes).get(name, [])
                if len(where) == 1:
                    out = drift(binary, "vm", "destroy", name, "--socket", sock(where[0]),
                                check=False)
                    if out.returncode == 0:
                        del live[name]
                        destroyed += 1
            node = rng.randint(1, args.nodes)
            name = f"soak-{step}"
            demand = rng.choice([0.1, 0.2, 0.3, 0.5])
            out = drift(binary, "vm", "create", name, "--memory-mib", "16", "--demand",
                        str(demand), "--dirty-mib-per-s", "1", "--socket", sock(node),
                        check=False)
            if out.returncode == 0:
                live[name] = node
                created += 1
            if step % 30 == 0:
                print(f"{step * args.step} s: {created} created, "
                      f"{destroyed} destroyed, {len(live)} live; {sampler.latest()}", flush=True)
            time.sleep(max(0.0, args.step - (time.time() - started)))

        # Settle: no migration running or resolving anywhere (at most 300 s).
        deadline = time.time() + 300
        while time.time() < deadline:
            busy = [m for i in range(1, args.nodes + 1)
                    for m in (read_json(binary, sock(i), "migrations") or {}).get("migrations", [])
                    if m["state"] in ("running", "resolving")]
            if not busy:
                break
            time.sleep(2)
        else:
            failures.append(f"{len(busy)} migrations still unresolved after 300 s")
        outcomes = {}
        for i in range(1, args.nodes + 1):
            for m in (read_json(binary, sock(i), "migrations") or {}).get("migrations", []):
                if m["role"] == "source":
                    outcomes[m["state"]] = outcomes.get(m["state"], 0) + 1
        where = locate(binary, sock, args.nodes)
        for name in live:
            if len(where.get(name, [])) != 1:
                failures.append(f"VM {name} is on nodes {where.get(name, [])}")
        for name, nodes in where.items():
            if name not in live:
                failures.append(f"VM {name} was destroyed but is on nodes {nodes}")
        for i, pid in pids.items():
            if not os.path.exists(f"/proc/{pid}"):
                failures.append(f"node-{i} is not running")
        rss_end = {i: rss_mib(pid) for i, pid in pids.items() if os.path.exists(f"/proc/{pid}")}
        memory_end = memory_summary(pids)
        sampler.stop()
        for i in range(1, args.nodes + 1):
            with open(os.path.join(work, f"node-{i}", "drift.log"), errors="replace") as f:
                if "panicked" in f.read():
                    failures.append(f"node-{i} panicked (its drift.log)")
        print(f"VMs: {created} created, {destroyed} destroyed, {len(live)} live; "
              f"migrations by outcome (source side): {outcomes}")
        print("RSS MiB per node, start -> end: " + ", ".join(
            f"node-{i} {rss_start[i]:.0f}->{rss_end.get(i, float('nan')):.0f}"
            for i in sorted(rss_start)))
        growth = [rss_end[i] - rss_start[i] for i in rss_end]
        if growth:
            print(f"RSS growth: mean {sum(growth) / len(growth):+.1f} MiB, "
                  f"max {max(growth):+.1f} MiB")
        print(sampler.report())
        print(f"memory per node (mean) at the start: {memory_start}")
        print(f"memory per node (mean) at the end:   {memory_end}", flush=True)
    except Exception as e:  # the report names what broke
        failures.append(str(e))
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        os.killpg(testnet.pid, signal.SIGINT)
        try:
            testnet.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(testnet.pid, signal.SIGKILL)
        stop_vmms(work)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        print(f"logs: {work}")
        return 1
    print(f"ok (logs: {work})")
    return 0


def stop_vmms(dirpath):
    """Stops the sandbox VMs' `drift vmm` processes under `dirpath`: they outlive their nodes
    by design (SIGTERM, then SIGKILL after 10 s)."""
    prefix = (dirpath.rstrip("/") + "/").encode()
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"vmm" in cmd and any(a.startswith(prefix) for a in cmd):
            pids.append(int(pid))
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.5)
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not pids:
            return


def locate(binary, sock, nodes):
    """VM name -> the nodes that hold it (running or paused)."""
    where = {}
    for i in range(1, nodes + 1):
        v = read_json(binary, sock(i), "vms") or {}
        for vm in v.get("vms", []):
            if vm["state"] in ("running", "paused", "incoming"):
                where.setdefault(vm["name"], []).append(i)
    return where


if __name__ == "__main__":
    sys.exit(main())
