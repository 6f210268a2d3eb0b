"""Shared helpers for the bench/ scripts (stdlib only): re-exec as the unprivileged
user, locate tools, time commands in interleaved shuffled rounds, and report."""

import json
import math
import os
import pwd
import random
import shutil
import statistics
import subprocess
import sys
import time

DEFAULT_USER = "hpctest"
HPCRUN_FALLBACK = "/opt/hpcrun-venv/bin/hpcrun"


def add_common_args(p, runs):
    p.add_argument("--runs", type=int, default=runs, help=f"timed rounds (default {runs})")
    p.add_argument("--hpcrun", help=f"hpcrun executable (default: `hpcrun` on PATH, else {HPCRUN_FALLBACK})")
    p.add_argument(
        "--user", default=DEFAULT_USER, help=f"when started as root, re-run as this user (default {DEFAULT_USER})"
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")


def reexec_as_user(user):
    """Started as root? Re-run this very script as `user`, so that every timed command
    runs unprivileged and without a runuser wrapper in the measurement. Never returns
    when it re-executes; returns None when already unprivileged (or user is root)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        print("warning: running as root: timings are not those of an unprivileged user", file=sys.stderr)
        return
    # The root's interpreter may live under /root (pyenv): use the system one then.
    py = sys.executable
    if not py or not _user_can_exec(user, py):
        py = "/usr/bin/python3"
    script = os.path.abspath(sys.argv[0])
    # runuser without -l keeps the environment but sets HOME, SHELL, USER and LOGNAME.
    os.execvp("runuser", ["runuser", "-u", user, "--", py, script] + sys.argv[1:])


def _user_can_exec(user, path):
    return (
        subprocess.run(
            ["runuser", "-u", user, "--", "test", "-x", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ).returncode
        == 0
    )


def find_hpcrun(given):
    exe = given or shutil.which("hpcrun") or HPCRUN_FALLBACK
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        sys.exit(f"error: hpcrun not found or not executable: {exe}")
    return exe


def in_work_dir(fn):
    """fn(work) with a fresh temporary directory the user's tools can read; removed after."""
    import tempfile

    work = tempfile.mkdtemp(prefix="hpcrun-bench-")
    os.chmod(work, 0o755)
    try:
        return fn(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_once(argv, cwd=None):
    """(seconds, CompletedProcess) for one run; output captured, not shown."""
    t0 = time.perf_counter()
    cp = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return time.perf_counter() - t0, cp


def probe(tools, cwd=None):
    """Run each tool once (also a warm-up). A tool is an argv or a list of alternative
    argvs, tried in order: the first that works is kept in `tools` (in place).
    Returns ({name: failure} for tools with none working, [notes on fallbacks])."""
    problems, notes = {}, []
    for name in list(tools):
        cands = tools[name] if isinstance(tools[name][0], list) else [tools[name]]
        errs = []
        for argv in cands:
            _, cp = run_once(argv, cwd)
            if cp.returncode == 0:
                tools[name] = argv
                break
            errs.append(describe_failure(argv, cp))
        else:
            problems[name] = "; ".join(errs)
            del tools[name]
            continue
        if errs:
            notes.append(f"{name}: {errs[0]}; timed `{shell_join(argv)}` instead")
    return problems, notes


def describe_failure(argv, cp):
    err = (cp.stderr or b"").decode(errors="replace").strip()
    return f"`{shell_join(argv)}` exited {cp.returncode}: {err[-800:] or '(no stderr)'}"


def shell_join(argv):
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def measure(tools, rounds, cwd=None, progress=True):
    """Each round runs every tool once, in a fresh random order. Returns
    {name: [seconds...]} and {name: [failure descriptions]} (failed runs not timed)."""
    times = {n: [] for n in tools}
    fails = {n: [] for n in tools}
    names = list(tools)
    for r in range(rounds):
        random.shuffle(names)
        for n in names:
            dt, cp = run_once(tools[n], cwd)
            if cp.returncode == 0:
                times[n].append(dt)
            else:
                fails[n].append(describe_failure(tools[n], cp))
        if progress and sys.stderr.isatty():
            print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return times, fails


def p90(xs):
    """90th percentile, nearest-rank method."""
    s = sorted(xs)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]


def summarize(times, refs):
    """Rows of stats in ms; ratio columns are medians divided by each ref's median."""
    med = {n: statistics.median(v) * 1e3 for n, v in times.items() if v}
    rows = []
    for n, v in times.items():
        if not v:
            continue
        row = {"tool": n, "n": len(v), "median_ms": med[n], "p90_ms": p90(v) * 1e3, "min_ms": min(v) * 1e3}
        for label, ref in refs.items():
            row[label] = med[n] / med[ref] if ref in med else None
        rows.append(row)
    return rows


def print_table(rows, refs):
    cols = ["tool", "n", "median ms", "p90 ms", "min ms"] + list(refs)
    body = []
    for r in rows:
        cells = [r["tool"], str(r["n"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['min_ms']:.2f}"]
        cells += ["n/a" if r[k] is None else f"{r[k]:.2f}x" for k in refs]
        body.append(cells)
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(cols))
    print(line(["-" * w for w in widths]))
    for b in body:
        print(line(b))


def print_commands(commands):
    """What each row timed: {name: argv or shell text}."""
    width = max(map(len, commands), default=0)
    for n, c in commands.items():
        print(f"  {n:{width}} {c if isinstance(c, str) else shell_join(c)}")


def print_trouble(notes, problems, failures, runs):
    """The closing lines of a report: fallbacks taken, tools unavailable, failed runs."""
    for n in notes:
        print(f"note: {n}")
    for n, why in problems.items():
        print(f"UNAVAILABLE {n}: {why}")
    for n, f in failures.items():
        if f:
            print(f"FAILED {n}: {len(f)} of {runs} runs, e.g. {f[0]}")


def dump_json(obj):
    json.dump(obj, sys.stdout, indent=2)
    print()


def host_info():
    return {
        "kernel": os.uname().release,
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "uid": os.getuid(),
        "cpus": os.cpu_count(),
    }
