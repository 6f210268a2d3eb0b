"""Node-level sharing: tasks of one user that run the same container on a node join
one set of namespaces (one user namespace, one mount namespace, one FUSE mount)
instead of each building its own.

A *keeper* process builds the container as launcher.build does and then only holds
it: it listens on a Unix socket in the user's private run directory and answers each
connection with the namespace fds (SCM_RIGHTS). A task keeps its connection open
while it runs; that open connection is its reference. With no connection left for
`share_idle_timeout` seconds the keeper exits; the namespaces then go with their last
task, and the FUSE daemon (detached: it lives as long as the mount) with them.

Races are settled by one flock per container: a task holds it from connecting until
it has the fds (or while it starts a keeper), and a keeper exits only holding it, so
no task can connect to a keeper on its way out. A keeper whose FUSE daemon died leaves
at once: until it holds the lock it answers DEAD (no fds), and the task, holding the
lock, replaces it by a new keeper; the old one then removes only files that are still
its own.

Everything lives in a run directory checked to be ours and private, and is reached
through that directory's fd, never by a path another user could swap in meanwhile.

Under Slurm's cgroup process tracking (proctrack/cgroup, task/cgroup) every process of a
step, a keeper and its FUSE daemon included, is killed when the step ends, so a keeper
started by one step must never serve another: the key then names the step's cgroup
(`step_scope`), and each step has its own keeper on each node. Each of its tasks says BYE
when its command is done; after as many BYEs as the step has tasks on the node
(SLURM_GTIDS) the keeper removes its files, answers GONE and leaves, before Slurm's
SIGKILL at the step's end could leave them behind. The node's name is in every key: a
run directory on a shared /tmp never mixes two nodes.

Warm across steps under cgroup tracking: with `warm` in the SPANK plugin's plugstack
line, every job has a *job keeper* on each node, in the job's extern step (killed only
at the job's end), listening on JOB_DIR/job-JOBID.sock. A task that finds it asks it to
start the keeper (it runs `hpcrun` again with the task's argv, environment and working
directory, HPCRUN_JOB_SPAWN naming the connection to answer on), so the keeper lives in
the extern step and outlives the step; the key names the job instead of the step, and
the keeper's files, in the node-local JOB_DIR, are named job-JOBID-*, for the epilog to
remove after the job's end killed them.
"""

import _socket  # not `socket`: its enum classes cost ~5 ms on every task's start
import errno
import fcntl
import os
import struct
import sys
import zlib

from hpcrun import errors
from hpcrun.errors import HpcrunError, RuntimeSetupError, UsageError
from hpcrun.plan import share_key
from hpcrun.runtime import launcher, syscalls as sc

NS_FLAGS = {
    "user": sc.CLONE_NEWUSER,
    "ipc": sc.CLONE_NEWIPC,
    "uts": sc.CLONE_NEWUTS,
    "net": sc.CLONE_NEWNET,
    "mnt": sc.CLONE_NEWNS,
    "pid": sc.CLONE_NEWPID,
}
DEAD = b"dead"  # a leaving keeper's answer, without fds: start a new one
BYE = b"bye"  # a task of a step-scoped keeper whose command is done
GONE = b"gone"  # the keeper's answer to BYE: that was its last task, its files are gone
JOB_DIR = "/dev/shm/hpcrun-{uid}"  # node-local, where the SPANK plugin's job keeper listens


def run_dir(env, uid):
    """(path, fd, refused) of the user's private directory for keeper sockets: the first
    of $XDG_RUNTIME_DIR/hpcrun (when that is ours), /tmp/hpcrun-UID, /dev/shm/hpcrun-UID
    that is a real directory of ours with mode 0700 (made when missing), and why the ones
    before it were not. Paths in /tmp and /dev/shm are anybody's to take first; every task
    of the user tries the same ones in the same order, so they agree. (None, None,
    refused) when none will do."""
    base = env.get("XDG_RUNTIME_DIR")
    try:
        st = os.lstat(base) if base else None
        ok = st is not None and st.st_uid == uid and (st.st_mode & 0o077) == 0
    except OSError:
        ok = False
    refused = []
    for path in ([os.path.join(base, "hpcrun")] if ok else []) + [f"/tmp/hpcrun-{uid}", f"/dev/shm/hpcrun-{uid}"]:
        fd, why = _private_dir(path, uid)
        if fd is not None:
            return path, fd, refused
        refused.append(f"{path} {why}")
    return None, None, refused


