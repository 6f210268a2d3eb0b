"""Removing trees that hold read-only directories (extracted images, build roots)."""
import os
import shutil
import stat


def make_removable(top):
    """Give the owner rwx on every directory under top (links untouched), best effort."""
    for dirpath, dirnames, _ in os.walk(top):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                try:
                    os.chmod(p, stat.S_IRWXU)
                except OSError:
                    pass
    try:
        os.chmod(top, stat.S_IRWXU)
    except OSError:
        pass


def remove(top):
    make_removable(top)
    shutil.rmtree(top, ignore_errors=True)
