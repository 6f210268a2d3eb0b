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
                inroot.set_attrs_at(
                    dfd, name, mode=stat.S_IMODE(st.st_mode) | stat.S_IRWXU if keep_modes else stat.S_IRWXU
                )
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


class Remover:
    """A private temporary directory (mkdtemp in where) made by a process forked for it,
    which removes it once we are done or gone (our end of a pipe closes, even by SIGKILL):
    no such tree ever exists without its remover. The process is in a session of its own,
    so the terminal's ^C leaves it be, and holds none of our other fds. Tools killed with
    us (PDEATHSIG) may still write a moment: it removes until the tree stays gone."""

    def __init__(self, where, prefix, idmap=None):
        life_r, self.life = os.pipe2(os.O_CLOEXEC)
        name_r, name_w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.life)
                os.close(name_r)
                _remover(where, prefix, idmap, life_r, name_w)
            finally:
                os._exit(0)
        os.close(life_r)
        os.close(name_w)
        answer = b""
        while chunk := os.read(name_r, 4096):
            answer += chunk
        os.close(name_r)
        kind, _, text = answer.decode(errors="surrogateescape").partition(":")
        if kind != "ok":
            self.stop()
            raise OSError(
                int(text) if text.isdigit() else 0,
                os.strerror(int(text)) if text.isdigit() else "the remover process died",
                where,
            )
        self.top = text

    def stop(self):
        """Remove the tree now and wait until it is gone."""
        if self.life is not None:
            os.close(self.life)
            self.life = None
            os.waitpid(self.pid, 0)


def _remover(where, prefix, idmap, life, name_w):
    import tempfile
    import time

    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        top = tempfile.mkdtemp(prefix=prefix, dir=where)
    except OSError as e:
        os.write(name_w, f"error:{e.errno}".encode())
        return
    os.write(name_w, b"ok:" + os.fsencode(top))
    os.close(name_w)
    os.closerange(3, life)
    os.closerange(life + 1, 65536)
    os.read(life, 1)  # EOF: done, or hpcrun exited (even by SIGKILL)
    for _ in range(50):
        remove_all(top, idmap)
        if not os.path.lexists(top):
            return
        time.sleep(0.05)
