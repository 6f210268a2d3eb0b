"""`hpcrun check`: can hpcrun work on this node? Each finding with how to fix it."""

import os
import socket

from hpcrun import config, errors
from hpcrun.host import subid_range


def _in_child(fn):
    """Run fn in a forked child (namespaces must not touch this process); True if it worked."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _userns():
    from hpcrun.runtime import idmap, syscalls as sc

    uid, gid = os.getuid(), os.getgid()  # before unshare: unmapped ids read as 65534 after
    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
    idmap.write_self({"mode": "self", "uid": uid, "gid": gid})


def _overlay():
    from hpcrun.runtime import syscalls as sc

    _userns()
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("t", "/tmp", "tmpfs", 0, "mode=0755")
    for d in ("l", "u", "w", "m"):
        os.mkdir(f"/tmp/{d}")
    sc.mount("overlay", "/tmp/m", "overlay", 0, "lowerdir=/tmp/l,upperdir=/tmp/u,workdir=/tmp/w")


def run_checks(out=print):
    from hpcrun.runtime import fuse

    bad = 0
    node = socket.gethostname()

    def report(ok, what, fix=None, fatal=True):
        nonlocal bad
        if not ok and fatal:
            bad += 1
        state = "ok  " if ok else ("FAIL" if fatal else "warn")
        out(f"{node}: {state} {what}" + ("" if ok or not fix else f" -- fix: {fix}"))

    userns = _in_child(_userns)
    report(
        userns,
        "unprivileged user namespaces",
        "ask the admins to set user.max_user_namespaces > 0 (and kernel.unprivileged_userns_clone=1)",
    )
    if userns:
        report(
            _in_child(_overlay), "overlayfs in a user namespace (needed for the container root)", "needs Linux >= 5.11"
        )
    fd = fuse.open_device()
    if fd is not None:
        os.close(fd)
    report(
        fd is not None,
        "/dev/fuse is usable",
        "ask the admins for /dev/fuse mode 0666 (else hpcrun extracts images, slower)",
        fatal=False,
    )
    try:
        names = config.load()["squashfuse"]
    except errors.HpcrunError as e:
        report(False, f"configuration: {e.message}", e.hint)
        names = ["squashfuse_ll", "squashfuse"]
    daemon = fuse.which(names)
    report(
        bool(daemon),
        f"squashfuse binary: {daemon or 'none of ' + ', '.join(names)}",
        "install squashfuse (Debian: apt install squashfuse)",
        fatal=False,
    )
    report(
        bool(fuse.which(["unsquashfs"])), "unsquashfs (fallback without FUSE)", "install squashfs-tools", fatal=False
    )
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    sub = subid_range("/etc/subuid", user, os.getuid()) and subid_range("/etc/subgid", user, os.getuid())
    report(
        bool(sub),
        f"subordinate ids for {user} in /etc/subuid and /etc/subgid (for --fakeroot)",
        "ask the admins for a range (usermod --add-subuids/--add-subgids); without it --fakeroot maps root only",
        fatal=False,
    )
    report(
        bool(fuse.which(["newuidmap"])) and bool(fuse.which(["newgidmap"])),
        "newuidmap/newgidmap (for --fakeroot with subordinate ids)",
        "install uidmap",
        fatal=False,
    )
    try:
        from hpcrun import gpu

        for ok, what, fix in gpu.check_findings(config.load(), os.environ):
            report(ok, what, fix, fatal=False)  # a node without GPUs is no failure
    except errors.HpcrunError as e:
        report(False, f"GPUs: {e.message}", e.hint, fatal=False)
    return errors.RUNTIME if bad else 0
