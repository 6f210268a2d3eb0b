#!/usr/bin/env python3
"""Container start-up latency: hpcrun vs ch-run vs a bare shell baseline.

Usage:
    bench/startup.py [--runs N] [--image IMG.sqfs] [--hpcrun PATH] [--user NAME] [--json]

Builds a tiny busybox image (squashfs; unless --image names one), then times, over N
interleaved rounds (each round runs every command once, in a random order):

    hpcrun       hpcrun exec --no-sharens IMG true   (a container of its own)
    hpcrun-join  hpcrun exec --sharens IMG true      (joins one kept container)
    ch-run     ch-run IMG -- true            (same squashfs; a directory if ch-run
                                             cannot mount it, which is then reported)
    shell      unshare -Urm sh -c 'squashfuse_ll IMG MNT && chroot MNT /bin/true;
                                   umount MNT'   (mount, chroot, unmount: the floor)
    host-true  /bin/true                     (process spawn cost alone)

It prints median, p90 and min wall time per command and the ratios of medians to
ch-run and to the shell baseline. Everything runs as an unprivileged user: started as
root, the script re-executes itself as --user (default hpctest) with runuser, so the
timings contain no wrapper. Python 3 stdlib only.
"""

import argparse
import os
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

APPLETS = ["sh", "true", "ls", "cat", "env", "id"]


def build_tree(root):
    """Minimal busybox root file system in `root`."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "home"]:
        os.makedirs(os.path.join(root, d))
    shutil.copy(busybox, os.path.join(root, "bin/busybox"))
    for a in APPLETS:
        os.symlink("busybox", os.path.join(root, "bin", a))
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\n")
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)


def make_squashfs(tree, img):
    subprocess.run(["mksquashfs", tree, img, "-noappend", "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)
    os.chmod(img, 0o644)


def tool_version(argv):
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (cp.stdout + cp.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, runs=30)
    p.add_argument("--image", help="use this squashfs image instead of building one")
    args = p.parse_args()
    benchlib.reexec_as_user(args.user)  # from here on: unprivileged (as root: no return)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.runs < 30:
        print("warning: fewer than 30 rounds: the numbers are noisy", file=sys.stderr)
    hpcrun = benchlib.find_hpcrun(args.hpcrun)
    return benchlib.in_work_dir(lambda work: bench(args, hpcrun, work))


def bench(args, hpcrun, work):
    notes = []
    tree = None
    if args.image:
        img = os.path.abspath(args.image)
        if not os.access(img, os.R_OK):
            sys.exit(f"error: {img} is not readable by {os.environ.get('USER', os.getuid())}")
    else:
        tree = os.path.join(work, "tree")
        img = os.path.join(work, "busybox.sqfs")
        build_tree(tree)
        make_squashfs(tree, img)
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)

    # ch-run >= 0.28 mounts a squashfs itself (libsquashfuse); older ones need a directory.
    ch_image = img
    cp = subprocess.run(["ch-run", img, "--", "true"], capture_output=True, text=True)
    if cp.returncode != 0:
        if tree is None:  # --image given: unpack it for ch-run
            tree = os.path.join(work, "tree")
            subprocess.run(["unsquashfs", "-q", "-n", "-d", tree, img], check=True, stdout=subprocess.DEVNULL)
        ch_image = tree
        notes.append(
            f"ch-run cannot run the squashfs here ({cp.stderr.strip()[-200:]}); "
            f"ch-run uses the directory image {tree} instead"
        )

    conf = os.path.join(work, "keep.yaml")
    with open(conf, "w") as f:
        f.write("share_idle_timeout: 30\n")
    tools = {
        # /bin/true: fallback should a PATH lookup of `true` fail in hpcrun (reported)
        "hpcrun": [[hpcrun, "exec", "--no-sharens", img, "true"], [hpcrun, "exec", "--no-sharens", img, "/bin/true"]],
        # joining a kept container (node-level sharing; what ranks and later steps get)
        "hpcrun-join": ["env", f"HPCRUN_CONFIG={conf}", hpcrun, "exec", "--sharens", img, "true"],
        "ch-run": ["ch-run", ch_image, "--", "true"],
        "shell": [
            "unshare",
            "-Urm",
            "sh",
            "-c",
            'squashfuse_ll "$1" "$2" && chroot "$2" /bin/true; rc=$?; umount "$2"; exit $rc',
            "sh",
            img,
            mnt,
        ],
        "host-true": ["/bin/true"],
    }
    problems, fallbacks = benchlib.probe(tools, cwd=work)  # also the warm-up round
    notes += fallbacks
    commands = {n: benchlib.shell_join(a) for n, a in tools.items()}
    times, fails = benchlib.measure(tools, args.runs, cwd=work)
    refs = {"vs ch-run": "ch-run", "vs shell": "shell"}
    rows = benchlib.summarize(times, refs)

    info = dict(
        benchlib.host_info(),
        rounds=args.runs,
        image=img,
        ch_run_image=ch_image,
        hpcrun=hpcrun,
        hpcrun_version=tool_version([hpcrun, "version"]),
        ch_run_version=tool_version(["ch-run", "--version"]),
    )
    failures = {n: f for n, f in fails.items() if f}
    if args.json:
        benchlib.dump_json(
            {
                "info": info,
                "commands": commands,
                "results": rows,
                "unavailable": problems,
                "failed_runs": failures,
                "notes": notes,
            }
        )
        return 1 if problems else 0

    print(
        f"container start-up, {args.runs} interleaved rounds, as {info['user']} "
        f"(uid {info['uid']}), kernel {info['kernel']}, {info['cpus']} CPUs"
    )
    print(f"hpcrun {info['hpcrun_version']} ({hpcrun}); ch-run {info['ch_run_version']}")
    print()
    benchlib.print_table(rows, refs)
    print()
    benchlib.print_commands(commands)
    benchlib.print_trouble(notes, problems, failures, args.runs)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
