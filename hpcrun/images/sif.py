"""Read SIF (Singularity Image Format) files as written by Apptainer's SIF library.

Layout facts are in shared/SIF.md; only what running an image needs is here: the
global header, the descriptor table and the primary system partition.
"""

import os
import struct

from hpcrun.errors import ImageError

HEADER = struct.Struct("<32s10s3s3s16sqqqqqqqq")
DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")
MAGIC = b"SIF_MAGIC\0"

DATATYPES = {
    0x4001: "Def.FILE",
    0x4002: "Env.Vars",
    0x4003: "JSON.Labels",
    0x4004: "FS",
    0x4005: "Signature",
    0x4006: "JSON.Generic",
    0x4007: "Generic/Raw",
    0x4008: "Cryptographic Message",
    0x4009: "SBOM",
    0x400A: "OCI.RootIndex",
    0x400B: "OCI.Blob",
}
PARTITION = 0x4004
FSTYPES = {1: "Squashfs", 2: "Ext3", 3: "Archive", 4: "Raw", 5: "Encrypted squashfs", 6: "Gocryptfs squashfs"}
PARTTYPES = {1: "System", 2: "*System", 3: "Data", 4: "Overlay"}
PRIMSYS = 2
FS_SQUASH = 1
ARCHES = {
    "00": "unknown",
    "01": "386",
    "02": "amd64",
    "03": "arm",
    "04": "arm64",
    "05": "ppc64",
    "06": "ppc64le",
    "07": "mips",
    "08": "mipsle",
    "09": "mips64",
    "10": "mips64le",
    "11": "s390x",
    "12": "riscv64",
    "13": "loong64",
}
# What each host architecture can also run natively (32-bit compat modes).
RUNS_ON = {
    "amd64": {"amd64", "386"},
    "arm64": {"arm64", "arm"},
    "ppc64le": {"ppc64le"},
    "s390x": {"s390x"},
    "riscv64": {"riscv64"},
    "386": {"386"},
    "arm": {"arm"},
    "loong64": {"loong64"},
}
UNAME_ARCH = {
    "x86_64": "amd64",
    "i686": "386",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
}


class Descriptor:
    __slots__ = ("datatype", "id", "groupid", "linkid", "offset", "size", "ctime", "mtime", "name", "extra")
    __slots__ += ("name_bytes",)

    def __init__(self, raw):
        (
            self.datatype,
            _used,
            self.id,
            self.groupid,
            self.linkid,
            self.offset,
            self.size,
            _storelen,
            self.ctime,
            self.mtime,
            _uid,
            _gid,
            name,
            self.extra,
        ) = raw
        self.name_bytes = name.rstrip(b"\0")  # raw: `sif info` prints the bytes, as siftool
        self.name = self.name_bytes.decode("utf-8", "replace")

    @property
    def fstype(self):
        return struct.unpack_from("<i", self.extra, 0)[0]

    @property
    def parttype(self):
        return struct.unpack_from("<i", self.extra, 4)[0]

    @property
    def arch(self):
        return ARCHES.get(self.extra[8:10].decode("ascii", "replace"), "unknown")


class SifFile:
    """The parsed header and used descriptors of one SIF file (validated)."""

    def __init__(self, path, fd=None):
        self.path = path
        close = fd is None
        if fd is None:
            from hpcrun.images.detect import open_file  # never blocks on a FIFO or a device

            fd = open_file(path, dirs=False, what="SIF file")
        try:
            self._read(fd)
        finally:
            if close:
                os.close(fd)

    def _read(self, fd):
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEADER.size, 0)
        if len(head) < HEADER.size:
            raise ImageError(
                f"{self.path}: truncated SIF file ({size} bytes, the header alone is 128)",
                "the file was cut short: copy or download it again",
            )
        (
            launch,
            magic,
            version,
            arch,
            uuid,
            self.ctime,
            self.mtime,
            self.dfree,
            self.dtotal,
            self.doffset,
            self.dsize,
            self.data_offset,
            self.data_size,
        ) = HEADER.unpack(head)
        if magic != MAGIC:
            raise ImageError(f"{self.path}: not a SIF file (no SIF_MAGIC)")
        self.version = version.rstrip(b"\0").decode("ascii", "replace")
        if self.version != "01":
            raise ImageError(f"{self.path}: SIF version {self.version!r} is not supported (only 01)")
        self.launch = launch.rstrip(b"\0")
        self.arch = ARCHES.get(arch[:2].decode("ascii", "replace"), "unknown")
        self.arch_bytes = arch  # all 3 bytes: siftool knows an arch only with its NUL
        self.uuid = uuid
        self.file_size = size
        if (
            self.dtotal < 0
            or self.doffset < HEADER.size
            or self.dtotal > 1 << 16
            or self.doffset + self.dtotal * DESCRIPTOR.size > size
        ):
            raise ImageError(
                f"{self.path}: truncated or corrupt SIF file (descriptor table outside the file)",
                "copy or download it again",
            )
        table = os.pread(fd, self.dtotal * DESCRIPTOR.size, self.doffset)
        self.descriptors = []
        for i in range(self.dtotal):
            raw = DESCRIPTOR.unpack_from(table, i * DESCRIPTOR.size)
            if not raw[1]:
                continue
            d = Descriptor(raw)
            if d.offset < 0 or d.size < 0 or d.offset + d.size > size:
                raise ImageError(
                    f"{self.path}: truncated SIF file (object {d.id} ends at byte "
                    f"{d.offset + d.size}, the file has {size})",
                    "the file was cut short: copy or download it again",
                )
            self.descriptors.append(d)

    def primary_partition(self):
        prims = [d for d in self.descriptors if d.datatype == PARTITION and d.parttype == PRIMSYS]
        if len(prims) > 1:
            raise ImageError(f"{self.path}: invalid SIF file (two primary system partitions)")
        return prims[0] if prims else None


