"""Resolve a path inside a container root the way the container will see it.

Every component is opened with O_PATH|O_NOFOLLOW relative to its parent; symlinks are
read and followed by hand, absolute targets restart at the root and `..` stops at the
root. So a symlink in an image can never lead a mount onto a host path: the result is
an fd for an object inside the root, and mounts go onto /proc/self/fd/N (as runc does).
"""

import os
import stat

from hpcrun.errors import BindError

MAXLINKS = 40
O_PATH = getattr(os, "O_PATH", 0o10000000)


def components(path):
    return [p for p in path.split("/") if p and p != "."]


def _walk(root, path, create=None):
    return walk_at(os.open(root, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), path, create)


def walk_at(rootfd, path, create=None):
    """The one resolver: returns (fd or None, components inside root, exists). Takes over
    rootfd (closes it).

    A missing component either ends the walk (create=None: the rest of the path is
    taken literally, fd None) or is created (parents as directories, the last as
    `create`)."""
    stack, names = [rootfd], []
    todo = components(path)
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    names.pop()
                continue
            parent = stack[-1]
            try:
                fd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except FileNotFoundError:
                if create is None:
                    for n in [name] + todo:  # the missing tail is taken literally
                        if n == "..":
                            names = names[:-1]
                        else:
                            names.append(n)
                    return None, names, False
                if create == "file" and not todo:
                    os.close(
                        os.open(
                            name,
                            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                            0o644,
                            dir_fd=parent,
                        )
                    )
                else:
                    os.mkdir(name, 0o755, dir_fd=parent)
                fd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                target = os.readlink(name, dir_fd=parent)
                os.close(fd)
                links += 1
                if links > MAXLINKS:
                    raise BindError(f"{path}: too many levels of symbolic links in the image")
                if target.startswith("/"):  # absolute: restart at the root
                    for extra in stack[1:]:
                        os.close(extra)
                    del stack[1:]
                    names = []
                todo = components(target) + todo
                continue
            if todo and not stat.S_ISDIR(os.fstat(fd).st_mode):
                os.close(fd)
                raise NotADirectoryError(path)
            stack.append(fd)
            names.append(name)
        return os.dup(stack[-1]), names, True
    finally:
        for fd in stack:
            os.close(fd)


def open_in_root(root, path, create=None):
    """Return an O_PATH fd for `path` inside `root` (a directory path).

    create: None (must exist), "dir" or "file": create the missing last component as
    that, and missing parents as directories.
    """
    fd, _names, exists = _walk(root, path, create)
    if not exists:
        raise FileNotFoundError(2, "No such file or directory", path)
    return fd


def canonical(root, path):
    """The path inside `root` that `path` names once the image's symlinks are followed
    (clamped at root), as a list of components, and whether it exists."""
    fd, names, exists = _walk(root, path)
    if fd is not None:
        os.close(fd)
    return names, exists


def fd_path(fd, proc="/proc"):
    return f"{proc}/self/fd/{fd}"


def make_in_upper(upper, comps, kind):
    """Create comps (from canonical()) under the overlay upper directory `upper`:
    parents as directories, the last as `kind` ('dir' or 'file')."""
    fd = os.open(upper, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(comps):
            last = i == len(comps) - 1
            try:
                if last and kind == "file":
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd))
                    return
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
