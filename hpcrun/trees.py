"""Whole trees we made (build work directories, extracted images): made removable,
removed (fd-based through inroot, never following a link), and a remover process that
deletes one even when hpcrun is SIGKILLed."""
import os
import stat

from hpcrun import inroot


def make_removable(top, keep_modes=False):
    """Give the owner rwx on top and every directory under it (links untouched), best
    effort. keep_modes: add u+rwx to the mode (a sandbox we hand over); else 0700 (a
    tree about to be removed)."""
    parent = os.open(os.path.dirname(os.path.abspath(top)), inroot.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def fix(dfd, name):
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                inroot.set_attrs_at(dfd, name, mode=stat.S_IMODE(st.st_mode) | stat.S_IRWXU if keep_modes
                                    else stat.S_IRWXU)
        except OSError:
            pass
    try:
        inroot.walk_at(parent, os.path.basename(os.path.abspath(top)), on_leave=fix)
    except OSError:
        pass
    finally:
        os.close(parent)


def remove(top):
    """rm -rf top, best effort (files of other ids may stay: see start_remover)."""
    top = os.path.abspath(top)
    try:
        parent = os.open(os.path.dirname(top), inroot.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        inroot.remove_at(parent, os.path.basename(top))
    except OSError:
        pass
    finally:
        os.close(parent)


def remove_all(top, idmap=None):
    """remove(top); what is left (files owned by subordinate ids) as root of the mapping."""
    remove(top)
    if os.path.lexists(top) and idmap and idmap["mode"] == "subid":
        from hpcrun.runtime.idmap import run_mapped
        run_mapped(["rm", "-rf", "--", top], idmap)


def start_remover(top, idmap=None):
    """Fork the process that removes top once we are gone or done (our end of a pipe
    closes); it is in a session of its own, so the terminal's ^C leaves it be, and holds
    none of our other fds. -> (pid, fd) for stop_remover."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(r)
        return pid, w
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, r)
        os.closerange(r + 1, 65536)
        os.read(r, 1)       # EOF: hpcrun closed it, or exited (even by SIGKILL)
        # A tool killed with us may still write a moment: remove until it stays gone.
        import time
        for _ in range(10):
            remove_all(top, idmap)
            if not os.path.lexists(top):
                break
            time.sleep(0.05)
    finally:
        os._exit(0)


def stop_remover(remover):
    """Let the remover do its work now and wait for it."""
    pid, w = remover
    os.close(w)
    os.waitpid(pid, 0)
