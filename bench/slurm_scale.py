#!/usr/bin/env python3
"""Sharing at scale under Slurm: one step of N tasks (default 64 and 128) on ONE node,
each task `hpcrun exec IMG true`, private (--no-sharens) vs shared, and the second step
of a job (warm where the keeper outlives a step: proctrack/linuxproc or pgid; under
proctrack/cgroup each step builds its own container, so "second" equals "shared").
Not part of CI.

Usage:
    bench/slurm_scale.py [--runs R] [--tasks 64,128] [--node NAME] [--hpcrun PATH] [--user NAME] [--json]

Needs the test Slurm (tests/slurm-up.sh). Started as root it re-runs itself as --user;
outside an allocation, inside `salloc -O -N 1 -n MAX` on --node (default: any one node).
Besides wall time it reports the per-task cost: CPU time of the whole machine
(/proc/stat, all CPUs, user+system) during the step, minus that of `srun true` with as
many tasks, divided by N. On a machine with few cores that, not wall time, says what a
task costs. Python 3 stdlib only.
"""

import argparse
import os
import shutil
import statistics
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from sharing import make_image  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds():
    """CPU seconds spent so far by all CPUs, not idle (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / TICK  # minus idle and iowait


def timed(argv, cwd):
    c0 = busy_seconds()
    t0 = time.perf_counter()
    _, cp = benchlib.run_once(argv, cwd)
    return time.perf_counter() - t0, busy_seconds() - c0, cp


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, runs=5)
    p.add_argument("--tasks", default="64,128", help="task counts per step (64,128)")
    p.add_argument("--node", help="the node to run on (any one by default)")
    args = p.parse_args()
    counts = [int(n) for n in args.tasks.split(",")]
    benchlib.reexec_as_user(args.user)
    if not shutil.which("srun"):
        sys.exit("error: no srun here: start Slurm first (tests/slurm-up.sh)")
    if "SLURM_JOB_ID" not in os.environ:
        where = ["-w", args.node] if args.node else []
        cmd = ["salloc", "-Q", "-O", "-N", "1", "-n", str(max(counts))] + where
        os.execvp(cmd[0], cmd + [sys.executable, os.path.abspath(sys.argv[0])] + sys.argv[1:])
    hpcrun = benchlib.find_hpcrun(args.hpcrun)
    return benchlib.in_work_dir(lambda work: bench(args, counts, hpcrun, work))


def bench(args, counts, hpcrun, work):
    img = make_image(work)
    conf = f"{work}/warm.yaml"
    with open(conf, "w") as f:
        f.write("share_idle_timeout: 60\n")
    env = ["env", f"HPCRUN_CONFIG={conf}"]
    results = {}
    for n in counts:
        srun = env + ["srun", "-O", "-N", "1", "-n", str(n), "--kill-on-bad-exit=1"]
        tools = {"srun-true": srun + ["true"], "private": srun + [hpcrun, "exec", "--no-sharens", img, "true"]}
        rows = {k: {"wall": [], "cpu": []} for k in ("srun-true", "private", "shared", "second")}
        for r in range(args.runs):
            for name in ("srun-true", "private"):
                dt, cpu, cp = timed(tools[name], work)
                if cp.returncode == 0:
                    rows[name]["wall"].append(dt)
                    rows[name]["cpu"].append(cpu)
            fresh = f"{work}/r{n}-{r}.sqfs"  # a new image file: a new container, never an earlier round's
            shutil.copy(img, fresh)
            step = srun + [hpcrun, "exec", fresh, "true"]
            for name in ("shared", "second"):  # the same job: the second step follows the first
                dt, cpu, cp = timed(step, work)
                if cp.returncode == 0:
                    rows[name]["wall"].append(dt)
                    rows[name]["cpu"].append(cpu)
        results[n] = {
            k: {
                "wall_ms": statistics.median(v["wall"]) * 1e3 if v["wall"] else None,
                "cpu_ms": statistics.median(v["cpu"]) * 1e3 if v["cpu"] else None,
            }
            for k, v in rows.items()
        }
    info = dict(benchlib.host_info(), rounds=args.runs, hpcrun=hpcrun, node=os.environ.get("SLURM_NODELIST"))
    if args.json:
        benchlib.dump_json({"info": info, "results": results})
        return 0
    print(f"one step on one node ({info['node']}), {args.runs} rounds, {info['cpus']} CPUs, as {info['user']}")
    for n, res in results.items():
        base = res["srun-true"]["cpu_ms"] or 0
        print(f"\n{n} tasks        wall ms   CPU ms   CPU ms per task (minus srun true)")
        for k, v in res.items():
            if v["wall_ms"] is None:
                print(f"  {k:12} failed")
                continue
            per = (v["cpu_ms"] - base) / n if k != "srun-true" else v["cpu_ms"] / n
            print(f"  {k:12} {v['wall_ms']:8.0f} {v['cpu_ms']:8.0f} {per:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
