"""Named instances (`instance start|run|list|stop`, `exec|run|shell instance://NAME`).

An instance is a shared container's keeper (share.py) with a name instead of a
checksum, no idle timeout, and an init process (PID 1 of the instance's own PID
namespace) that runs the startscript. Its files sit next to the keepers' in the
private run directory, reached through its fd: NAME's socket and lock, and
`instance-NAME.json` (image, pids, options, start time), written by the keeper once
it serves and removed with its socket. Whether an instance is alive is always asked
of its keeper (a connection, peer uid checked), never read from the file alone; what
killed keepers left is removed by whoever finds it (start, list, stop, join).
"""

import os
import sys

from hpcrun import errors
from hpcrun.errors import RuntimeSetupError, UsageError
from hpcrun.runtime import share

PREFIX = "instance-"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_NAME = 64  # the socket's path (/proc/self/fd/N/instance-NAME.sock) must fit in 108 bytes
STARTSCRIPT = "/.singularity.d/startscript"
# Options a joining task chooses for itself; every other one is the instance's.
PER_TASK = ("env", "env_file", "cleanenv", "app", "pwd", "quiet", "verbose", "debug", "dry_run")


def check_name(name):
    """Apptainer's rule (^[a-zA-Z0-9._-]+$), and a length our socket path can hold."""
    if not name or len(name) > MAX_NAME or not set(name) <= NAME_CHARS:
        shown = name if len(name) <= MAX_NAME else name[:MAX_NAME] + "..."
        raise UsageError(
            f"{shown!r} is not a valid instance name", f"use letters, digits, '.', '_' and '-', at most {MAX_NAME}"
        )


