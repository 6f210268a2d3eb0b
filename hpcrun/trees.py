"""Removing trees that hold read-only directories (extracted images, build roots)."""
import os
import shutil
import stat


def make_removable(top, keep_modes=False):
    """Give the owner rwx on top and every directory under it (links untouched), best
    effort. keep_modes: add u+rwx to the mode (a sandbox we hand over) instead of
    setting 0700 (a tree about to be removed)."""
    def fix(p):
        try:
            mode = stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IRWXU if keep_modes else stat.S_IRWXU
            os.chmod(p, mode)
        except OSError:
            pass
    fix(top)
    for dirpath, dirnames, _ in os.walk(top):   # top-down: fixed before it is entered
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                fix(p)


def remove(top):
    make_removable(top)
    shutil.rmtree(top, ignore_errors=True)
