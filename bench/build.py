#!/usr/bin/env python3
"""Image build time and container start time per compression.

Usage:
    bench/build.py [--size-mib N] [--runs N] [--hpcrun PATH] [--user NAME] [--json]

1. Build time: makes a tree of about N MiB (default 1024) of mixed files (many small
   text files, some large compressible and incompressible ones), then times
   `hpcrun build OUT.sif TREE` against plain `mksquashfs TREE OUT.sqfs -all-root`
   (same compressor, all cores), interleaved, each --runs times; prints the ratio.
2. Start time per compression: builds the busybox image with --compress gzip, zstd,
   lz4 and xz and times `hpcrun exec IMG true` over --runs interleaved rounds.

Runs as the unprivileged user (re-executes itself under runuser when started as root).
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

COMPRESSORS = ["gzip", "zstd", "lz4", "xz"]


def make_tree(top, size_mib):
    rnd = random.Random(42)
    words = [f"word{i}" for i in range(5000)]
    total, target, n = 0, size_mib << 20, 0
    while total < target:
        d = os.path.join(top, f"d{n // 500:04d}")
        os.makedirs(d, exist_ok=True)
        kind = n % 100
        if kind == 0:  # a big incompressible file
            data = os.urandom(8 << 20)
        elif kind < 5:  # a big compressible file
            data = (" ".join(rnd.choices(words, k=200)) + "\n").encode() * 4000
        else:  # many small text files
            data = (" ".join(rnd.choices(words, k=rnd.randint(10, 2000))) + "\n").encode()
        with open(os.path.join(d, f"f{n:06d}"), "wb") as f:
            f.write(data)
        total += len(data)
        n += 1
    return n, total


def busybox_tree(top):
    root = os.path.join(top, "bb")
    os.makedirs(os.path.join(root, "bin"))
    for d in ("dev", "proc", "sys", "tmp", "etc", "home"):
        os.makedirs(os.path.join(root, d))
    shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
    for a in ("sh", "true"):
        os.symlink("busybox", os.path.join(root, "bin", a))
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, 3)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--start-runs", type=int, default=30)
    a = p.parse_args()
    benchlib.reexec_as_user(a.user)
    hpcrun = benchlib.find_hpcrun(a.hpcrun)
    top = tempfile.mkdtemp(prefix="hpcrun-bench-build-", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        tree = os.path.join(top, "tree")
        nfiles, nbytes = make_tree(tree, a.size_mib)
        cpus = str(os.cpu_count() or 1)
        tools = {
            "hpcrun build": [hpcrun, "build", "--force", "-q", os.path.join(top, "out.sif"), tree],
            "mksquashfs": [
                "mksquashfs",
                tree,
                os.path.join(top, "out.sqfs"),
                "-noappend",
                "-all-root",
                "-quiet",
                "-no-progress",
                "-processors",
                cpus,
                "-comp",
                "gzip",
            ],
        }
        times, fails = benchlib.measure(tools, a.runs)
        build_rows = benchlib.summarize(times, {"vs mksquashfs": "mksquashfs"})
        root = busybox_tree(top)
        starts = {}
        for comp in COMPRESSORS:
            img = os.path.join(top, f"bb-{comp}.sif")
            subprocess.run([hpcrun, "build", "-q", "--compress", comp, img, root], check=True)
            starts[comp] = [hpcrun, "exec", img, "true"]
        stimes, sfails = benchlib.measure(starts, a.start_runs)
        start_rows = benchlib.summarize(stimes, {"vs gzip": "gzip"})
        if a.json:
            benchlib.dump_json(
                {
                    "host": benchlib.host_info(),
                    "tree_files": nfiles,
                    "tree_bytes": nbytes,
                    "build": build_rows,
                    "start": start_rows,
                    "failures": {**fails, **sfails},
                }
            )
            return
        info = benchlib.host_info()
        print(
            f"build of a {nbytes / 2**20:.0f} MiB tree ({nfiles} files), {a.runs} interleaved runs, "
            f"as {info['user']}, {info['cpus']} CPUs, gzip"
        )
        benchlib.print_table(build_rows, {"vs mksquashfs": "mksquashfs"})
        print(f"\ncontainer start (`hpcrun exec IMG true`) per compression, {a.start_runs} rounds")
        benchlib.print_table(start_rows, {"vs gzip": "gzip"})
        for name, f in {**fails, **sfails}.items():
            if f:
                print(f"failures of {name}: {f[0]}")
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", top])
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
