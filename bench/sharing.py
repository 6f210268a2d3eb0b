#!/usr/bin/env python3
"""Node-level sharing under Slurm: wall time of one job step of N tasks that each run
`hpcrun exec IMG true`, with and without sharing, against a single task and against
srun's own cost.

Usage:
    bench/sharing.py [--runs R] [--tasks N] [--hpcrun PATH] [--user NAME] [--json]

Needs a working Slurm on this node (tests/slurm-up.sh starts one). Started as root, it
re-runs itself as --user (default hpctest); outside an allocation it re-runs itself
inside `salloc -O -n N` so that every timed command is a job step, not a new job.
Over R interleaved rounds it times:

    srun-true    srun -O -n N true                                   (srun alone)
    single       srun -O -n 1 hpcrun exec --no-sharens IMG true
    private      srun -O -n N hpcrun exec --no-sharens IMG true      (N containers)
    shared       srun -O -n N hpcrun exec IMG true                   (one container per step;
                 share_idle_timeout 0: each step starts its own)
    shared-warm  as shared, share_idle_timeout 60: the container stays between steps

The image is busybox-static in a squashfs. Python 3 stdlib only.
"""

import argparse
import os
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def make_image(work):
    root = work + "/root"
    for d in ("bin", "etc", "dev", "proc", "sys", "tmp", "home"):
        os.makedirs(f"{root}/{d}")
    shutil.copy("/bin/busybox", root + "/bin/busybox")
    for applet in ("sh", "true"):
        os.symlink("busybox", f"{root}/bin/{applet}")
    img = work + "/busybox.sqfs"
    subprocess.run(["mksquashfs", root, img, "-noappend", "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)
    os.chmod(img, 0o644)
    return img


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, runs=10)
    p.add_argument("--tasks", type=int, default=32, help="tasks per step (32)")
    args = p.parse_args()
    benchlib.reexec_as_user(args.user)
    if not shutil.which("srun"):
        sys.exit("error: no srun here: start Slurm first (tests/slurm-up.sh)")
    if "SLURM_JOB_ID" not in os.environ:
        os.execvp(
            "salloc",
            ["salloc", "-Q", "-O", "-n", str(args.tasks), sys.executable, os.path.abspath(sys.argv[0])] + sys.argv[1:],
        )
    hpcrun = benchlib.find_hpcrun(args.hpcrun)
    return benchlib.in_work_dir(lambda work: bench(args, hpcrun, work))


def bench(args, hpcrun, work):
    img = make_image(work)
    confs = {}
    for name, idle in (("cold", 0), ("warm", 60)):
        confs[name] = f"{work}/{name}.yaml"
        with open(confs[name], "w") as f:
            f.write(f"share_idle_timeout: {idle}\n")
    n = str(args.tasks)
    srun = ["srun", "-O", "--kill-on-bad-exit=1"]
    tools = {
        "srun-true": srun + ["-n", n, "true"],
        "single": srun + ["-n", "1", hpcrun, "exec", "--no-sharens", img, "true"],
        "private": srun + ["-n", n, hpcrun, "exec", "--no-sharens", img, "true"],
        "shared": ["env", f"HPCRUN_CONFIG={confs['cold']}"] + srun + ["-n", n, hpcrun, "exec", img, "true"],
        "shared-warm": ["env", f"HPCRUN_CONFIG={confs['warm']}"] + srun + ["-n", n, hpcrun, "exec", img, "true"],
    }
    problems, notes = benchlib.probe(tools, cwd=work)
    times, fails = benchlib.measure(tools, args.runs, cwd=work)
    refs = {"/single": "single", "/private": "private"}
    rows = benchlib.summarize(times, refs)
    med = {r["tool"]: r["median_ms"] for r in rows}
    minus = {k: med[k] - med["srun-true"] for k in med if "srun-true" in med}  # hpcrun's share
    info = dict(benchlib.host_info(), rounds=args.runs, tasks=args.tasks, hpcrun=hpcrun)
    failures = {k: v for k, v in fails.items() if v}
    if args.json:
        benchlib.dump_json(
            {
                "info": info,
                "results": rows,
                "minus_srun_ms": minus,
                "commands": {k: benchlib.shell_join(v) for k, v in tools.items()},
                "unavailable": problems,
                "failed_runs": failures,
                "notes": notes,
            }
        )
        return 1 if problems else 0
    print(
        f"one step of {args.tasks} tasks, {args.runs} interleaved rounds, as {info['user']}, "
        f"{info['cpus']} CPUs, kernel {info['kernel']}"
    )
    print()
    benchlib.print_table(rows, refs)
    print()
    print("minus srun's own cost (median - srun-true median), ms:")
    for k, v in minus.items():
        if k != "srun-true":
            print(f"  {k:12} {v:8.1f}")
    print()
    benchlib.print_commands(tools)
    benchlib.print_trouble(notes, problems, failures, args.runs)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