def _private_dir(path, uid):
    """(fd, None) for path when it is a directory of ours with mode 0700, made if missing;
    else (None, why not). Never follows a link, never opens a FIFO or a device."""
    for _ in range(10):
        try:
            os.mkdir(path, 0o700)
            made = True
        except FileExistsError:
            made = False
        except OSError as e:
            return None, f"cannot be made ({e.strerror})"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            continue  # a leaving keeper of ours removed it after our mkdir
        except OSError as e:
            return None, _unusable(path, uid, e)
    else:
        return None, "keeps disappearing"
    st = os.fstat(fd)
    if st.st_uid != uid:
        why = f"is not yours (owner {st.st_uid})"
    elif made:
        os.fchmod(fd, 0o700)  # whatever the umask took away
        return fd, None
    elif st.st_mode & 0o777 != 0o700:
        why = f"has mode {st.st_mode & 0o777:o}, not 700"
    else:
        return fd, None
    os.close(fd)
    return None, why


def _unusable(path, uid, e):
    """Why path, which open(O_DIRECTORY|O_NOFOLLOW) refused with e, is no run directory."""
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        owner = uid
    if owner != uid:
        return f"is not yours (owner {owner})"
    return {errno.ELOOP: "is a symbolic link", errno.ENOTDIR: "is not a directory"}.get(
        e.errno, f"cannot be opened ({e.strerror})"
    )


def container_id(plan, image, scope):
    """(short id for file names, full key). The id is a cheap 64-bit checksum (hashlib and
    json would cost ~10 ms per start); the keeper sends the full key back to be compared.
    scope: what the keeper's life is bound to (a step's cgroup, a job), or None."""
    st = os.fstat(image.fd) if image.fd is not None else os.stat(image.path)
    key = share_key(plan, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, image.offset)).encode()
    key += f"\0{os.uname().nodename}\0{scope or ''}".encode()
    return f"{zlib.crc32(key):08x}{zlib.adler32(key):08x}", key


def step_scope(env):
    """The cgroup of our Slurm step when Slurm tracks steps by cgroup (its processes all
    die with the step), else None (proctrack/linuxproc or pgid, or not in a step)."""
    if "SLURM_STEP_ID" not in env:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(":", 2)[-1]
        job = path.find("/job_")
        step = path.find("/step_", job)
        if job >= 0 and step > job and not path.startswith("/step_extern", step):
            end = path.find("/", step + 1)  # a task_N below it is still the step's
            return path if end < 0 else path[:end]
    return None


