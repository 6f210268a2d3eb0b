"""Execute a Plan: one linear sequence of system calls, top to bottom.

  unshare user+mount(+ipc,uts,net) -> id maps -> private mounts -> staging tmpfs and
  pivot_root (the host stays reachable under /oldroot) -> image (FUSE or sandbox) ->
  overlay root on tmpfs (so missing mount points can be made) -> binds, each resolved
  inside the root -> /etc/passwd, /etc/group -> root read-only -> pivot_root into it ->
  hostname, loopback -> fork the command (chdir, no_new_privs, exec) -> supervise.

This process stays alive as the supervisor: it forwards signals, reaps, kills what
is left and the FUSE daemon, and exits with the command's status.
"""

import os
import _signal as signal  # the C module: signal.py builds enums, ~7 ms of every start
import sys

from hpcrun import envvars
from hpcrun import errors
from hpcrun.errors import BindError, RuntimeSetupError, NOT_EXECUTABLE, NOT_FOUND
from hpcrun.plan import Mount
from hpcrun.runtime import fuse, idmap as idmaps, safepath, syscalls as sc

OLD = "/oldroot"  # the host's root, during setup
PROC = OLD + "/proc"  # our /proc during setup
IMAGE_DIR = "/image"  # the read-only image (FUSE mount or sandbox)
RW = "/rw"  # tmpfs: overlay upper and work directories
ROOT = "/root"  # the container root being built
FORWARD = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGWINCH,
    signal.SIGCONT,
)
SI_KERNEL = 0x80  # si_code of signals the terminal sends to the whole foreground group
GUARD = signal.SIGRTMIN + 1  # PDEATHSIG of the guardian: hpcrun is gone, clean up
# Signals ignored by whoever started us (nohup: SIGHUP) stay ignored for the command, as
# for a host command. SIGPIPE and SIGXFSZ are not among them: Python ignores those two
# itself at start-up (what it found is lost), and a command must get them by default.
INHERITED_IGN = frozenset(s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN) - {
    signal.SIGPIPE,
    signal.SIGXFSZ,
}


def say(msg):
    sys.stderr.write(f"{errors.PROG}: {msg}\n")


def launch(plan, image, timer, verbose=False, daemon=None, sandbox=None):
    """Run the plan; returns the exit status for hpcrun. `sandbox` is an extracted tree
    used instead of the image (FUSE unavailable)."""
    daemon_pid = build(plan, image, timer, verbose, daemon, sandbox)
    return enter(plan, daemon_pid, timer)


