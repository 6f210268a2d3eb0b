#!/usr/bin/env python3
"""Many small files: import 5000 tiny Python modules from a squashfs image vs a plain
directory.

Usage:
    bench/imports.py [--runs N] [--modules M] [--hpcrun PATH] [--user NAME] [--json]

Builds a root file system holding the host's python3.11 (binary, the shared libraries
`ldd` names, /usr/lib/python3.11 without tests and tools) and, under /mods, a package
`pkg` of M modules (`X = 1` each, compiled to .pyc beforehand, so that the runs
measure file-system access and not compilation) plus /mods/importall.py, which imports
them all, and /mods/empty.py, which does nothing (the interpreter's start-up cost).
The tree is squashed into IMG.sqfs. Then, over N interleaved rounds (each runs every
command once, in a random order), it times `python3.11 -E -S SCRIPT` for both scripts:

    hpcrun-img   hpcrun exec --no-sharens IMG.sqfs /usr/bin/python3.11 -E -S /mods/SCRIPT
    hpcrun-warm  hpcrun exec --sharens IMG.sqfs ... (every run joins one kept container)
    hpcrun-dir   hpcrun exec TREE     /usr/bin/python3.11 -E -S /mods/SCRIPT
    ch-run-img   ch-run IMG.sqfs -- /usr/bin/python3.11 -E -S /mods/SCRIPT
    ch-run-dir   ch-run TREE     -- /usr/bin/python3.11 -E -S /mods/SCRIPT
    host         /usr/bin/python3.11 -E -S TREE/mods/SCRIPT

Every hpcrun-img and ch-run run mounts the image anew, so each is cold for the
squashfuse caches; hpcrun-warm runs reuse one mount (node-level sharing) (the kernel's
page cache of the .sqfs file stays warm, as do the dentry and page caches of the plain
directory). "imports" is the median with
importall.py minus the median with empty.py. Printed: medians, p90, and the ratios
image / plain directory. Started as root, the script re-runs itself as --user
(default hpctest). Python 3 stdlib only.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
# Parts of the standard library that python -S never needs and that only add bulk.
STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
}


def copy_file(root, path):
    """Copy host `path` to the same place under `root`, keeping the symlink if it is one
    (and copying its target too), so that the image resolves it like the host."""
    dst = root + path
    if os.path.lexists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(path):
        target = os.readlink(path)
        os.symlink(target, dst)
        copy_file(root, os.path.normpath(os.path.join(os.path.dirname(path), target)))
    else:
        shutil.copy2(path, dst)


def shared_libs(binary):
    """Absolute paths of the libraries (and the loader) that ldd reports."""
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    return re.findall(r"(/\S+) \(0x", out)


def build_tree(root, nmods):
    # Same top-level layout as the host (merged /usr: /lib -> usr/lib and so on).
    os.makedirs(root + "/usr")
    for top in ["bin", "sbin", "lib", "lib64"]:
        if os.path.islink("/" + top):
            os.symlink(os.readlink("/" + top), f"{root}/{top}")
        os.makedirs(f"{root}/usr/{top}", exist_ok=True)
    for d in ["dev", "proc", "sys", "tmp", "etc", "home"]:
        os.makedirs(f"{root}/{d}", exist_ok=True)
    with open(root + "/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(root + "/etc/group", "w") as f:
        f.write("root:x:0:\n")

    # Python: binary, its libraries (through any symlink chain), the standard library
    # with Debian's precompiled __pycache__ (copy2 keeps the mtimes the .pyc check).
    copy_file(root, PYTHON)
    for lib in shared_libs(PYTHON):
        copy_file(root, lib)
        # /lib64/ld-linux... reaches the image through /lib64 -> usr/lib64 too.
        copy_file(root, os.path.join(os.path.realpath(os.path.dirname(lib)), os.path.basename(lib)))
    shutil.copytree(
        STDLIB,
        root + STDLIB,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if n in STDLIB_SKIP or n.startswith("config-")],
    )

    # The module tree and the two scripts.
    pkg = root + "/mods/pkg"
    os.makedirs(pkg)
    open(pkg + "/__init__.py", "w").close()
    width = max(4, len(str(nmods - 1)))
    for i in range(nmods):
        with open(f"{pkg}/m{i:0{width}d}.py", "w") as f:
            f.write("X = 1\n")
    with open(root + "/mods/importall.py", "w") as f:
        f.write(
            "# sys.path[0] is this script's directory\n"
            f"for i in range({nmods}):\n"
            f"    __import__(f'pkg.m{{i:0{width}d}}')\n"
        )
    open(root + "/mods/empty.py", "w").close()
    subprocess.run([PYTHON, "-m", "compileall", "-q", root + "/mods/pkg"], check=True)
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)


def pyc_loads(argv):
    """How many pkg modules `python -v` reports it loaded from a .pyc (None: failed)."""
    cp = subprocess.run(argv, capture_output=True, text=True)
    if cp.returncode != 0:
        return None
    return len(re.findall(r"# code object from '?\S*/mods/pkg/__pycache__/m\d+\.", cp.stderr))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, runs=10)
    p.add_argument("--modules", type=int, default=5000, help="modules to import (5000)")
    args = p.parse_args()
    benchlib.reexec_as_user(args.user)  # from here on: unprivileged (as root: no return)
    if args.runs < 1 or args.modules < 1:
        p.error("--runs and --modules must be >= 1")
    if args.runs < 5:
        print("warning: fewer than 5 rounds: the numbers are noisy", file=sys.stderr)
    hpcrun = benchlib.find_hpcrun(args.hpcrun)
    if not os.access(PYTHON, os.X_OK):
        sys.exit(f"error: this benchmark needs the host's {PYTHON}")
    return benchlib.in_work_dir(lambda work: bench(args, hpcrun, work))


def bench(args, hpcrun, work):
    tree, img = work + "/tree", work + "/python.sqfs"
    build_tree(tree, args.modules)
    subprocess.run(["mksquashfs", tree, img, "-noappend", "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)
    os.chmod(img, 0o644)

    py = [PYTHON, "-E", "-S"]  # -E: ignore PYTHON* variables the host passes in
    # Warm: every run joins one shared container (--sharens) whose FUSE mount has
    # served the runs before it, as on a node where the image stays mounted between
    # steps and jobs. The keeper leaves 60 s after the last run.
    conf = work + "/warm.yaml"
    with open(conf, "w") as f:
        f.write("share_idle_timeout: 60\n")
    places = {
        "hpcrun-img": ([hpcrun, "exec", "--no-sharens", img] + py, "/mods"),
        "hpcrun-warm": (["env", f"HPCRUN_CONFIG={conf}", hpcrun, "exec", "--sharens", img] + py, "/mods"),
        "hpcrun-dir": ([hpcrun, "exec", tree] + py, "/mods"),
        "ch-run-img": (["ch-run", img, "--"] + py, "/mods"),
        "ch-run-dir": (["ch-run", tree, "--"] + py, "/mods"),
        "host": (py, tree + "/mods"),
    }
    tools = {}
    for name, (prefix, mods) in places.items():
        tools[name] = prefix + [mods + "/importall.py"]
        tools[name + " empty"] = prefix + [mods + "/empty.py"]
    commands = {n: benchlib.shell_join(a) for n, a in tools.items()}

    # Sanity check: every module must come from its .pyc, in the image as on the host.
    notes = []
    for name in ["hpcrun-img", "host"]:
        prefix, mods = places[name]
        n = pyc_loads(prefix + ["-v", mods + "/importall.py"])
        if n is None:
            notes.append(f"{name}: .pyc check could not run")
        elif n != args.modules:
            notes.append(f"{name}: only {n} of {args.modules} modules loaded from .pyc")
        else:
            notes.append(f"{name}: all {n} modules loaded from .pyc (checked with python -v)")

    problems, fallbacks = benchlib.probe(tools, cwd=work)  # also the warm-up round
    notes += fallbacks
    times, fails = benchlib.measure(tools, args.runs, cwd=work)
    rows = benchlib.summarize(times, {})
    med = {r["tool"]: r["median_ms"] for r in rows}

    def imports_ms(place):
        if place in med and place + " empty" in med:
            return med[place] - med[place + " empty"]
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    comparisons = []  # (label, image place, plain-directory place)
    for img_place, dir_place in [
        ("hpcrun-img", "hpcrun-dir"),
        ("hpcrun-warm", "hpcrun-dir"),
        ("ch-run-img", "ch-run-dir"),
        ("hpcrun-img", "host"),
        ("hpcrun-warm", "host"),
        ("ch-run-img", "host"),
    ]:
        comparisons.append(
            {
                "image": img_place,
                "plain_dir": dir_place,
                "total_ratio": ratio(med.get(img_place), med.get(dir_place)),
                "imports_ratio": ratio(imports_ms(img_place), imports_ms(dir_place)),
            }
        )

    info = dict(
        benchlib.host_info(), rounds=args.runs, modules=args.modules, image_bytes=os.path.getsize(img), hpcrun=hpcrun
    )
    failures = {n: f for n, f in fails.items() if f}
    if args.json:
        benchlib.dump_json(
            {
                "info": info,
                "commands": commands,
                "results": rows,
                "imports_ms": {p: imports_ms(p) for p in places},
                "comparisons": comparisons,
                "unavailable": problems,
                "failed_runs": failures,
                "notes": notes,
            }
        )
        return 1 if problems else 0

    print(
        f"import {args.modules} modules, {args.runs} interleaved rounds, as {info['user']}, "
        f"kernel {info['kernel']}, {info['cpus']} CPUs, image {info['image_bytes'] >> 20} MiB"
    )
    print()
    print(f"{'where':12} {'total med':>10} {'total p90':>10} {'empty med':>10} {'imports':>9}   (ms)")
    for place in places:
        total, empty = med.get(place), med.get(place + " empty")
        p90 = next((r["p90_ms"] for r in rows if r["tool"] == place), None)
        cells = [total, p90, empty, imports_ms(place)]
        print(f"{place:12} " + " ".join(f"{'n/a' if c is None else f'{c:.1f}':>10}" for c in cells))
    print()
    print("image / plain directory (ratio of medians):")
    for c in comparisons:
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
        print(
            f"  {c['image']:10} / {c['plain_dir']:10}  total {fmt(c['total_ratio']):>6}"
            f"   imports only {fmt(c['imports_ratio']):>6}"
        )
    print()
    benchlib.print_commands({n: commands[n] for n in places if n in commands})
    benchlib.print_trouble(notes, problems, failures, args.runs)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