class Instance:
    """What the keeper needs to run an instance and to describe it."""

    def __init__(self, name, script="start", args=(), opts=None, image=None):
        self.name, self.script, self.args, self.opts, self.image = name, script, list(args), opts, image
        self.cid = PREFIX + name
        self.key = f"hpcrun instance {name}".encode()
        self.logs, self.log_paths = (), ("", "")

    def open_logs(self, env, quiet):
        """Open NAME.out and NAME.err (appended to) where Apptainer keeps them, so that
        tools reading them find them: $APPTAINER_CONFIGDIR (~/.apptainer)/instances/logs/
        HOST/USER/; without them (a read-only home) the output is lost, with a warning."""
        import pwd

        top = env.get("APPTAINER_CONFIGDIR") or env.get("SINGULARITY_CONFIGDIR")
        top = top or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".apptainer")
        d = os.path.join(top, "instances", "logs", os.uname().nodename, pwd.getpwuid(os.getuid()).pw_name)
        paths = (os.path.join(d, self.name + ".out"), os.path.join(d, self.name + ".err"))
        fds = []
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            for p in paths:
                fds.append(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            if not quiet:
                sys.stderr.write(
                    f"{errors.PROG}: warning: instance {self.name}: no log files in {d} ({e.strerror}):"
                    " its output is lost\n"
                )
            return
        self.logs, self.log_paths = tuple(fds), paths

    def close_logs(self):
        for fd in self.logs:
            os.close(fd)
        self.logs = ()

    def redirect(self):
        """In the keeper: stdout and stderr (the init's, the startscript's) to the logs."""
        if self.logs:
            os.dup2(self.logs[0], 1)
            os.dup2(self.logs[1], 2)
            self.close_logs()

    def files(self):
        return (self.cid + ".json",)

    def command(self, plan):
        """In the container: (program, argv) of the start- or runscript, None when there
        is no startscript (the instance then only holds the container, as Apptainer's)."""
        from hpcrun.runtime import launcher

        if plan.app:  # one line for an app the image lacks, not a silent instance
            launcher.check_app(plan, plan.app, os.path.exists, os.access)
        if self.script == "start":
            script = f"/scif/apps/{plan.app}/scif/startscript" if plan.app else STARTSCRIPT  # --app: the app's
            if not (os.path.isfile(script) and os.access(script, os.X_OK)):
                return None
            plan.action, plan.args = "exec", [script] + self.args
        else:
            plan.action, plan.args = "run", list(self.args)
        argv = launcher.resolve_argv(plan, os.path.exists, os.access)
        program = launcher.find_program(argv[0], plan.env.get("PATH", ""))
        if program is None:
            raise RuntimeSetupError(f"{argv[0]}: command not found in the container")
        return program, argv

    def save(self, dirfd, keeper, init, daemon):
        """The state file, written whole (a temporary name, then rename) by the keeper."""
        import json
        import time

        state = {
            "name": self.name,
            "image": self.image,
            "pid": init,
            "keeper": keeper,
            "daemon": daemon,
            "started": time.time(),
            "script": self.script,
            "opts": self.opts,
            "logOutPath": self.log_paths[0],
            "logErrPath": self.log_paths[1],
        }
        tmp = f".{self.cid}.json.tmp"
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.rename(tmp, self.cid + ".json", src_dir_fd=dirfd, dst_dir_fd=dirfd)


def _read_state(dirfd, name):
    import json

    try:
        fd = os.open(PREFIX + name + ".json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    try:
        with open(fd, encoding="utf-8") as f:
            state = json.load(f)
    except ValueError:
        return None
    return state if isinstance(state, dict) and state.get("name") == name else None


def _names():
    """(run directory fd or None, names of instances with a state file); the directory
    is not left behind when we made it only to look."""
    rundir, dirfd, _refused = share.run_dir(os.environ, os.getuid())
    if dirfd is None:
        return None, []
    names = sorted(n[len(PREFIX) : -5] for n in os.listdir(dirfd) if n.startswith(PREFIX) and n.endswith(".json"))
    if not names:
        try:
            os.rmdir(rundir)
        except OSError:
            pass  # other files are there
    return dirfd, names


def _alive(pattern):
    """[(state, connection to its keeper)] of the running instances matching the glob;
    what dead ones left is removed on the way."""
    import fnmatch

    dirfd, names = _names()
    out = []
    try:
        for name in names:
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            inst = Instance(name)
            got = share.connect_named(inst.cid, inst.key, inst.files())
            if got is None:
                continue
            conn, fds = got
            for fd in fds.values():
                os.close(fd)
            state = _read_state(dirfd, name)
            if state is None:  # a keeper still starting: not yet an instance
                conn.close()
                continue
            out.append((state, conn))
    finally:
        if dirfd is not None:
            os.close(dirfd)
    return out


def list_instances(pattern="*"):
    """[state] of the running instances whose name matches the glob."""
    out = []
    for state, conn in _alive(pattern):
        conn.close()
        out.append(state)
    return out


def for_join(req):
    """The Request for `exec|run|shell instance://NAME ...`: the instance's image and its
    own options, but for those a task chooses itself (PER_TASK)."""
    from hpcrun.options import defaults
    from hpcrun.start import Request

    name, opts = req.image[len("instance://") :], req.opts
    if opts.get("instance"):
        raise UsageError("an instance:// image cannot start another instance", "give the image's path")
    check_name(name)
    dirfd, names = _names()
    state = None
    if dirfd is not None:
        try:
            state = _read_state(dirfd, name) if name in names else None
        finally:
            os.close(dirfd)
    if state is None or not isinstance(state.get("opts"), dict):
        raise UsageError(f"no instance {name}", "see `instance list`")
    merged = defaults()
    merged.update({k: v for k, v in state["opts"].items() if k in merged and k not in PER_TASK})
    merged.update({k: opts[k] for k in PER_TASK if k in opts})
    merged["instance"] = {"mode": "join", "name": name}
    return Request(req.action, merged, state["image"], req.args)


def launch(plan, image, daemon, reason, opts, timer):
    """start.py's branch for instances: start one, or join one."""
    inst = opts["instance"]
    name = inst["name"]
    for prefix in ("APPTAINER_", "SINGULARITY_"):  # the instance's processes and its joiners'
        plan.env[prefix + "INSTANCE"] = name
    if inst["mode"] == "join":
        plan.namespaces = dict(plan.namespaces, pid=False)  # we enter the instance's
        plan.new_proc = False
        target = Instance(name)
        got = share.connect_named(target.cid, target.key, target.files())
        if got is None:
            raise UsageError(f"no instance {name}", "see `instance list`")
        timer("share")
        return share.enter(plan, got[0], got[1], timer, f"instance {name}'s")
    if reason is not None:
        raise RuntimeSetupError(
            f"instance {name}: cannot mount the image with FUSE ({reason})", "instances need FUSE: run `hpcrun check`"
        )
    saved = {k: v for k, v in opts.items() if k != "instance"}
    instance = Instance(name, inst["mode"], plan.args, saved, os.path.abspath(image.path))
    instance.open_logs(os.environ, opts["quiet"])
    try:
        share.start_instance(plan, image, daemon, instance, opts["verbose"])
    finally:
        instance.close_logs()
    if inst.get("pid_file"):
        _write_pid_file(inst["pid_file"], name)
    if not opts["quiet"]:
        sys.stderr.write(f"{errors.PROG}: instance {name} started\n")
    return 0


def _write_pid_file(path, name):
    """--pid-file: the init's pid, as Apptainer writes it (a failure is a warning there too)."""
    found = list_instances(name.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]"))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "w") as f:
            f.write(f"{found[0]['pid'] if found else ''}\n")
    except OSError as e:
        sys.stderr.write(f"{errors.PROG}: warning: cannot write the pid file {path}: {e.strerror}\n")


def stop(pattern, sig, timeout, quiet=False):
    """Signal the matching instances' inits (through their keepers), SIGKILL those still
    there after `timeout` seconds, and return once their keepers and FUSE daemons are
    gone. An unknown name is an error."""
    import select

    targets = _alive(pattern)
    if not targets:
        raise UsageError(
            f"no instance {pattern}" if pattern != "*" else "no instance is running", "see `instance list`"
        )
    daemons = []
    for state, conn in targets:
        if not quiet:
            which = f"{state['name']} instance of {state['image']} (PID={state['pid']})"
            sys.stderr.write(f"{errors.PROG}: stopping {which}\n")
        daemons += _daemon_watch(state, share.peer_pid(conn))
        _send(conn, sig)
    left = _wait_closed([c for _, c in targets], timeout, select)
    for conn in left:
        _send(conn, 9)
    if _wait_closed(left, 10, select):
        raise RuntimeSetupError(f"instance {pattern}: its keeper did not stop", "kill the hpcrun-keeper process")
    _wait_closed(daemons, 10, select)  # the image's FUSE mount goes with the last process in it
    for fd in daemons:
        os.close(fd)
    return 0


def _send(conn, sig):
    try:
        conn.send(f"signal {sig}".encode())
    except OSError:
        pass  # already gone


def _daemon_watch(state, keeper):
    """A pidfd for the instance's FUSE daemon, when that pid is still the keeper's child
    (checked while the keeper lives, so it is not a reused pid)."""
    pid = state.get("daemon")
    if not isinstance(pid, int) or pid <= 0:
        return []
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        return [os.pidfd_open(pid)] if ppid == keeper else []
    except (OSError, ValueError, IndexError):
        return []


def _wait_closed(items, timeout, select):
    """Wait until each socket reads EOF (or each pidfd is readable); returns those not."""
    import time

    left = list(items)
    end = time.monotonic() + timeout
    while left:
        wait = end - time.monotonic()
        if wait <= 0:
            break
        ready, _, _ = select.select(left, [], [], wait)
        for s in ready:
            if isinstance(s, int):
                left.remove(s)
                continue
            try:
                data = s.recv(64)
            except OSError:
                data = b""
            if not data:
                left.remove(s)
                s.close()
    return left