def run(plan, image, daemon, timer, verbose=False, quiet=False):
    """Join (or start, then join) the shared container for this plan and run the
    command in it; returns its exit status. Without a private run directory the task
    runs in a container of its own."""
    spawned = os.environ.pop("HPCRUN_JOB_SPAWN", "")
    spawned = spawned if spawned.isdigit() else None  # set by the job keeper only
    # A subuid map needs the setuid newuidmap, which the job keeper's no_new_privs (inherited
    # by what it starts) disarms: such a container is kept by a keeper of our own step.
    scope = step_scope(os.environ)
    job = None if spawned or plan.idmap["mode"] == "subid" else _job_keeper(os.environ, scope)
    where = None
    if job or spawned:  # the keeper lives in the job's extern step, not in ours
        jobid = os.environ["SLURM_JOB_ID"]
        cid, key = container_id(plan, image, f"job {jobid}")
        cid, where, plan.step_tasks = f"job-{jobid}-{cid}", JOB_DIR.format(uid=os.getuid()), 0
        if spawned:
            return _spawned(plan, image, daemon, where, cid, key, int(spawned), verbose)
    else:
        cid, key = container_id(plan, image, scope)
        plan.step_tasks = step_tasks(os.environ) if scope else 0
    rundir, dirfd, lock, refused = _lock(cid, where)
    if refused and not quiet:
        where = f"sharing containers through {rundir}" if rundir else "not sharing this container"
        sys.stderr.write(f"{errors.PROG}: note: {', '.join(refused)}: {where}\n")
    if lock is None:
        plan.share = False  # as with --no-sharens
        return launcher.launch(plan, image, timer, verbose, daemon)
    try:
        conn, fds, started = _join(plan, image, daemon, rundir, dirfd, cid, key, lock, verbose, job)
    except _NoJobKeeper:  # it went away: a keeper in our step must not serve the job's others
        conn = None
    finally:
        os.close(lock)
        os.close(dirfd)
    if conn is None:
        plan.share = False
        return launcher.launch(plan, image, timer, verbose, daemon)
    if verbose:
        launcher.say(f"{'started' if started else 'joined'} shared container {cid}")
    timer("share")
    return enter(plan, conn, fds, timer, "the shared container's")


def enter(plan, conn, fds, timer, whose):
    """Join the namespaces a keeper sent and run the command in them."""
    for name in ("user", "ipc", "uts", "net", "mnt", "pid"):  # the user namespace first: it grants the rest
        if name in fds:
            sc.setns(fds[name], NS_FLAGS[name], f"{whose} {name} namespace")
            os.close(fds[name])
    os.chdir("/")
    try:
        return launcher.enter(plan, None, timer)
    finally:
        if getattr(plan, "step_tasks", 0):  # instances' plans have none
            _bye(conn)
        conn.close()  # our reference; forked children hold theirs until they exit


class _NoJobKeeper(Exception):
    pass