def build(plan, image, timer, verbose=False, daemon=None, sandbox=None, keep=None):
    """Make the container and move into it: on return this process is inside, in its
    root, with all capabilities of the user namespace. Returns the FUSE daemon's pid.
    keep: a list that receives fds of the new namespaces (a shared container's keeper);
    its FUSE daemon then lives as long as the mount, not as long as this process."""
    if plan.namespaces["net"]:  # needed after pivot_root, when the stdlib is out of reach
        import fcntl, socket, struct  # noqa: F401,E401
    if plan.cuda_driver:  # --nv: the image's CUDA is compared with the driver's, in the image
        from hpcrun.gpu import nvidia  # noqa: F401
    helper = None
    if plan.idmap["mode"] == "subid":
        helper = idmaps.start_helper(plan.idmap)
    flags = sc.CLONE_NEWUSER | sc.CLONE_NEWNS
    ns = plan.namespaces
    flags |= (sc.CLONE_NEWIPC if ns["ipc"] else 0) | (sc.CLONE_NEWUTS if ns["uts"] else 0)
    flags |= sc.CLONE_NEWNET if ns["net"] else 0
    sc.unshare(flags, "unprivileged user namespaces may be disabled here: run `hpcrun check`")
    if helper:
        idmaps.finish_helper(*helper)
    else:
        idmaps.write_self(plan.idmap)
    timer("namespaces")
    made = workdir_sources(plan)  # in our mount namespace (a bind's source must be), the host's paths
    if keep is not None:  # /proc/self/ns/*: still the host's /proc here
        for name, on in (("user", True), ("ipc", ns["ipc"]), ("uts", ns["uts"]), ("net", ns["net"]), ("mnt", True)):
            if on:
                keep.append((name, os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)))

    # Staging area: a tmpfs over /tmp becomes our root; the host moves to /oldroot
    # (and its /tmp reappears there: pivot_root moved our tmpfs away from it).
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("hpcrun", "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
    os.mkdir("/tmp" + OLD)
    sc.pivot_root("/tmp", "/tmp" + OLD)
    os.chdir("/")
    for d in (IMAGE_DIR, RW, ROOT):
        os.mkdir(d)
    sc.mount("hpcrun-rw", RW, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, f"mode=0755,size={plan.tmpfs_size}")
    os.mkdir(RW + "/upper")
    os.mkdir(RW + "/work")

    daemon_pid = None
    if sandbox is not None:
        lower = OLD + sandbox
    elif image.kind == "sandbox":  # by path: overlayfs refuses a lower layer from another mount namespace
        lower = OLD + image.path
    else:
        devfd = fuse.open_device(OLD + "/dev/fuse")  # opened in the namespace, or the kernel refuses it
        if devfd is None:
            raise RuntimeSetupError("cannot open /dev/fuse inside the user namespace", "run `hpcrun check`")
        daemon_pid = fuse.mount(
            devfd,
            image.fd,
            image.path,
            image.offset,
            IMAGE_DIR,
            daemon,
            plan.idmap["uid"] if plan.idmap["mode"] == "self" else 0,
            plan.idmap["gid"] if plan.idmap["mode"] == "self" else 0,
            OLD,
            detach=keep is not None,
        )
        lower = IMAGE_DIR
    timer("image")
    try:
        _container(plan, lower, timer, verbose)
    except BaseException as e:
        if daemon_pid:
            lost = fuse.set_up_failed(daemon_pid, image.path, e)  # stops the daemon
            if lost is not None:
                raise lost from None
        raise
    for fd in made:
        os.close(fd)
    return daemon_pid


def workdir_sources(plan):
    """-W DIR (plan.workdir): make the directories the plan binds from DIR, in the
    caller's own DIR, following no link and refusing what is not the caller's; those
    mounts then bind the made directories by fd (what was checked is what is bound).
    Returns the fds, to close once the container is built."""
    if not plan.workdir:
        return []
    top, made = plan.workdir
    fds = []
    wfd = _own_dir(None, top, top)
    try:
        for rel, mode, dst in made:
            fd = os.dup(wfd)
            names = safepath.components(rel)
            for i, name in enumerate(names):
                try:
                    nfd = _own_dir(fd, name, f"{top}/{rel}", mode if i == len(names) - 1 else 0o750)
                finally:
                    os.close(fd)
                fd = nfd
            fds.append(fd)
            for m in plan.mounts:  # found by destination: the text of src may have been resolved
                if m.kind == "bind" and m.name in ("tmp", "home", "scratchdir") and m.dst == dst:
                    m.src = safepath.fd_path(fd)  # /proc/self/fd/N, under OLD during set-up
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(wfd)
    return fds


def _own_dir(parent, name, shown, mode=None):
    """An fd of directory `name` (made with mode unless there) in parent (an fd, or None:
    a path): never through a link at name, and only the caller's own."""
    created = False
    if mode is not None:
        try:
            os.mkdir(name, mode, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise BindError(f"--workdir: cannot make {shown}: {e.strerror}", "give a directory of yours") from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as e:
        import errno  # builtin, and only on this failure

        why = {errno.ELOOP: "a symbolic link", errno.ENOTDIR: "not a directory"}.get(e.errno, e.strerror)
        if e.errno == errno.ENOTDIR and os.path.islink(name if parent is None else f"/proc/self/fd/{parent}/{name}"):
            why = "a symbolic link"  # O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR
        raise BindError(f"--workdir: {shown}: {why}", "give a directory of yours, not a link") from None
    if os.fstat(fd).st_uid != os.getuid():
        os.close(fd)
        raise BindError(f"--workdir: {shown} is not yours", "give a directory you own")
    if created:
        os.fchmod(fd, mode)  # the umask took bits off (1777)
    return fd


def enter(plan, daemon_pid, timer):
    """In the container root: run the command and supervise it; returns its status."""
    try:
        argv = resolve_argv(plan, os.path.exists, os.access)
    except BaseException:  # --app NAME that the image lacks
        if daemon_pid:
            _stop(daemon_pid)
        raise
    program = find_program(argv[0], plan.env.get("PATH", ""))
    if program is None:
        sys.stderr.write(f"{errors.PROG}: error: {argv[0]}: command not found in the container\n")
        if daemon_pid:
            _stop(daemon_pid)
        return NOT_FOUND
    try:
        _chdir(plan)
    except BaseException:
        if daemon_pid:
            _stop(daemon_pid)
        raise
    timer("pivot")
    return supervise(plan, program, argv, daemon_pid, timer)


def _container(plan, lower, timer, verbose):
    # Mount points and /etc/passwd are made in the overlay's upper directory *before*
    # the overlay is mounted: we own that tmpfs, while image directories owned by an
    # unmapped root would refuse us. Paths follow the image's symlinks, inside it.
    # --writable: the sandbox itself is the root and is never written to (_in_sandbox).
    # A directory image that already has every mount point needs no overlay (_direct).
    upper = RW + "/upper"
    found = []  # (mount, its destination resolved in the image, whether it exists there)
    taken = set()  # resolved destinations: a default mount landing on an earlier one's is skipped
    for m in plan.mounts:
        if m.kind != "tmpfs" and not _source_ok(m):
            continue
        try:
            comps, exists = safepath.canonical(lower, m.dst)
        except OSError as e:
            if m.optional:
                continue
            raise BindError(
                f"bind destination {m.dst}: {e.strerror or e} in the image", "choose another destination"
            ) from None
        if exists and m.if_missing:
            continue
        where = tuple(comps)  # an image's /var/tmp -> /tmp: not the host's /var/tmp over /tmp (issue 1097)
        if m.optional and where in taken:
            continue
        taken.add(where)
        found.append((m, comps, exists))
    bound = plan.in_place or lower != IMAGE_DIR and _direct(plan, lower, found)
    ready = []
    for m, comps, exists in found:
        if exists:
            ready.append(m)
        elif bound:
            ready += _in_sandbox(m, lower, comps)
        else:
            _make_point(upper, comps, m)
            ready.append(m)
    identity = _write_identity(plan, lower, upper, bound)
    if plan.cuda_driver:
        _cuda_check(plan, lower)
    if bound:
        _bind_root(plan, lower, identity)
    else:
        escaped = lower.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")
        sc.mount(
            "overlay",
            ROOT,
            "overlay",
            sc.MS_NOSUID | sc.MS_NODEV,
            f"lowerdir={escaped},upperdir={RW}/upper,workdir={RW}/work",
            what="cannot mount the overlay root (kernel without unprivileged overlayfs? run `hpcrun check`)",
        )
    ours = set() if bound else {os.stat(ROOT).st_dev}  # where missing mount points may be made
    for m in ready:
        _apply(m, verbose, ours, plan.in_place)
    if not plan.writable:  # a bound directory keeps the flags the kernel locked on it
        ro = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
        sc.mount(None, ROOT, None, ro | (sc.current_flags(ROOT) if bound else 0))
    timer("mounts")

    os.chdir(ROOT)
    sc.pivot_root(".", ".")  # stack the container root over the staging root...
    sc.umount2(".", sc.MNT_DETACH)  # ...and drop the staging root and the host with it
    os.chdir("/")
    if plan.hostname:
        sc.sethostname(plan.hostname)
    if plan.namespaces["net"]:
        _loopback_up()


def _direct(plan, lower, found):
    """Whether a read-only directory image can be the root as it is, bound, without an
    overlay (as ch-run runs one): every mount point and identity file is there, but a home
    whose top directory (/home) is empty, which a tmpfs then covers (_in_sandbox). Saves
    the overlay's cost on every lookup; the view is the overlay's, but that this /home is
    owned by the caller."""
    if plan.writable:
        return False
    for m, comps, exists in found:
        if not exists and not (m.name == "home" and len(comps) > 1 and _empty_dir(lower, comps[0])):
            return False
    return all(safepath.canonical(lower, rel)[1] for rel, _line, _key in _identity_files(plan))


def _empty_dir(lower, name):
    try:
        fd = safepath.open_in_root(lower, "/" + name)
    except OSError:
        return False
    try:
        return not os.listdir(safepath.fd_path(fd, PROC))  # an O_PATH fd: listed by its path
    except OSError:  # not a directory
        return False
    finally:
        os.close(fd)


def _bind_root(plan, lower, identity):
    """The image directory itself as the root (--writable: writable), the generated
    identity files bound over the image's, which stays unchanged."""
    sc.mount(lower, ROOT, None, sc.MS_BIND | sc.MS_REC, what=f"cannot bind the image directory {plan.image}")
    sc.mount(None, ROOT, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_NOSUID | sc.MS_NODEV | sc.current_flags(ROOT))
    ro = 0 if plan.writable else sc.MS_RDONLY  # as the root: a read-only one has a read-only passwd
    for src, comps in identity:
        fd = safepath.open_in_root(ROOT, "/" + "/".join(comps))  # the target stays inside the root
        try:
            target = safepath.fd_path(fd, PROC)
            sc.mount(src, target, None, sc.MS_BIND, what=f"cannot bind /{'/'.join(comps)}")
            sc.mount(None, os.readlink(target), None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_NOSUID | sc.MS_NODEV | ro)
        finally:
            os.close(fd)


def _source_ok(m):
    if os.path.exists(OLD + m.src):
        return True
    if m.optional or m.if_missing:
        return False
    raise BindError(f"bind source {m.src} does not exist", "create it or fix the --bind argument")


def _kind(m):
    return "dir" if m.kind == "tmpfs" or os.path.isdir(OLD + m.src) else "file"


def _make_point(upper, comps, m):
    try:
        safepath.make_in_upper(upper, comps, _kind(m))
    except OSError as e:  # our own tmpfs: only a full one or an odd image gets here
        raise BindError(
            f"cannot make the mount point {m.dst}: {e.strerror or e}", "choose another destination"
        ) from None


def _in_sandbox(m, lower, comps):
    """--writable, destination missing in the image: the sandbox is the user's own tree
    and stays as it is. As Apptainer without an overlay: default mounts are skipped; the
    home goes onto a tmpfs over its top directory (the staged home base of
    addHomeNoLayer), so /home/USER is never made in the sandbox; the user's binds are
    kept for _open_point, which refuses them unless an earlier mount provides the place."""
    if m.name == "home" and len(comps) > 1:
        _names, top_exists = safepath.canonical(lower, "/" + comps[0])
        if top_exists and os.path.isdir(f"{lower}/{comps[0]}"):  # comps[0] is no link: resolved
            return [Mount("homebase", "tmpfs", None, "/" + comps[0]), m]
    return [m] if m.name in ("user", "scratchdir", "home") else []


def _open_point(m, ours, in_place):
    """An O_PATH fd for m's destination in the container root. A missing one is made
    only where its parent lies on a file system of ours (the overlay root, a tmpfs we
    mounted): a bind source on the host, or a --writable sandbox, is never written to."""
    try:
        return safepath.open_in_root(ROOT, m.dst)
    except FileNotFoundError:
        pass
    comps, _exists = safepath.canonical(ROOT, m.dst)  # resolved up to the missing part
    k = 0
    while k < len(comps):
        try:
            os.close(safepath.open_in_root(ROOT, "/" + "/".join(comps[: k + 1])))
        except FileNotFoundError:
            break
        k += 1
    parent = safepath.open_in_root(ROOT, "/" + "/".join(comps[:k]))
    try:
        if os.fstat(parent).st_dev not in ours:
            raise BindError(
                f"bind destination {m.dst} does not exist in the container",
                "create it in the writable sandbox first: hpcrun never changes its tree, nor a bind's source"
                if in_place
                else "a destination inside another bind must exist in that bind's source: hpcrun never writes there",
            )
        safepath.make_in_upper(safepath.fd_path(parent, PROC), comps[k:], _kind(m))
    finally:
        os.close(parent)
    return safepath.open_in_root(ROOT, m.dst)


def _apply(m, verbose, ours, in_place=False):
    try:
        fd = _open_point(m, ours, in_place)
    except OSError as e:
        raise BindError(f"bind destination {m.dst}: {e.strerror or e}", "choose another destination") from None
    try:
        target = safepath.fd_path(fd, PROC)
        if m.kind == "tmpfs":
            if m.name == "dev":
                minimal_dev(target, m.src)
            else:
                mode = "0755" if m.name == "homebase" else "1777"
                sc.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, f"mode={mode}")
            ours.add(os.stat(os.readlink(target)).st_dev)  # the new tmpfs: mount points may go in it
            return
        src = OLD + m.src
        if os.path.isdir(target) != os.path.isdir(src):
            if m.optional:  # a default mount the image does not fit (issue 5465): not fatal
                return
            raise BindError(
                f"bind {m.src} -> {m.dst}: one is a directory, the other is not",
                "bind a directory onto a directory and a file onto a file",
            )
        if verbose:
            say(f"bind {m.src} -> {m.dst}{' (ro)' if m.readonly else ''}")
        sc.mount(src, target, None, sc.MS_BIND | sc.MS_REC, what=f"cannot bind {m.src} to {m.dst}")
        real = os.readlink(target)  # where the fd landed: inside ROOT by construction
        want = sc.MS_NOSUID | (sc.MS_NODEV if m.nodev else 0) | (sc.MS_RDONLY if m.readonly else 0)
        sc.mount(
            None,
            real,
            None,
            sc.MS_REMOUNT | sc.MS_BIND | want | sc.current_flags(real),
            what=f"cannot make {m.dst} nosuid/nodev",
        )
    except OSError as e:  # e.g. longer than PATH_MAX once the image's symlinks are followed
        raise BindError(f"bind destination {m.dst[:60]}: {e.strerror or e}", "choose another destination") from None
    finally:
        os.close(fd)


# Apptainer's minimal /dev (container_linux.go addDevMount): host devices bound in
# (an unprivileged user cannot mknod), links to /proc/self/fd, a new devpts, /dev/shm.
DEVICES = ("tty", "null", "zero", "random", "urandom")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)


