"""Tell what an image is by its content (never its name) and check it can be mounted."""

import os
import stat
import struct

from hpcrun.errors import ImageError

SUPERBLOCK = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")  # 96 bytes, squashfs 4.0


class Image:
    """An image ready to mount: kind is 'sif', 'squashfs' or 'sandbox'.

    fd stays open (inheritable later) so that what was checked is what gets mounted.
    """

    def __init__(self, path, kind, fd=None, offset=0, size=None, warning=None):
        self.path, self.kind, self.fd, self.offset, self.size, self.warning = (path, kind, fd, offset, size, warning)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_squashfs(path, fd, offset, limit):
    """Validate the squashfs superblock at offset; limit = bytes available from offset."""
    sb = os.pread(fd, SUPERBLOCK.size, offset)
    if len(sb) < SUPERBLOCK.size:
        raise ImageError(f"{path}: truncated squashfs image", "copy or build it again")
    (
        magic,
        _inodes,
        _mtime,
        block_size,
        _frags,
        compression,
        block_log,
        _flags,
        _ids,
        major,
        _minor,
        _root,
        bytes_used,
        *tables,
    ) = SUPERBLOCK.unpack(sb)
    if magic != 0x73717368:
        raise ImageError(f"{path}: no squashfs data at offset {offset}")
    if major != 4:
        raise ImageError(
            f"{path}: squashfs version {major} is not supported (only 4)", "rebuild it with a current mksquashfs"
        )
    if block_size != 1 << block_log or not 4096 <= block_size <= 1 << 20 or not 1 <= compression <= 6:
        raise ImageError(f"{path}: corrupt squashfs image (bad superblock)", "copy or build it again")
    if bytes_used > limit:
        raise ImageError(
            f"{path}: truncated squashfs image ({limit} of {bytes_used} bytes present)",
            "the file was cut short: copy or build it again",
        )
    if any(t != 0xFFFFFFFFFFFFFFFF and t > bytes_used for t in tables):
        raise ImageError(f"{path}: corrupt squashfs image (tables outside the image)", "copy or build it again")


KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _kind_ok(mode, dirs):
    return stat.S_ISREG(mode) or dirs and stat.S_ISDIR(mode)


def open_file(path, dirs=True, what="container image"):
    """Open path read-only, refusing anything but a regular file (or a directory): a
    FIFO or a device would block in open() or read forever. stat first so that no
    device is opened at all; open non-blocking and check again with fstat, as the path
    may have been swapped in between; then make the fd blocking again."""
    noun = "image" if dirs else "file"
    try:
        mode = os.stat(path).st_mode
        if _kind_ok(mode, dirs):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            mode = os.fstat(fd).st_mode
            if _kind_ok(mode, dirs):
                os.set_blocking(fd, True)
                return fd
            os.close(fd)
    except FileNotFoundError:
        raise ImageError(f"{noun} not found: {path}", "check the path") from None
    except PermissionError:
        raise ImageError(f"{noun} not readable: {path}", "check its permissions") from None
    except OSError as e:
        raise ImageError(f"cannot open {noun} {path}: {e.strerror}") from None
    kind = next((name for test, name in KINDS if test(mode)), "of an unknown type")
    raise ImageError(
        f"{path} is {kind}, not a {what}",
        "give a .sif or squashfs file, or a sandbox directory" if dirs else "give a .sif file",
    )


LAUNCH = b" run-singularity"  # Singularity 2.x images start `#!/usr/bin/env run-singularity\n`
LAUNCH_SEARCH = 2048  # how far Apptainer looks for it


def launch_offset(head):
    """Where the squashfs of a Singularity 2.x image starts (after its launch line, as
    Apptainer finds it), or 0 when head is not such an image."""
    i = head.find(LAUNCH) if head[:2] == b"#!" else -1
    if i < 0:
        return 0
    offset = i + len(LAUNCH) + 1
    return offset if head[offset : offset + 4] == b"hsqs" else 0


def open_image(path):
    """Open and identify the image at path; the caller owns the returned Image."""
    fd = open_file(path)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return Image(os.path.realpath(path), "sandbox", fd)  # host path, symlinks resolved
        head = os.pread(fd, LAUNCH_SEARCH, 0)
        if head[32:42] == b"SIF_MAGIC\0":
            from hpcrun.images import sif

            sf = sif.SifFile(path, fd)
            offset, size, warning = sif.runnable_partition(sf, fd)
            check_squashfs(path, fd, offset, size)
            return Image(path, "sif", fd, offset, size, warning)
        if head[:4] == b"hsqs":
            check_squashfs(path, fd, 0, st.st_size)
            return Image(path, "squashfs", fd, 0, st.st_size)
        offset = launch_offset(head)
        if offset:  # Singularity 2.x: a launch line, then the squashfs
            check_squashfs(path, fd, offset, st.st_size - offset)
            return Image(path, "squashfs", fd, offset, st.st_size - offset)
        raise ImageError(
            f"{path}: not a container image (neither SIF, squashfs nor a directory)",
            "give a .sif or squashfs file, or a sandbox directory",
        )
    except BaseException:
        os.close(fd)
        raise
