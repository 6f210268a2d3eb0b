"""User namespace id maps: our own uid only, root only, or a subuid range via newuidmap."""

import os

from hpcrun import errors
from hpcrun.errors import RuntimeSetupError


def write_self(idmap):
    """Map the caller to itself (mode self) or to root (mode root); no helper needed."""
    inside_uid = 0 if idmap["mode"] == "root" else idmap["uid"]
    inside_gid = 0 if idmap["mode"] == "root" else idmap["gid"]
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{inside_uid} {idmap['uid']} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{inside_gid} {idmap['gid']} 1")
    except OSError as e:
        raise RuntimeSetupError(f"cannot write user namespace id maps: {e.strerror}", "run `hpcrun check`") from None


def start_helper(idmap):
    """Fork, before unshare, the process that will run newuidmap/newgidmap on us.

    Returns (pid, write end): write one byte once unshared, then wait for pid.
    """
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        os.close(r)
        return pid, w
    try:
        os.close(w)
        if os.read(r, 1) != b"x":
            os._exit(1)
        us, uc = idmap["subuid"]
        gs, gc = idmap["subgid"]
        for tool, own, start, count in (("newuidmap", idmap["uid"], us, uc), ("newgidmap", idmap["gid"], gs, gc)):
            args = [tool, str(parent), "0", str(own), "1", "1", str(start), str(count)]
            child = os.posix_spawnp(tool, args, os.environ)
            if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) != 0:
                os._exit(2)
        os._exit(0)
    except BaseException:
        os._exit(3)


def finish_helper(pid, w):
    os.write(w, b"x")
    os.close(w)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0:
        raise RuntimeSetupError(
            "newuidmap/newgidmap could not map your subordinate id range",
            "check /etc/subuid and /etc/subgid, or run `hpcrun check`",
        )


def _enter(idmap):
    """In a fresh child: become root of a new user namespace with these maps."""
    from hpcrun.runtime import syscalls as sc

    helper = start_helper(idmap) if idmap["mode"] == "subid" else None
    sc.unshare(sc.CLONE_NEWUSER)
    if helper:
        finish_helper(*helper)
    else:
        write_self(dict(idmap, mode="root"))


def die_with_parent(parent):
    """In a forked child: SIGKILL when the parent goes (even by SIGKILL), so no tool keeps
    writing into a tree that is being removed."""
    from hpcrun.runtime import syscalls as sc

    sc.prctl(sc.PR_SET_PDEATHSIG, 9)
    if os.getppid() != parent:
        os._exit(1)


def dies_with_us():
    """A subprocess preexec_fn: the tool is SIGKILLed when this process goes."""
    parent = os.getpid()
    return lambda: die_with_parent(parent)


def _reap(pid):
    """waitpid(pid); if we are interrupted (a signal raised), the child is killed first."""
    try:
        return os.waitpid(pid, 0)[1]
    except BaseException:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise


def run_mapped(argv, idmap):
    """Run a host program as root of a user namespace with these maps (no mount
    namespace, no pivot): to read, squash or remove a tree whose files belong to
    subordinate ids. Returns its exit status."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            die_with_parent(parent)
            _enter(idmap)
            os.execvp(argv[0], argv)
        except BaseException as e:
            os.write(2, f"{errors.PROG}: error: cannot run {argv[0]} in a user namespace: {e}\n".encode())
        finally:
            os._exit(127)
    return os.waitstatus_to_exitcode(_reap(pid))


def call_mapped(fn, idmap):
    """Return fn() computed in a forked child that is root of a user namespace with these
    maps (to create files owned by subordinate ids). fn's result must be JSON; an error it
    raises is raised here, with its message and exit code."""
    import json
    from hpcrun.errors import HpcrunError

    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            die_with_parent(parent)
            _enter(idmap)
            reply = {"value": fn()}
        except HpcrunError as e:
            reply = {"error": [e.message, e.hint, e.code]}
        except BaseException as e:
            reply = {"error": [f"internal error in a user namespace: {type(e).__name__}: {e}", None, 255]}
        try:
            with os.fdopen(w, "w") as f:
                json.dump(reply, f)
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            data = f.read()
    except BaseException:
        _reap(pid)  # kills it: we were interrupted
        raise
    _reap(pid)
    reply = json.loads(data) if data else {"error": ["the user namespace child died", None, 255]}
    if "error" in reply:
        raise HpcrunError(*reply["error"][:2], code=reply["error"][2])
    return reply["value"]


def build_idmap():
    """The --fakeroot map for the caller (subuid range when there is one)."""
    import pwd
    from hpcrun.host import subid_range

    uid, gid = os.getuid(), os.getgid()
    user = pwd.getpwuid(uid).pw_name
    su, sg = subid_range("/etc/subuid", user, uid), subid_range("/etc/subgid", user, uid)
    return {"mode": "subid" if su and sg else "root", "uid": uid, "gid": gid, "subuid": su, "subgid": sg}
