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
no task can connect to a keeper on its way out.
"""
import _socket   # not `socket`: its enum classes cost ~5 ms on every task's start
import fcntl
import os
import struct
import sys
import zlib

from hpcrun.errors import HpcrunError, RuntimeSetupError
from hpcrun.plan import share_key
from hpcrun.runtime import launcher, syscalls as sc

NS_FLAGS = {"user": sc.CLONE_NEWUSER, "ipc": sc.CLONE_NEWIPC, "uts": sc.CLONE_NEWUTS,
            "net": sc.CLONE_NEWNET, "mnt": sc.CLONE_NEWNS}


def run_dir(env, uid):
    """The user's private directory for keeper sockets: $XDG_RUNTIME_DIR/hpcrun when that
    is ours, else /tmp/hpcrun-UID; refused unless it is a real directory, ours, 0700."""
    base = env.get("XDG_RUNTIME_DIR")
    try:
        st = os.lstat(base) if base else None
        ok = st is not None and st.st_uid == uid and (st.st_mode & 0o077) == 0
    except OSError:
        ok = False
    path = os.path.join(base, "hpcrun") if ok else f"/tmp/hpcrun-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise RuntimeSetupError(f"cannot make {path} for shared containers: {e.strerror}",
                                "use --no-sharens") from None
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != uid or st.st_mode & 0o077:
        raise RuntimeSetupError(f"{path} is not a private directory of yours (owner {st.st_uid}, "
                                f"mode {st.st_mode & 0o777:o})", "remove it, or use --no-sharens")
    return path


def container_id(plan, image):
    """(short id for file names, full key). The id is a cheap 64-bit checksum (hashlib and
    json would cost ~10 ms per start); the keeper sends the full key back to be compared."""
    st = os.fstat(image.fd) if image.fd is not None else os.stat(image.path)
    key = share_key(plan, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, image.offset)).encode()
    return f"{zlib.crc32(key):08x}{zlib.adler32(key):08x}", key


def run(plan, image, daemon, timer, verbose=False):
    """Join (or start, then join) the shared container for this plan and run the
    command in it; returns its exit status."""
    cid, key = container_id(plan, image)
    rundir, lock = _lock(cid)
    sock_path = os.path.join(rundir, cid + ".sock")
    try:
        conn = _connect(sock_path)
        started = conn is None
        if started:
            _sweep(rundir, cid)
            try:
                _start_keeper(plan, image, daemon, rundir, cid, key, lock, verbose)
            except BaseException:
                _forget(rundir, cid)   # we hold the lock: nobody else is using these
                raise
            conn = _connect(sock_path)
            if conn is None:
                raise RuntimeSetupError("the shared container's keeper did not answer", "use --no-sharens")
        fds = _receive(conn, key)
    finally:
        os.close(lock)
    if verbose:
        launcher.say(f"{'started' if started else 'joined'} shared container {cid}")
    timer("share")
    for name in ("user", "ipc", "uts", "net", "mnt"):   # the user namespace first: it grants the rest
        if name in fds:
            sc.setns(fds[name], NS_FLAGS[name], f"the shared container's {name} namespace")
            os.close(fds[name])
    os.chdir("/")
    try:
        return launcher.enter(plan, None, timer)
    finally:
        conn.close()   # our reference; forked children hold theirs until they exit


def _lock(cid):
    """(run directory, fd holding the container's flock). A keeper removes the lock file
    (and the directory, when empty) as it leaves; a lock taken on a removed file is
    worthless, so take it again on the new one."""
    for _ in range(100):
        rundir = run_dir(os.environ, os.getuid())
        path = os.path.join(rundir, cid + ".lock")
        try:
            lock = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue          # the directory went between mkdir and open
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(lock).st_ino:
                return rundir, lock
        except FileNotFoundError:
            pass
        os.close(lock)
    raise RuntimeSetupError(f"cannot lock {path}", "use --no-sharens")


def _sweep(rundir, cid):
    """Remove what killed keepers of other containers left: a socket nobody listens on,
    whose lock nobody holds. Only when starting a keeper, which is rare."""
    try:
        names = os.listdir(rundir)
    except OSError:
        return
    for name in names:
        other = name[:-5]
        if not name.endswith(".sock") or other == cid:
            continue
        try:
            lock = os.open(os.path.join(rundir, other + ".lock"), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            conn = _connect(os.path.join(rundir, name))   # refused: unlinks the socket
            if conn is None:
                os.unlink(os.path.join(rundir, other + ".lock"))
            else:
                conn.close()
        except OSError:
            pass   # busy or alive: not ours to touch
        finally:
            os.close(lock)


def _forget(rundir, cid, dirfd=None, parentfd=None):
    """The container's socket and lock file go, the directory too when no other container
    uses it; only while holding its lock. dirfd/parentfd: the keeper's way to them after
    it left the host's view."""
    for name in (cid + ".sock", cid + ".lock"):
        try:
            os.unlink(name if dirfd is not None else os.path.join(rundir, name), dir_fd=dirfd)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(os.path.basename(rundir) if parentfd is not None else rundir, dir_fd=parentfd)
    except OSError:
        pass   # other containers' files are there


def _connect(path):
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        try:
            os.unlink(path)   # a keeper that was killed; we hold the lock
        except FileNotFoundError:
            pass
        return None
    uid = _peer_uid(s)
    if uid != os.getuid():
        s.close()
        raise RuntimeSetupError(f"{path}: keeper runs as uid {uid}, not as you", "use --no-sharens")
    return s


def _peer_uid(sock):
    return struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[1]


def _receive(conn, key):
    """{namespace name: fd} from the keeper, which answers 'NAMES\0KEY' plus the fds."""
    msg, anc, _flags, _addr = conn.recvmsg(len(key) + 256, _socket.CMSG_SPACE(8 * 4))
    fds = []
    for level, kind, data in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])
    names, _, their_key = msg.partition(b"\0")
    names = names.decode().split()
    if their_key != key or len(names) != len(fds) or not fds:
        for fd in fds:
            os.close(fd)
        raise RuntimeSetupError("the shared container's keeper answered for another container "
                                "(an id collision?)", "use --no-sharens")
    return dict(zip(names, fds))


