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
  cluster stood idle before the load, per second.

    deploy/soak.py [--drift target/release/drift] [--nodes 20] [--duration 1800] [--step 10]

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
    args = p.parse_args()
    rng = random.Random(args.seed)
    binary = os.path.abspath(args.drift)
    work = tempfile.mkdtemp(prefix="drift-soak-")
    sock = lambda i: os.path.join(work, f"node-{i}", "drift.sock")
    log = open(os.path.join(work, "testnet.log"), "w")
    testnet = subprocess.Popen(
        [binary, "testnet", "--nodes", str(args.nodes), "--dir", work, "--interval", "1s"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    failures = []
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
                      f"{destroyed} destroyed, {len(live)} live", flush=True)
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
    except Exception as e:  # the report names what broke
        failures.append(str(e))
    finally:
        os.killpg(testnet.pid, signal.SIGINT)
        try:
            testnet.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(testnet.pid, signal.SIGKILL)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        print(f"logs: {work}")
        return 1
    print(f"ok (logs: {work})")
    return 0


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