def _job_keeper(env, scope):
    """The address of our job's keeper on this node (see the module's doc), or None: not
    in a cgroup-tracked step (scope, step_scope's, is None), no job keeper, or a directory
    or socket not ours. Only checked here; a task connects only when it must start a
    keeper, holding its lock (the job keeper answers one connection at a time: one that
    waits for a lock held by another task asking it would deadlock them)."""
    job = env.get("SLURM_JOB_ID", "")
    if not job.isdigit() or scope is None:
        return None
    uid = os.getuid()
    try:  # never made here: it is the job keeper's
        fd = os.open(JOB_DIR.format(uid=uid), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st, sock = os.fstat(fd), os.lstat(f"job-{job}.sock", dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if st.st_uid != uid or st.st_mode & 0o777 != 0o700 or sock.st_uid != uid:
        return None
    return f"job-{job}.sock"


def _ask_job_keeper(dirfd, name):
    """Have the job keeper start our container's keeper (as a child of its own, in the
    job's extern step): it runs this command again, which then only starts the keeper
    (_spawned) and answers on the connection as a keeper's report would."""
    argv = [sys.executable, "-I", "-m", "hpcrun", *sys.argv[1:]]
    env = [f"{k}={v}" for k, v in os.environ.items()]
    msg = b"".join(a.encode() + b"\0" for a in argv) + b"\0" + b"".join(e.encode() + b"\0" for e in env)
    job = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        job.connect(f"/proc/self/fd/{dirfd}/{name}")
        if _peer_uid(job) != os.getuid():
            raise OSError
    except OSError:
        job.close()
        raise _NoJobKeeper() from None
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        job.sendmsg([msg], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", cwd))])
        answer = job.recv(4096)
    except OSError:
        answer = b""
    finally:
        os.close(cwd)
        job.close()
    _report(answer)


def _spawned(plan, image, daemon, where, cid, key, fd, verbose):
    """In the process the job keeper started for a task: start the keeper (the task
    holds the lock meanwhile) and tell the task how that went, on fd."""
    dirfd, why = _private_dir(where, os.getuid())
    try:
        if dirfd is None:
            raise RuntimeSetupError(f"{where} {why}", "use --no-sharens")
        _start_keeper(plan, image, daemon, where, dirfd, cid, key, None, verbose)
        said = b"ok"
    except HpcrunError as e:
        said = f"{e.code} {e.line()}".encode()
    _tell(fd, said)
    return 0


def step_tasks(env):
    """How many tasks of our step run on this node (at least 1)."""
    return max(1, len(env.get("SLURM_GTIDS", "").split(",")))


def _bye(conn):
    """Tell a step's keeper that we are done, and wait (briefly) for its answer: if we
    were the step's last task here, its files are gone by then."""
    try:
        conn.settimeout(5)
        conn.send(BYE)
        conn.recv(16)
    except OSError:
        pass  # it is gone already


def start_instance(plan, image, daemon, instance, verbose=False):
    """Start a named instance's keeper, holding its lock from the check for a running
    one to the end of the start (so one name is one instance); returns once it serves."""
    cid, key = instance.cid, instance.key
    rundir, dirfd, lock, refused = _lock(cid)
    if lock is None:
        raise RuntimeSetupError(
            f"no private run directory for instances ({'; '.join(refused)})", "remove or fix those paths"
        )
    try:
        conn = _connect(dirfd, cid)
        fds = _receive(conn, key) if conn is not None else None
        if conn is not None:
            conn.close()
        for fd in (fds or {}).values():
            os.close(fd)
        if fds is not None:
            raise UsageError(
                f"instance {instance.name} already exists", f"stop it first: instance stop {instance.name}"
            )
        _unlink(dirfd, cid + ".sock")  # what a killed or leaving keeper left
        for name in instance.files():
            _unlink(dirfd, name)
        _sweep(dirfd, cid)
        try:
            _start_keeper(plan, image, daemon, rundir, dirfd, cid, key, lock, verbose, instance)
        except BaseException:
            for name in instance.files():
                _unlink(dirfd, name)
            _forget(rundir, dirfd, cid)
            raise
    finally:
        os.close(lock)
        os.close(dirfd)


def connect_named(cid, key, extra=()):
    """(connection, namespace fds) from the keeper cid, or None when none serves; then
    what a killed one left goes (socket, lock, `extra` files, the directory when empty).
    A keeper on its way out (answering DEAD) removes its own files."""
    rundir, dirfd, lock, _refused = _lock(cid)
    if lock is None:
        return None
    try:
        conn = _connect(dirfd, cid)
        fds = _receive(conn, key) if conn is not None else None
        if fds is not None:
            return conn, fds
        if conn is not None:
            conn.close()
            return None
        for name in extra:
            _unlink(dirfd, name)
        _forget(rundir, dirfd, cid)
        return None
    finally:
        os.close(lock)
        os.close(dirfd)


def peer_pid(sock):
    return struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[0]


def _start_init(plan, instance, procfd, keep):
    """Fork the instance's init, PID 1 of a new PID namespace that joining tasks enter
    too (as Apptainer's instances have one); returns its pid once its /proc is mounted."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sc.unshare(sc.CLONE_NEWPID, "cannot make the instance's PID namespace")
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _init(plan, instance, w)
        finally:
            os._exit(1)
    os.close(w)
    # through the host's /proc: the container's may already be the new one
    keep.append(("pid", os.open("self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)))
    answer = _read_all(r)
    if answer != b"ok":
        _kill_init(pid)
        raise RuntimeSetupError(f"the instance's init failed: {answer.decode(errors='replace') or 'it died'}")
    return pid


def _init(plan, instance, ready):
    """PID 1 of an instance: runs its startscript (runscript for `instance run`), reaps
    orphans, and stays after the script ends. A signal (from the keeper: `instance stop`)
    goes to every process of the instance; then it exits once it has no child left.
    Its keeper's death kills it (PDEATHSIG), and the kernel the rest with it."""
    sig = launcher.signal
    sc.prctl(sc.PR_SET_PDEATHSIG, sig.SIGKILL)
    waited = set(launcher.FORWARD) | {sig.SIGCHLD}
    sig.pthread_sigmask(sig.SIG_BLOCK, waited)
    os.closerange(3, ready)  # the keeper's socket, lock, image: not the instance's to hold
    os.closerange(ready + 1, 1 << 16)
    try:
        if os.getppid() == 0 and plan.new_proc:  # 0: our parent is outside our namespace
            sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        command = instance.command(plan)
    except BaseException as e:
        os.write(ready, (e.message if isinstance(e, HpcrunError) else f"{type(e).__name__}: {e}").encode())
        os._exit(1)
    os.write(ready, b"ok")
    os.close(ready)
    sc.set_name("hpcrun-init")
    if command is not None:
        if os.fork() == 0:
            os.setsid()  # its own process group, as under Apptainer
            launcher._default_signals()
            sig.pthread_sigmask(sig.SIG_SETMASK, [])
            launcher._chdir(plan)
            launcher._exec(command[0], command[1], plan.env)
    stopping = False
    while True:
        info = sig.sigwaitinfo(waited)
        if info.si_signo != sig.SIGCHLD:
            stopping = stopping or info.si_signo not in (sig.SIGCONT, sig.SIGWINCH)
            try:
                os.kill(-1, info.si_signo)  # from PID 1: everyone in the namespace but us
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                if stopping:
                    os._exit(0)
                break


def _kill_init(pid):
    """SIGKILL the init unless it is already reaped (then its pid may be another's)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _join(plan, image, daemon, rundir, dirfd, cid, key, lock, verbose, job=None):
    """(connection, namespace fds, whether we started the keeper), holding the lock;
    job: the job keeper's socket in the run directory, which then starts the keeper."""
    conn = _connect(dirfd, cid)
    fds = _receive(conn, key) if conn is not None else None
    if fds is not None:
        return conn, fds, False
    if conn is not None:  # a keeper on its way out (its FUSE daemon died): replace it
        conn.close()
        _unlink(dirfd, cid + ".sock")
    _sweep(dirfd, cid)
    try:
        if job:
            _ask_job_keeper(dirfd, job)
        else:
            _start_keeper(plan, image, daemon, rundir, dirfd, cid, key, lock, verbose)
    except BaseException:
        _forget(rundir, dirfd, cid)  # we hold the lock: nobody else is using these
        raise
    conn = _connect(dirfd, cid)
    fds = _receive(conn, key) if conn is not None else None
    if fds is None:
        raise RuntimeSetupError("the shared container's keeper did not answer", "use --no-sharens")
    return conn, fds, True


def _lock(cid, where=None):
    """(run directory, its fd, fd holding the container's flock, refused run directories);
    Nones but refused when there is no private run directory. A keeper removes the lock
    file (and the directory, when empty) as it leaves; a lock taken on a removed file is
    worthless, so take it again on the new one. where: that directory, not run_dir's."""
    for _ in range(100):
        if where:
            dirfd, why = _private_dir(where, os.getuid())
            rundir, refused = (where, []) if dirfd is not None else (None, [f"{where} {why}"])
        else:
            rundir, dirfd, refused = run_dir(os.environ, os.getuid())
        if dirfd is None:
            return None, None, None, refused
        try:
            lock = os.open(cid + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        except FileNotFoundError:
            os.close(dirfd)
            continue  # the directory went between mkdir and open
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _file_id(dirfd, cid + ".lock") == _fd_id(lock):
            return rundir, dirfd, lock, refused
        os.close(lock)
        os.close(dirfd)
    raise RuntimeSetupError(f"cannot lock {rundir}/{cid}.lock", "use --no-sharens")


def _file_id(dirfd, name):
    """(device, inode) of name in the directory, None if it is not there."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _fd_id(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _unlink(dirfd, name):
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass


def _sweep(dirfd, cid):
    """Remove what killed keepers of other containers left: a socket nobody listens on,
    whose lock nobody holds. Only when starting a keeper, which is rare."""
    try:
        names = os.listdir(dirfd)
    except OSError:
        return
    for name in names:
        other = name[:-5]
        if not name.endswith(".sock") or other == cid:
            continue
        try:
            lock = os.open(other + ".lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            conn = _connect(dirfd, other)  # refused: unlinks the socket
            if conn is None:
                _unlink(dirfd, other + ".lock")
            else:
                conn.close()
        except OSError:
            pass  # busy or alive: not ours to touch
        finally:
            os.close(lock)


def _forget(rundir, dirfd, cid):
    """A failed start's socket and lock file go, the directory too when no other
    container uses it; only while holding its lock."""
    for name in (cid + ".sock", cid + ".lock"):
        _unlink(dirfd, name)
    try:
        os.rmdir(rundir)
    except OSError:
        pass  # other containers' files are there


def _connect(dirfd, cid):
    """A connection to the container's keeper, None when none listens. Through the
    directory's fd: the path may have been taken by someone else since we checked it."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        s.connect(f"/proc/self/fd/{dirfd}/{cid}.sock")
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        _unlink(dirfd, cid + ".sock")  # a keeper that was killed; we hold the lock
        return None
    uid = _peer_uid(s)
    if uid != os.getuid():
        s.close()
        raise RuntimeSetupError(
            f"the keeper of shared container {cid} runs as uid {uid}, not as you", "use --no-sharens"
        )
    return s


def _peer_uid(sock):
    return struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[1]


def _receive(conn, key):
    """{namespace name: fd} from the keeper, which answers 'NAMES\0KEY' plus the fds;
    None when it answers 'dead' (it is leaving: its FUSE daemon died) or went away."""
    try:
        msg, anc, _flags, _addr = conn.recvmsg(len(key) + 256, _socket.CMSG_SPACE(8 * 4))
    except ConnectionResetError:
        return None
    fds = []
    for level, kind, data in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
    if not fds and msg in (b"", DEAD):
        return None
    names, _, their_key = msg.partition(b"\0")
    names = names.decode().split()
    if their_key != key or len(names) != len(fds) or not fds:
        for fd in fds:
            os.close(fd)
        raise RuntimeSetupError(
            "the shared container's keeper answered for another container (an id collision?)", "use --no-sharens"
        )
    return dict(zip(names, fds))


def _start_keeper(plan, image, daemon, rundir, dirfd, cid, key, lock, verbose, instance=None):
    """Fork the keeper (detached: its own session, reparented) and wait until it serves
    or reports why it cannot; its error becomes ours. instance: an Instance to run in
    it (a named, long-lived keeper)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            if lock is not None:
                os.close(lock)  # the lock stays with the task; the keeper opens its own
            os.setsid()  # not in the terminal's process group: ^C is for the task
            if os.fork() == 0:
                _keeper(plan, image, daemon, rundir, dirfd, cid, key, w, verbose, instance)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    _report(_read_all(r))


def _report(answer):
    """A starting keeper's report: b"ok", or 'CODE LINE' raised as its error."""
    if answer.startswith(b"ok"):
        return
    code, _, line = answer.decode(errors="replace").partition(" ")
    if not code.isdigit():
        raise RuntimeSetupError("the shared container's keeper died while starting", "use --no-sharens")
    raise HpcrunError(line.removeprefix(f"{errors.PROG}: error: "), code=int(code))


class _Files:
    """A keeper's socket and lock file, reached through fds (the keeper leaves the host's
    view), and removed only while they are still the ones it made: a task may have
    replaced a leaving keeper by a new one meanwhile."""

    def __init__(self, rundir, dirfd, cid, extra=()):
        self.dirfd, self.cid, self.base = dirfd, cid, os.path.basename(rundir)
        self.extra = extra  # more files of ours (an instance's state), removed with the socket
        self.parentfd = os.open(os.path.dirname(rundir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.lock = os.open(cid + ".lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        self.sock_id = None

    def fds(self):
        return {self.dirfd, self.parentfd, self.lock}

    def bind(self, listener):
        listener.bind(f"/proc/self/fd/{self.dirfd}/{self.cid}.sock")
        self.sock_id = _file_id(self.dirfd, self.cid + ".sock")

    def try_lock(self):
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def remove(self):
        """Holding the lock: our socket goes, and the lock file unless a newer keeper
        (whose socket is there) uses it; the directory too when empty."""
        sock = _file_id(self.dirfd, self.cid + ".sock")
        if sock == self.sock_id:
            _unlink(self.dirfd, self.cid + ".sock")
            for name in self.extra:
                _unlink(self.dirfd, name)
        if sock in (self.sock_id, None) and _file_id(self.dirfd, self.cid + ".lock") == _fd_id(self.lock):
            _unlink(self.dirfd, self.cid + ".lock")
        try:
            os.rmdir(self.base, dir_fd=self.parentfd)
        except OSError:
            pass  # other containers' files are there, or it is not ours


def _keeper(plan, image, daemon, rundir, dirfd, cid, key, report, verbose, instance=None):
    """Never returns. Builds the container, reports, then serves fds until idle or until
    its FUSE daemon dies; removes its files as it goes, also when its task is gone.
    An instance's keeper is never idle: it lives as long as the instance's init."""
    status = 1
    init = None
    try:
        import select  # noqa: F401  (before the host's files are out of reach)
        import signal
        import socket

        files = _Files(rundir, dirfd, cid, instance.files() if instance else ())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        files.bind(listener)  # in the host's view, before unshare
        listener.listen(64)
        procfd = None
        if instance:  # the host's /proc: after build, /proc is the container's
            import json  # noqa: F401

            procfd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _close_fds_but(
            {0, 1, 2, report, listener.fileno(), image.fd, procfd}
            | files.fds()
            | set(instance.logs if instance else ())
        )
        keep = []
        try:
            daemon_pid = launcher.build(plan, image, lambda phase: None, verbose, daemon, keep=keep)
        except BaseException as e:  # the task that waits says it (and removes our files)
            said = (
                f"{e.code} {e.line()}"
                if isinstance(e, HpcrunError)
                else f"254 cannot build the shared container: {type(e).__name__}: {e}"
            )
            if not _tell(report, said.encode()):  # the task is gone: nobody else cleans up
                _leave(listener, files)
            os._exit(1)
        os.chdir("/")
        # Nothing of the first task's may stay open here: a pipe of srun's held by us
        # would keep its step from finishing.
        null = os.open("/dev/null", os.O_RDWR) if os.path.exists("/dev/null") else None
        for fd in (0, 1, 2):
            if null is not None:
                os.dup2(null, fd)
            else:
                os.close(fd)
        if instance:  # its startscript's output: the instance's log files
            instance.redirect()
        sc.set_name("hpcrun-keeper")  # for ps, pkill and epilogs
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if getattr(plan, "step_tasks", 0):  # Slurm's SIGTERM to the whole step (scancel, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # limit): we leave with the last task's BYE
        if instance:
            try:
                init = _start_init(plan, instance, procfd, keep)
                instance.save(dirfd, os.getpid(), init, daemon_pid)
            except BaseException as e:
                said = (
                    f"{e.code} {e.line()}"
                    if isinstance(e, HpcrunError)
                    else f"254 cannot start the instance: {type(e).__name__}: {e}"
                )
                _tell(report, said.encode())
                raise
        _tell(report, b"ok")  # a task killed meanwhile can't hear it: serve whoever comes next
        os.close(report)
        try:
            idle = None if instance else plan.share_idle
            _serve(listener, dict(keep), key, files, idle, daemon_pid, init, getattr(plan, "step_tasks", 0))
        finally:
            _leave(listener, files)
        status = 0
    finally:
        if init:  # the instance goes with its keeper: its init's death ends its PID namespace
            _kill_init(init)
        os._exit(status)


def _tell(fd, data):
    """Write to the waiting task; False if it is gone (EPIPE: SIGPIPE is ignored)."""
    try:
        os.write(fd, data)
        return True
    except OSError:
        return False


def _close_fds_but(keep):
    """Whatever the first task had open (srun's pipes, PMI sockets) is not ours to hold."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd listdir itself used


class _Daemon:
    """The FUSE daemon, the keeper's child. `watch`: fds for select that wake when it
    exits (a pidfd; none before Linux 5.3, where alive() before each answer must do)."""

    def __init__(self, pid):
        self.pid, self.dead, self.watch = pid, False, []
        if pid:
            try:
                self.watch = [os.pidfd_open(pid)]
            except OSError:
                pass

    def alive(self):
        if self.pid and not self.dead:
            try:
                self.dead = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                self.dead = True
        return not self.dead


def _serve(listener, nsfds, key, files, idle, daemon_pid, init_pid=None, step_tasks=0):
    """Answer each task with the namespace fds. Returns when idle (holding the lock), or
    at once when the FUSE daemon is gone: its mount is dead, nobody may join it. An
    instance's keeper (idle None) returns when its init is gone, and a task may ask it
    to signal its init ('signal N': `instance stop`). A step's keeper (step_tasks) returns
    after that many BYEs, holding the lock, with its files removed."""
    import select
    import socket

    names = " ".join(nsfds).encode() + b"\0" + key
    fds = list(nsfds.values())
    fuse = _Daemon(daemon_pid)
    init = _Daemon(init_pid)
    tasks = []
    byes = 0
    wait = idle
    while fuse.alive() and init.alive():
        ready, _, _ = select.select([listener] + fuse.watch + init.watch + tasks, [], [], None if tasks else wait)
        if not ready:  # idle: leave, unless a task is connecting right now
            if files.try_lock():
                return
            wait = 0.05  # it will connect (or start another keeper) in a moment
            continue
        wait = idle
        for s in ready:
            if s is listener:
                conn = _accept(listener)
                if conn is None:
                    continue
                if not fuse.alive():  # checked before every answer
                    _refuse(conn)
                    continue
                try:
                    socket.send_fds(conn, [names], fds)
                except OSError:
                    conn.close()
                    continue
                tasks.append(conn)
            elif s in tasks:
                try:
                    msg = s.recv(16)
                except OSError:
                    msg = b""
                gone = not msg or msg == BYE
                byes += msg == BYE
                if step_tasks and byes >= step_tasks and len(tasks) == 1 and files.try_lock():
                    files.remove()  # our last task: nothing may stay for Slurm's SIGKILL
                    _answer(s, GONE)
                    return
                if msg == BYE:
                    _answer(s, b"ok")
                if init_pid and msg.startswith(b"signal ") and msg[7:].isdigit() and init.alive():
                    os.kill(init_pid, int(msg[7:]))  # our unreaped child: the pid is still its
                if gone:
                    tasks.remove(s)
                    s.close()


def _accept(listener):
    """The next task's connection; None if it is not the user's or already gone."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return None
    if _peer_uid(conn) != os.getuid():
        conn.close()
        return None
    return conn


def _answer(conn, data):
    try:
        conn.send(data)
    except OSError:
        pass


def _refuse(conn):
    try:
        conn.send(DEAD)
    except OSError:
        pass
    conn.close()


def _leave(listener, files):
    """Stop serving and go: a task that connects meanwhile is told DEAD (it starts a new
    keeper). Holding the lock no task is between connecting and its answer, and our files
    go unless a newer keeper's replaced them."""
    import select

    while not files.try_lock():
        if select.select([listener], [], [], 0.05)[0]:
            conn = _accept(listener)
            if conn is not None:
                _refuse(conn)
    files.remove()


def _read_all(fd):
    """Everything until EOF (the writer closed its end or died); closes fd."""
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    os.close(fd)
    return data
