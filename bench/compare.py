#!/usr/bin/env python3
"""Every row of issue 13's table, hpcrun side by side with ch-run, the host and the kernel.

Usage (as root: it builds images, measures the kernel column, then re-runs itself as --user):
    bench/compare.py [--runs N] [--comp zstd,gzip] [--loop 1000] [--no-read] [--hpcrun PATH] [--user NAME]

Images (squashfs, one per compressor): busybox, and a Python tree of 5000 tiny modules
(bench/imports.py builds it); one 1 GiB image of random data for the read rows. Rows, each
timed over interleaved shuffled rounds (medians, ms):

  start             `true`, a container of its own      hpcrun --no-sharens | ch-run | host | kernel
  start joined      `true`, joining a kept container    hpcrun --sharens    | ch-run
  32 at once        32 starts launched together         private, --sharens  | ch-run | host
  imports fresh     5000 imports, fresh mount           hpcrun --no-sharens | ch-run | host | kernel
  imports warm      5000 imports, joined container      hpcrun --sharens    | ch-run | host dir
  imports dir       5000 imports, directory image       hpcrun DIR          | ch-run DIR | host
                    (a distribution's layout: no overlay; ", overlay": mount points missing)
  read 1 / 2        1 GiB sequential read, 1 or 2 readers (MiB/s)           | ch-run | host | kernel
  loop              N `exec IMG true` in a row (total s): private, --sharens | ch-run

`kernel` is a root-only loop mount of the same image (chroot), measured before the script
drops privileges: the physical limit. ch-run is Debian's charliecloud-runtime
(bench/setup.sh installs it). Every ratio is hpcrun's time / ch-run's time, read rows
included: below 1.00x hpcrun is faster. Python 3 stdlib only.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
import imports as pyimage  # noqa: E402

READ_MIB = 1024
FANOUT = 32


def sh(*argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)


def squash(tree, img, comp):
    sh("mksquashfs", tree, img, "-noappend", "-quiet", "-all-root", "-comp", comp)
    os.chmod(img, 0o644)


def busybox_tree(root):
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "home", "data"):
        os.makedirs(f"{root}/{d}")
    shutil.copy("/bin/busybox", root + "/bin/busybox")
    for a in ("sh", "true", "cat", "dd"):
        os.symlink("busybox", f"{root}/bin/{a}")
    with open(root + "/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(root + "/etc/group", "w") as f:  # ch-run binds the host's over it
        f.write("root:x:0:\n")
    sh("chmod", "-R", "a+rX", root)


def read_tree(root):
    """busybox plus /data/a and /data/b, READ_MIB/2 MiB of random data each."""
    busybox_tree(root)
    for name in ("a", "b"):
        with open(f"{root}/data/{name}", "wb") as f:
            for _ in range(READ_MIB // 2):
                f.write(os.urandom(1 << 20))
        os.chmod(f"{root}/data/{name}", 0o644)


def prepare(work, comps, with_read):
    """Build the trees and images (as root). Returns {name: path}."""
    p = {"bb-tree": work + "/bb", "py-tree": work + "/py"}
    busybox_tree(p["bb-tree"])
    pyimage.build_tree(p["py-tree"], 5000)
    for c in comps:
        p[f"bb-{c}"] = f"{work}/bb-{c}.sqfs"
        p[f"py-{c}"] = f"{work}/py-{c}.sqfs"
        squash(p["bb-tree"], p[f"bb-{c}"], c)
        squash(p["py-tree"], p[f"py-{c}"], c)
    if with_read:
        p["rd-tree"] = work + "/rd"
        p["rd"] = work + "/rd.sqfs"
        read_tree(p["rd-tree"])
        squash(p["rd-tree"], p["rd"], comps[0])
    for k in ("bb-tree", "py-tree"):
        sh("chmod", "-R", "a+rX", p[k])
    # the directory image as a distribution's base image has it: these mount points too
    t = work + "/pydir"
    shutil.copytree(p["py-tree"], t, symlinks=True)
    os.makedirs(t + "/var/tmp")
    for f in ("hosts", "resolv.conf", "localtime"):
        open(f"{t}/etc/{f}", "w").close()
    sh("chmod", "-R", "a+rX", t)
    p["dir-tree"] = t
    return p


def compile_hpcrun(hpcrun):
    """An editable install in a root-owned checkout has no .pyc the user could write:
    every start would compile hpcrun anew. Compile it (as root) so that the bench times
    what an installed hpcrun does."""
    main = os.path.join(os.path.dirname(os.path.realpath(hpcrun)), "hpcrun-main")  # its Python
    with open(main if os.path.exists(main) else hpcrun, "rb") as f:
        py = f.readline()[2:].split()[0].decode()
    cp = subprocess.run(
        [py, "-c", "import hpcrun, os; print(os.path.dirname(hpcrun.__file__))"], capture_output=True, text=True
    )
    if cp.returncode != 0:
        sys.exit(f"compare.py: cannot find hpcrun's package with {py}: {cp.stderr.strip()}")
    sh(py, "-m", "compileall", "-q", cp.stdout.strip())


def kernel_rows(p, comps, runs, with_read):
    """Root: loop-mount each image read-only once, time chroot runs (the physical limit)."""
    out = {}
    mnt = p["work"] + "/kmnt"
    os.makedirs(mnt, exist_ok=True)
    jobs = [(f"bb-{c}", f"start / {c}", ["chroot", mnt, "/bin/true"]) for c in comps]
    py = ["chroot", mnt, pyimage.PYTHON, "-E", "-S"]
    jobs += [(f"py-{c}", f"imports fresh / {c}", py + ["/mods/importall.py"]) for c in comps]
    if with_read:
        jobs.append(("rd", "read 1", ["chroot", mnt, "/bin/cat", "/data/a", "/data/b"]))
        jobs.append(("rd", "read 2", ["chroot", mnt, "/bin/sh", "-c", "cat /data/a >/dev/null & cat /data/b; wait"]))
    for img, row, argv in jobs:
        try:
            sh("mount", "-o", "loop,ro", p[img], mnt, stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            return out  # no loop devices here: no kernel column
        try:
            v = measure_calls({"k": as_call(argv)}, runs if row.startswith("start") else 3)["k"]
            if isinstance(v, float):
                out[row] = v
        finally:
            sh("umount", mnt)
    return out


def fanout(argv, n=FANOUT):
    """A callable for measure_calls: n copies of argv started at once, all waited for."""

    def go():
        ps = [
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(n)
        ]
        errs = [p.communicate()[1] for p in ps]
        bad = [(p.returncode, e) for p, e in zip(ps, errs) if p.returncode]
        return f"{len(bad)} of {n} failed, e.g. exit {bad[0][0]}: {bad[0][1][-300:]!r}" if bad else None

    return go


def loop(argv, n):
    def go():
        for _ in range(n):
            cp = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if cp.returncode:
                return f"exit {cp.returncode}: {cp.stderr[-300:]!r}"
        return None

    return go


def as_call(argv):
    def go():
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return f"exit {cp.returncode}: {cp.stderr[-300:]!r}" if cp.returncode else None

    return go


def measure_calls(calls, rounds):
    """{name: callable -> None or an error}; one warm-up, then rounds in shuffled order.
    Returns {name: median ms or an error string}."""
    times = {n: [] for n in calls}
    errs = {}
    names = list(calls)
    for r in range(rounds + 1):
        random.shuffle(names)
        for n in names:
            if n in errs:
                continue
            t0 = time.perf_counter()
            err = calls[n]()
            dt = time.perf_counter() - t0
            if err:
                errs[n] = err
            elif r:  # round 0: warm-up
                times[n].append(dt)
    return {n: errs.get(n) or statistics.median(times[n]) * 1e3 for n in calls}


def rows_for(p, comp, args, hpcrun, conf):
    """(row label, {column: callable}, rounds) for one compressor."""
    bb, py, tree = p[f"bb-{comp}"], p[f"py-{comp}"], p["py-tree"]
    priv = [hpcrun, "exec", "--no-sharens"]
    join = ["env", f"HPCRUN_CONFIG={conf}", hpcrun, "exec", "--sharens"]
    pyargs = [pyimage.PYTHON, "-E", "-S", "/mods/importall.py"]
    r = args.runs
    rows = [
        ("start", {"hpcrun": as_call(priv + [bb, "true"]), "ch-run": as_call(["ch-run", bb, "--", "true"]),
                   "host": as_call(["/bin/true"])}, r),
        ("start joined", {"hpcrun": as_call(join + [bb, "true"]), "ch-run": as_call(["ch-run", bb, "--", "true"])}, r),
        ("32 at once", {"hpcrun": fanout(priv + [bb, "true"]), "hpcrun shared": fanout(join + [bb, "true"]),
                        "ch-run": fanout(["ch-run", bb, "--", "true"]), "host": fanout(["/bin/true"])}, max(3, r // 5)),
        ("imports fresh", {"hpcrun": as_call(priv + [py] + pyargs), "ch-run": as_call(["ch-run", py, "--"] + pyargs),
                           "host": as_call(pyargs[:3] + [tree + "/mods/importall.py"])}, max(3, r // 5)),
        ("imports warm", {"hpcrun": as_call(join + [py] + pyargs), "ch-run": as_call(["ch-run", py, "--"] + pyargs),
                          "host": as_call(pyargs[:3] + [tree + "/mods/importall.py"])}, max(3, r // 5)),
    ]  # fmt: skip
    return rows


def common_rows(p, args, hpcrun, conf):
    tree = p["py-tree"]
    pyargs = [pyimage.PYTHON, "-E", "-S", "/mods/importall.py"]
    join = ["env", f"HPCRUN_CONFIG={conf}", hpcrun, "exec", "--sharens"]
    host = as_call(pyargs[:3] + [tree + "/mods/importall.py"])
    rows = [
        # a distribution's layout (every mount point, an empty /home): no overlay, as ch-run
        ("imports dir", {"hpcrun": as_call([hpcrun, "exec", p["dir-tree"]] + pyargs),
                         "ch-run": as_call(["ch-run", p["dir-tree"], "--"] + pyargs),
                         "host": host}, max(3, args.runs // 5)),
        # the bare tree, without /etc/hosts and the like: the overlay makes the mount points
        ("imports dir, overlay", {"hpcrun": as_call([hpcrun, "exec", tree] + pyargs),
                                  "ch-run": as_call(["ch-run", tree, "--"] + pyargs),
                                  "host": host}, max(3, args.runs // 5)),
    ]  # fmt: skip
    if "rd" in p:
        rd, t = p["rd"], p["rd-tree"]
        one = ["cat", "/data/a", "/data/b"]
        two = ["sh", "-c", "cat /data/a >/dev/null & cat /data/b; wait"]
        hp = [hpcrun, "exec", "--no-sharens", rd]
        rows += [
            ("read 1", {"hpcrun": as_call(hp + one), "ch-run": as_call(["ch-run", rd, "--"] + one),
                        "host": as_call(["cat", t + "/data/a", t + "/data/b"])}, 3),
            ("read 2", {"hpcrun": as_call(hp + two), "ch-run": as_call(["ch-run", rd, "--"] + two),
                        "host": as_call(["sh", "-c", f"cat {t}/data/a >/dev/null & cat {t}/data/b; wait"])}, 3),
        ]  # fmt: skip
    if args.loop:
        bb = p[f"bb-{args.comps[0]}"]
        rows.append(
            (f"loop {args.loop}", {"hpcrun": loop([hpcrun, "exec", "--no-sharens", bb, "true"], args.loop),
                                   "hpcrun shared": loop(join + [bb, "true"], args.loop),
                                   "ch-run": loop(["ch-run", bb, "--", "true"], args.loop)}, 1)
        )  # fmt: skip
    return rows


def cell(v, row):
    if isinstance(v, str):
        return "FAILED"
    if v is None:
        return ""
    if row.startswith("read"):
        return f"{READ_MIB / (v / 1e3):.0f} MiB/s"
    if row.startswith("loop"):
        return f"{v / 1e3:.2f} s"
    return f"{v:.1f}"


def report(results, kernel):
    cols = ["host", "kernel", "ch-run", "hpcrun", "hpcrun shared", "hpcrun / ch-run", "shared / ch-run"]
    lines = [["what"] + cols]
    for row, res in results:
        res = dict(res)
        if row in kernel:
            res["kernel"] = kernel[row]
        r = [row] + [cell(res.get(c), row) for c in cols[:5]]
        for col in ("hpcrun", "hpcrun shared"):
            a, b = res.get(col), res.get("ch-run")
            ok = isinstance(a, float) and isinstance(b, float)
            r.append(f"{a / b:.2f}x" if ok else "")
        lines.append(r)
    widths = [max(len(x[i]) for x in lines) for i in range(len(cols) + 1)]
    for i, x in enumerate(lines):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(x, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for row, res in results:
        for col, v in res.items():
            if isinstance(v, str):
                print(f"FAILED {row} / {col}: {v}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, runs=15)
    ap.add_argument("--comp", default="zstd,gzip", help="compressors of the images (zstd,gzip)")
    ap.add_argument("--loop", type=int, default=1000, help="starts in the workflow loop row (0: none)")
    ap.add_argument("--no-read", action="store_true", help="skip the 1 GiB read rows")
    ap.add_argument("--only", action="append", help="rows whose label contains this (repeatable)")
    ap.add_argument("--work", help=argparse.SUPPRESS)  # the root half hands its images over
    args = ap.parse_args()
    args.comps = args.comp.split(",")
    hpcrun = benchlib.find_hpcrun(args.hpcrun)
    if os.geteuid() == 0 and not args.work:
        return root_half(args, hpcrun)
    return user_half(args, hpcrun)


def root_half(args, hpcrun):
    import tempfile

    work = tempfile.mkdtemp(prefix="hpcrun-compare-")
    os.chmod(work, 0o755)
    try:
        compile_hpcrun(hpcrun)
        t0 = time.perf_counter()
        p = prepare(work, args.comps, not args.no_read)
        p["work"] = work
        print(f"images built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        kernel = kernel_rows(p, args.comps, args.runs, not args.no_read)
        with open(work + "/setup.json", "w") as f:
            json.dump({"paths": p, "kernel": kernel}, f)
        py = sys.executable if benchlib._user_can_exec(args.user, sys.executable) else "/usr/bin/python3"
        argv = [py, os.path.abspath(sys.argv[0])] + sys.argv[1:] + ["--work", work, "--hpcrun", hpcrun]
        return subprocess.run(["runuser", "-u", args.user, "--"] + argv).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


def user_half(args, hpcrun):
    import tempfile

    if args.work:
        with open(args.work + "/setup.json") as f:
            setup = json.load(f)
        p, kernel = setup["paths"], setup["kernel"]
        work = args.work
    else:  # unprivileged from the start: no kernel column
        work = tempfile.mkdtemp(prefix="hpcrun-compare-")
        p, kernel = prepare(work, args.comps, not args.no_read), {}
    fd, conf = tempfile.mkstemp(prefix="hpcrun-compare-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write("share_idle_timeout: 30\n")  # the kept containers go 30 s after the bench
    try:
        return _measure(args, hpcrun, p, kernel, conf)
    finally:
        os.unlink(conf)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _measure(args, hpcrun, p, kernel, conf):
    import pwd

    # From the user's home, as a job runs: hpcrun binds a working directory outside the
    # home, /tmp and the site's scratch into the container (ch-run does not), and one the
    # image lacks needs the overlay to make its mount point.
    os.chdir(pwd.getpwuid(os.getuid()).pw_dir)
    todo = [(f"{row} / {c}", calls, n) for c in args.comps for row, calls, n in rows_for(p, c, args, hpcrun, conf)]
    todo += common_rows(p, args, hpcrun, conf)
    results = []
    for row, calls, rounds in todo:
        if args.only and not any(o in row for o in args.only):
            continue
        results.append((row, measure_calls(calls, rounds)))
        print(f"done: {row}", file=sys.stderr, flush=True)
    if args.json:
        benchlib.dump_json({"host": benchlib.host_info(), "kernel": kernel, "results": dict(results)})
        return 0
    info = benchlib.host_info()
    print(
        f"hpcrun vs ch-run, medians in ms (read: MiB/s, loop: total), {args.runs} rounds for starts, "
        f"as {info['user']}, {info['cpus']} CPUs, kernel {info['kernel']}, load {os.getloadavg()[0]:.1f}"
    )
    report(results, kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