def minimal_dev(target, held):
    """A tmpfs /dev on target holding DEVICES, the console (the caller's terminal, if
    any), DEV_LINKS and shm; `held` (plan.minimal_dev) adds devpts, mqueue and the
    mount points of user binds (src, dst) under /dev."""
    sc.mount("hpcrun-dev", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755,size=1m")
    dfd = os.open(os.readlink(target), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in DEVICES:
            _bind_device(dfd, "/dev/" + name, name)
        console = _terminal()
        if console:
            _bind_device(dfd, console, "console")
        for name, link in DEV_LINKS:
            os.symlink(link, name, dir_fd=dfd)
        _mount_in(dfd, "shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777")
        if "devpts" in held:  # no gid=5: the tty group is not mapped in our namespace
            _mount_in(dfd, "pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0620,newinstance,ptmxmode=0666")
            os.symlink("pts/ptmx", "ptmx", dir_fd=dfd)
        if "mqueue" in held:
            try:
                _mount_in(dfd, "mqueue", "mqueue", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None)
            except RuntimeSetupError:
                os.rmdir("mqueue", dir_fd=dfd)  # the kernel lacks POSIX message queues
        for src, dst in (h for h in held if not isinstance(h, str)):
            kind = "dir" if os.path.isdir(OLD + src) else "file"
            fd, _, _ = safepath.walk_at(os.dup(dfd), dst[len("/dev") :], create=kind)
            os.close(fd)
    finally:
        os.close(dfd)


def _terminal():
    """The host path of the terminal on stdin, stdout or stderr, if any."""
    for fd in (0, 1, 2):
        if os.isatty(fd):
            path = os.readlink(f"{PROC}/self/fd/{fd}")
            if path.startswith("/dev/") and os.path.exists(OLD + path):
                return path
    return None


def _bind_device(dfd, host_path, name):
    """Bind the host's device node onto a new empty file `name` in the /dev tmpfs; the
    bind keeps the host mount's flags (nosuid, not nodev)."""
    if not os.path.exists(OLD + host_path):
        return
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        sc.mount(OLD + host_path, safepath.fd_path(fd, PROC), None, sc.MS_BIND, what=f"cannot bind {host_path}")
    finally:
        os.close(fd)


def _mount_in(dfd, name, fstype, flags, data):
    os.mkdir(name, 0o755, dir_fd=dfd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        sc.mount(fstype, safepath.fd_path(fd, PROC), fstype, flags, data, what=f"cannot mount {fstype} on /dev/{name}")
    finally:
        os.close(fd)


def _identity_files(plan):
    """(path, line, key) of the identity files to write; none for a caller without a safe
    entry (plan.identity_lines: the image's file stays), unless root."""
    pairs = (("/etc/passwd", plan.passwd_line, plan.user), ("/etc/group", plan.group_line, plan.group))
    return [(rel, line, key) for rel, line, key in pairs if line is not None or plan.uid == 0]


def _write_identity(plan, lower, upper, bound):
    """The caller's passwd/group entries after the image's own: written into the overlay's
    upper layer; for a bound root (no overlay) into our tmpfs, returned as (file,
    components) to bind over the image's."""
    binds = []
    for rel, line, key in _identity_files(plan):
        comps, exists = safepath.canonical(lower, rel)
        old = []
        if exists:
            fd = safepath.open_in_root(lower, rel)
            try:
                with open(safepath.fd_path(fd, PROC), encoding="utf-8", errors="surrogateescape") as f:
                    old = f.read().splitlines()
            finally:
                os.close(fd)
        if plan.uid == 0:
            if any(ln.split(":", 1)[0] == "root" for ln in old):
                continue  # the image's own root entry stays
            line = "root:x:0:0:root:/root:/bin/sh" if rel == "/etc/passwd" else "root:x:0:"
            key = "root"
        text = "\n".join([ln for ln in old if ln.split(":", 1)[0] != key] + [line]) + "\n"
        if bound:
            if not exists:
                continue  # nothing to bind it onto, and the sandbox is never written to
            path = f"{RW}/{os.path.basename(rel)}"
            binds.append((path, comps))
        else:
            safepath.make_in_upper(upper, comps, "file")
            path = upper + "/" + "/".join(comps)
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
    return binds


def _cuda_check(plan, lower):
    """--nv: one warning line when the image's CUDA toolkit is newer than the driver's."""
    from hpcrun.gpu import nvidia  # imported in build(), before the host went out of reach

    for rel in nvidia.CUDA_FILES:
        try:
            fd = safepath.open_in_root(lower, rel)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_mode & 0o170000 != 0o100000:  # a FIFO would block the start
                continue
            with open(safepath.fd_path(fd, PROC), encoding="utf-8", errors="replace") as f:
                version = nvidia.image_cuda(f.read(65536))
        except OSError:
            version = None
        finally:
            os.close(fd)
        line = version and nvidia.mismatch(version, *plan.cuda_driver)
        if line:
            say(f"warning: {line}")
        return


def _loopback_up():
    import fcntl  # imported in launch(), before the host's files went out of reach
    import socket
    import struct

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, ifr))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
    finally:
        s.close()


def resolve_argv(plan, exists, access):
    """The argv to exec inside the container, for exec/run/shell/test."""
    app = getattr(plan, "app", None)
    if app:
        check_app(plan, app, exists, access)
    if plan.action == "exec":
        argv = list(plan.args)
    elif plan.action in ("run", "test") and app:
        argv = [f"/scif/apps/{app}/scif/{'runscript' if plan.action == 'run' else 'test'}"] + plan.args
    elif plan.action == "run":
        script = "/.singularity.d/runscript"
        argv = ([script] if exists(script) and access(script, os.X_OK) else ["/bin/sh"]) + plan.args
    elif plan.action == "test":  # as Apptainer: no test script is no failure
        script = "/.singularity.d/test"
        if exists(script) and access(script, os.X_OK):
            argv = [script] + plan.args
        else:
            argv = ["/bin/sh", "-c", 'echo "No test script found in container, exiting" >&2']
    else:
        sh = "/bin/bash" if exists("/bin/bash") else "/bin/sh"
        argv = [sh] + (["--norc"] if sh.endswith("bash") else []) + plan.args
    try:
        has_env = any(n.endswith(".sh") for n in os.listdir(envvars.ENV_DIR))
    except OSError:
        has_env = exists(envvars.OLD_ENV)  # only without ENV_DIR, as Apptainer's action script
    libs = any(envvars.under_libs(m.dst) for m in plan.mounts) or envvars.LD_KEYS & plan.forced.keys()
    if app or has_env or libs or envvars.needs_eval(plan.forced, plan.no_eval) and exists("/bin/sh"):
        ids = (plan.uid, plan.gid)
        script = envvars.wrapper_script(plan.forced, plan.no_eval, ids, app=app, lib_dirs=plan.lib_dirs)
        argv = ["/bin/sh", "-c", script, errors.PROG] + argv  # $0: sh starts its error lines with it
    return argv


def check_app(plan, app, exists, access):
    """--app NAME: the image must have the app (and, for run/test, its script): one line."""
    from hpcrun.errors import PROG, ImageError

    meta = f"/scif/apps/{app}/scif"
    if not exists(meta):
        raise ImageError(f"no app {app!r} in {plan.image}", f"list its apps: {PROG} inspect --list-apps IMAGE")
    what, section = {"run": ("runscript", "apprun"), "test": ("test", "apptest")}.get(plan.action, (None, None))
    if what and not (exists(f"{meta}/{what}") and access(f"{meta}/{what}", os.X_OK)):
        raise ImageError(f"app {app!r} in {plan.image} has no {what}", f"its definition has no %{section} {app}")


def _chdir(plan):
    try:
        os.chdir(plan.cwd)
    except OSError:
        if plan.pwd_given:
            raise RuntimeSetupError(f"--pwd {plan.cwd}: no such directory in the container") from None
        if not os.path.isdir(plan.home):
            os.chdir("/")
        else:
            os.chdir(plan.home)
        plan.env["PWD"] = os.getcwd()  # where the command really starts


def find_program(name, path):
    """Look the command up in the container's PATH (done here, not by os.execvpe, which
    imports modules that are out of reach after pivot_root)."""
    if "/" in name:
        return name
    for d in path.split(":"):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _default_signals():
    """Start the command with the dispositions a host command would have: default for
    every signal, except those ignored when hpcrun started (INHERITED_IGN). Python's own
    handlers (SIGINT) go too, so that a signal before execve acts as on the command."""
    for s in range(1, signal.NSIG):
        want = signal.SIG_IGN if s in INHERITED_IGN else signal.SIG_DFL
        h = signal.getsignal(s)  # None: a signal Python does not manage (32, 33)
        if h is not None and h != want:
            signal.signal(s, want)


def _exec(program, argv, env):
    """In the container child: never returns."""
    try:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        os.execve(program, argv, env)
    except FileNotFoundError:
        sys.stderr.write(f"{errors.PROG}: error: {argv[0]}: command not found in the container\n")
        os._exit(NOT_FOUND)
    except PermissionError:
        sys.stderr.write(f"{errors.PROG}: error: {argv[0]}: permission denied (not executable)\n")
        os._exit(NOT_EXECUTABLE)
    except OSError as e:
        sys.stderr.write(f"{errors.PROG}: error: {argv[0]}: cannot execute: {e.strerror}\n")
        os._exit(NOT_EXECUTABLE)
    except BaseException:
        os._exit(NOT_EXECUTABLE)
    os._exit(NOT_EXECUTABLE)


def supervise(plan, program, argv, daemon_pid, timer):
    """Fork the guardian (which runs the command), forward signals to it, wait, stop
    the FUSE daemon, and return the command's status."""
    waited = set(FORWARD) | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited | {GUARD})
    if plan.namespaces["pid"]:  # in a shared container, the new /proc must be ours alone
        sc.unshare(sc.CLONE_NEWPID | (sc.CLONE_NEWNS if plan.share and plan.new_proc else 0))
    me = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _guardian(plan, program, argv, waited, me)
        finally:
            os._exit(NOT_EXECUTABLE)
    timer("fork")
    status = _wait(pid, waited)
    if daemon_pid:
        _stop(daemon_pid)
    return status