def host_arch():
    return UNAME_ARCH.get(os.uname().machine, os.uname().machine)


def runnable_partition(sif, fd):
    """Return (offset, size, warning) of the primary partition hpcrun can mount, or raise."""
    part = sif.primary_partition()
    if part is None:
        raise ImageError(
            f"{sif.path}: SIF file has no primary system partition, nothing to run",
            "build it with a root file system, e.g. `hpcrun build`",
        )
    if part.fstype != FS_SQUASH:
        kind = FSTYPES.get(part.fstype, f"type {part.fstype}")
        hint = (
            "encrypted images are not supported"
            if part.fstype in (5, 6)
            else "rebuild the image with a squashfs root file system"
        )
        raise ImageError(f"{sif.path}: primary partition is {kind}, hpcrun runs squashfs partitions only", hint)
    if os.pread(fd, 4, part.offset) != b"hsqs":
        raise ImageError(
            f"{sif.path}: primary partition is labelled Squashfs but holds no squashfs data",
            "the file is corrupt or was not written by a SIF tool",
        )
    warning = None
    host = host_arch()
    if part.arch != "unknown" and part.arch != host:
        if part.arch not in RUNS_ON.get(host, {host}):
            raise ImageError(
                f"{sif.path}: image is built for {part.arch}, this host runs {host}", f"use an image built for {host}"
            )
        warning = f"image architecture {part.arch} differs from host {host}; running it in compatibility mode"
    return part.offset, part.size, warning


def arch_code(arch):
    return next((code for code, name in ARCHES.items() if name == arch), "00")


def write_sif(out, squashfs, arch=None, now=None, uuid_bytes=None):
    """Write a SIF holding `squashfs` as its primary system partition, laid out as
    Apptainer's SIF library does: 48 descriptors at 4096, the partition 4096-aligned."""
    import time
    import uuid as uuidmod

    arch = arch or host_arch()
    now = int(time.time()) if now is None else now
    uuid_bytes = uuidmod.uuid4().bytes if uuid_bytes is None else uuid_bytes
    size = os.path.getsize(squashfs)
    total, doffset = 48, 4096
    data_offset = doffset + total * DESCRIPTOR.size
    part_offset = (data_offset + 4095) // 4096 * 4096
    storelen = part_offset - data_offset + size
    code = arch_code(arch).encode() + b"\0"
    extra = struct.pack("<ii3s", FS_SQUASH, PRIMSYS, code)
    desc = DESCRIPTOR.pack(
        PARTITION, True, 1, 0xF0000000 | 1, 0, part_offset, size, storelen, now, now, 0, 0, b"", extra
    )
    header = HEADER.pack(
        b"#!/usr/bin/env run-singularity\n",
        MAGIC,
        b"01\0",
        code,
        uuid_bytes,
        now,
        now,
        total - 1,
        total,
        doffset,
        total * DESCRIPTOR.size,
        data_offset,
        storelen,
    )
    tmp = out + ".tmp"
    with open(tmp, "wb") as f, open(squashfs, "rb") as src:
        f.write(header)
        f.seek(doffset)
        f.write(desc)
        f.write(b"\0" * (total - 1) * DESCRIPTOR.size)
        f.seek(part_offset)
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)
        os.fchmod(f.fileno(), 0o755 & ~_umask())  # executable, like Apptainer's: `./image.sif args` runs it
    os.replace(tmp, out)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