def _start_keeper(plan, image, daemon, rundir, cid, key, lock, verbose):
    """Fork the keeper (detached: its own session, reparented) and wait until it serves
    or reports why it cannot; its error becomes ours."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.close(lock)   # the lock stays with the task; the keeper opens its own
            os.setsid()      # not in the terminal's process group: ^C is for the task
            if os.fork() == 0:
                _keeper(plan, image, daemon, rundir, cid, key, w, verbose)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    answer = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        answer += chunk
    os.close(r)
    if answer.startswith(b"ok"):
        return
    code, _, line = answer.decode(errors="replace").partition(" ")
    if not code.isdigit():
        raise RuntimeSetupError("the shared container's keeper died while starting", "use --no-sharens")
    raise HpcrunError(line.removeprefix("hpcrun: error: "), code=int(code))


def _keeper(plan, image, daemon, rundir, cid, key, report, verbose):
    """Never returns. Builds the container, reports, then serves fds until idle."""
    status = 0
    try:
        import select  # noqa: F401  (before the host's files are out of reach)
        import signal
        import socket
        dirfd = os.open(rundir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        parentfd = os.open(os.path.dirname(rundir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        lock = os.open(cid + ".lock", os.O_RDWR | os.O_CLOEXEC, dir_fd=dirfd)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(os.path.join(rundir, cid + ".sock"))   # in the host's view, before unshare
        listener.listen(64)
        _close_fds_but({0, 1, 2, report, dirfd, parentfd, lock, listener.fileno(), image.fd})
        keep = []
        try:
            launcher.build(plan, image, lambda phase: None, verbose, daemon, keep=keep)
        except BaseException as e:   # the task that waits says it (and removes our files)
            said = (f"{e.code} {e.line()}" if isinstance(e, HpcrunError)
                    else f"254 cannot build the shared container: {type(e).__name__}: {e}")
            os.write(report, said.encode())
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
        sc.set_name("hpcrun-keeper")   # for ps, pkill and epilogs
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.write(report, b"ok")
        os.close(report)
        _serve(listener, dict(keep), key, lock, dirfd, parentfd, rundir, cid, plan.share_idle)
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _close_fds_but(keep):
    """Whatever the first task had open (srun's pipes, PMI sockets) is not ours to hold."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass   # the fd listdir itself used


def _serve(listener, nsfds, key, lock, dirfd, parentfd, rundir, cid, idle):
    import select
    import socket
    names = " ".join(nsfds).encode() + b"\0" + key
    fds = list(nsfds.values())
    me = os.getuid()
    tasks = []
    wait = idle
    while True:
        ready, _, _ = select.select([listener] + tasks, [], [], None if tasks else wait)
        if not ready:   # idle: leave, unless a task is connecting right now
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                wait = 0.05   # it will connect (or start another keeper) in a moment
                continue
            _forget(rundir, cid, dirfd, parentfd)   # the lock file while locked by us: see _lock
            return
        wait = idle
        for s in ready:
            if s is listener:
                conn, _ = listener.accept()
                if _peer_uid(conn) != me:
                    conn.close()
                    continue
                try:
                    socket.send_fds(conn, [names], fds)
                except OSError:
                    conn.close()
                    continue
                tasks.append(conn)
            else:
                try:
                    gone = not s.recv(16)
                except OSError:
                    gone = True
                if gone:
                    tasks.remove(s)
                    s.close()