def _wait(pid, waited):
    """Forward signals to pid until it exits; return its exit status (128+N if killed).
    GUARD (our parent died) kills pid instead."""
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo != signal.SIGCHLD:
            if info.si_code != SI_KERNEL:  # the terminal already sent it to the command
                try:
                    os.kill(pid, signal.SIGKILL if info.si_signo == GUARD else info.si_signo)
                except ProcessLookupError:
                    pass
            continue
        while True:
            try:
                got, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 255
            if got == 0:
                break
            if got == pid:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code


def _stop(pid):
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _guardian(plan, program, argv, waited, parent):
    """The command's parent inside the container. With --pid it is PID 1 (mounts the new
    /proc; the kernel drops signals to PID 1 that it does not wait for); otherwise a
    subreaper. Either way, when the command exits or hpcrun dies (even by SIGKILL:
    PDEATHSIG sends GUARD), it kills every process the command left and exits."""
    sc.prctl(sc.PR_SET_PDEATHSIG, GUARD)
    if os.getppid() not in (parent, 0):  # 0: our parent is outside our new PID namespace
        os._exit(1)
    if plan.namespaces["pid"] and plan.new_proc:
        sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    if plan.no_init:  # --no-init: the command is PID 1; when it exits
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # the kernel kills the namespace
        _default_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _exec(program, argv, plan.env)
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != me:
            os._exit(1)
        _default_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _exec(program, argv, plan.env)
    status = _wait(pid, waited | {GUARD})
    _kill_children()
    os._exit(status)


def _kill_children():
    """SIGKILL our children until none is left (orphans of the command reparent to us)."""
    path = f"/proc/self/task/{os.getpid()}/children"
    for _ in range(1000):
        try:
            with open(path, "rb") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return  # no /proc in the container: nothing to find them with
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in pids:
            try:
                os.waitpid(p, 0)
            except ChildProcessError:
                pass
