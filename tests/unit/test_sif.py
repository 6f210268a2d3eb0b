"""hpcrun.images.sif and hpcrun.images.detect against real Apptainer SIF files,
squashfs images built with mksquashfs, and synthetic SIF files written with struct."""

import os
import random
import re
import shutil
import struct
import subprocess

import pytest

from hpcrun.errors import IMAGE, ImageError
from hpcrun.images import detect, sif
from hpcrun.images.detect import open_image

from .testdata import SIF_DATA

TESTDATA = SIF_DATA
ONE_GROUP = os.path.join(TESTDATA, "one-group.sif")
LEGACY = os.path.join(TESTDATA, "two-groups-signed-legacy-all.sif")
SBOM = os.path.join(TESTDATA, "one-object-sbom.sif")

needs_mksquashfs = pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="no mksquashfs")


@pytest.fixture(autouse=True)
def amd64_host(monkeypatch):
    """Decisions about architecture are made as on an amd64 host, whatever runs the tests."""
    monkeypatch.setattr(sif, "host_arch", lambda: "amd64")


@pytest.fixture
def opened():
    images = []

    def _open(path):
        img = open_image(str(path))
        images.append(img)
        return img

    yield _open
    for img in images:
        img.close()


def image_error(path):
    with pytest.raises(ImageError) as ei:
        img = open_image(str(path))
        img.close()
    assert ei.value.code == IMAGE
    return ei.value


# ---------------------------------------------------------------- siftool output as oracle

HASHES = {1: "SHA-256", 2: "SHA-384", 3: "SHA-512", 4: "BLAKE2s-256", 5: "BLAKE2b-256"}
SBOM_FORMATS = {1: "cyclonedx-json", 2: "cyclonedx-xml", 3: "github-json", 4: "spdx-json"}


def read_list(name):
    rows = []
    with open(os.path.join(TESTDATA, name + ".list"), encoding="utf-8") as f:
        for line in f:
            cols = [c.strip() for c in line.split("|")]
            if len(cols) == 5 and cols[0].isdigit():
                start, end = (int(x) for x in cols[3].split("-"))
                m = re.fullmatch(r"(\S+) \((.*)\)", cols[4])
                rows.append(
                    {
                        "id": int(cols[0]),
                        "group": int(cols[1]),
                        "link": 0 if cols[2] == "NONE" else int(cols[2]),
                        "start": start,
                        "end": end,
                        "type": m.group(1),
                        "detail": m.group(2),
                    }
                )
    assert rows, f"no rows parsed from {name}.list"
    return rows


def describe(d):
    """The TYPE column siftool prints for descriptor d."""
    if d.datatype == sif.PARTITION:
        return "FS", f"{sif.FSTYPES[d.fstype]}/{sif.PARTTYPES[d.parttype]}/{d.arch}"
    if d.datatype == 0x4005:
        return "Signature", HASHES[struct.unpack_from("<i", d.extra, 0)[0]]
    if d.datatype == 0x4009:
        return "SBOM", SBOM_FORMATS[struct.unpack_from("<i", d.extra, 0)[0]]
    raise AssertionError(f"unexpected datatype {d.datatype:#x}")


@pytest.mark.parametrize("name", ["one-group.sif", "two-groups-signed-legacy-all.sif", "one-object-sbom.sif"])
def test_descriptors_match_siftool_list(name):
    rows = read_list(name)
    sf = sif.SifFile(os.path.join(TESTDATA, name))
    assert len(sf.descriptors) == len(rows)
    for d, row in zip(sorted(sf.descriptors, key=lambda d: d.id), rows):
        assert d.id == row["id"]
        assert d.groupid & 0xF0000000 == 0xF0000000
        assert d.groupid & 0x0FFFFFFF == row["group"]
        assert d.linkid == row["link"]
        assert d.offset == row["start"]
        assert d.offset + d.size == row["end"]
        assert describe(d) == (row["type"], row["detail"])


def test_header_matches_siftool_header():
    fields = {}
    with open(ONE_GROUP + ".header", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    sf = sif.SifFile(ONE_GROUP)
    assert sf.version == fields["Version"] == "01"
    assert sf.arch == fields["Primary Architecture"] == "386"
    assert sf.dfree == int(fields["Descriptors Free"]) == 46
    assert sf.dtotal == int(fields["Descriptors Total"]) == 48
    assert sf.doffset == int(fields["Descriptors Offset"]) == 4096
    assert sf.dsize == sf.dtotal * sif.DESCRIPTOR.size == 28080
    assert f"{round(sf.dsize / 1024)} KiB" == fields["Descriptors Size"]
    assert sf.data_offset == int(fields["Data Offset"]) == 32176
    assert f"{round(sf.data_size / 1024)} KiB" == fields["Data Size"]
    assert sf.launch == b""  # the library's test images carry no launch script
    assert sf.file_size == os.path.getsize(ONE_GROUP)


def test_struct_sizes():
    assert sif.HEADER.size == 128
    assert sif.DESCRIPTOR.size == 585
    assert detect.SUPERBLOCK.size == 96


def test_one_group_primary_partition():
    sf = sif.SifFile(ONE_GROUP)
    part = sf.primary_partition()
    assert (part.id, part.offset, part.size) == (2, 36864, 4096)
    assert (part.fstype, part.parttype, part.arch) == (sif.FS_SQUASH, sif.PRIMSYS, "386")


def test_one_group_runs_on_amd64_with_warning(opened):
    img = opened(ONE_GROUP)
    assert img.kind == "sif"
    assert img.offset == 36864
    assert img.size == 4096
    assert img.warning and "386" in img.warning and "amd64" in img.warning
    assert isinstance(img.fd, int) and os.fstat(img.fd).st_size == os.path.getsize(ONE_GROUP)
    assert os.pread(img.fd, 4, img.offset) == b"hsqs"
    assert not os.get_inheritable(img.fd)
    img.close()
    assert img.fd is None
    img.close()  # twice is harmless


def test_one_group_not_runnable_on_arm64(monkeypatch):
    monkeypatch.setattr(sif, "host_arch", lambda: "arm64")
    err = image_error(ONE_GROUP)
    assert "386" in err.message and "arm64" in err.message


def test_one_group_no_warning_on_386_host(monkeypatch, opened):
    monkeypatch.setattr(sif, "host_arch", lambda: "386")
    assert opened(ONE_GROUP).warning is None


def test_legacy_fake_squashfs_is_refused():
    sf = sif.SifFile(LEGACY)
    assert sf.data_offset == 32768
    assert sf.launch == LAUNCH
    assert sf.primary_partition().id == 2
    err = image_error(LEGACY)
    assert "holds no squashfs data" in err.message


def test_sbom_only_has_no_partition():
    assert sif.SifFile(SBOM).primary_partition() is None
    err = image_error(SBOM)
    assert "no primary system partition" in err.message
    assert err.hint


# ---------------------------------------------------------------- truncated / bogus files


def truncated_copy(tmp_path, src, length):
    out = tmp_path / f"cut-{length}.sif"
    with open(src, "rb") as f:
        out.write_bytes(f.read(length))
    return out


@pytest.mark.parametrize("length", [100, 127, 5000, 32176, 36865, 38000, 40959])
def test_truncated_sif(tmp_path, length):
    err = image_error(truncated_copy(tmp_path, ONE_GROUP, length))
    assert "truncated" in err.message
    assert str(tmp_path) in err.message


def test_truncated_inside_partition_names_object(tmp_path):
    err = image_error(truncated_copy(tmp_path, ONE_GROUP, 38000))
    assert "object 2" in err.message and "40960" in err.message and "38000" in err.message


def test_truncated_sif_file_direct(tmp_path):
    with pytest.raises(ImageError, match="truncated"):
        sif.SifFile(str(truncated_copy(tmp_path, ONE_GROUP, 100)))


def test_random_bytes_not_an_image(tmp_path):
    rnd = random.Random(1234)
    data = bytes(rnd.getrandbits(8) for _ in range(8192))
    assert data[:4] != b"hsqs" and data[32:42] != b"SIF_MAGIC\0"
    p = tmp_path / "random.img"
    p.write_bytes(data)
    err = image_error(p)
    assert "not a container image" in err.message


@pytest.mark.parametrize("content", [b"", b"x", b"hsq"])
def test_tiny_files_not_an_image(tmp_path, content):
    p = tmp_path / "tiny"
    p.write_bytes(content)
    assert "not a container image" in image_error(p).message


def test_missing_path(tmp_path):
    err = image_error(tmp_path / "nope.sif")
    assert "not found" in err.message and "nope.sif" in err.message


def test_directory_is_sandbox(tmp_path, opened):
    (tmp_path / "rootfs" / "bin").mkdir(parents=True)
    img = opened(tmp_path / "rootfs")
    assert img.kind == "sandbox"
    assert img.path == str(tmp_path / "rootfs")
    assert img.warning is None


def test_sandbox_path_made_absolute(tmp_path, monkeypatch, opened):
    (tmp_path / "rootfs").mkdir()
    monkeypatch.chdir(tmp_path)
    img = opened("rootfs")
    assert img.kind == "sandbox" and img.path == str(tmp_path / "rootfs")


# ---------------------------------------------------------------- squashfs from mksquashfs


@pytest.fixture
def squashfs(tmp_path):
    if shutil.which("mksquashfs") is None:
        pytest.skip("no mksquashfs")
    src = tmp_path / "tree"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hello.txt").write_text("hello\n")
    (src / "bin").mkdir()
    out = tmp_path / "image.sqfs"
    subprocess.run(
        ["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress"], check=True, stdout=subprocess.DEVNULL
    )
    return out


def patch(path, offset, fmt, value):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


# squashfs 4.0 superblock offsets
SB_BLOCK_SIZE, SB_COMPRESSION, SB_BLOCK_LOG, SB_MAJOR, SB_BYTES_USED, SB_INODE_TABLE = 12, 20, 22, 28, 40, 64


def test_squashfs_detected(squashfs, opened):
    img = opened(squashfs)
    assert img.kind == "squashfs"
    assert img.offset == 0
    assert img.size == os.path.getsize(squashfs)
    assert img.warning is None


def test_squashfs_bytes_used_huge(squashfs):
    patch(squashfs, SB_BYTES_USED, "<Q", 1 << 40)
    assert "truncated" in image_error(squashfs).message


def test_squashfs_version_3(squashfs):
    patch(squashfs, SB_MAJOR, "<H", 3)
    err = image_error(squashfs)
    assert "version 3" in err.message


def test_squashfs_bad_block_size(squashfs):
    patch(squashfs, SB_BLOCK_SIZE, "<I", 12345)
    assert "corrupt" in image_error(squashfs).message


def test_squashfs_bad_compression(squashfs):
    patch(squashfs, SB_COMPRESSION, "<H", 99)
    assert "corrupt" in image_error(squashfs).message


def test_squashfs_table_outside(squashfs):
    patch(squashfs, SB_INODE_TABLE, "<Q", 1 << 30)
    assert "tables outside" in image_error(squashfs).message


def test_squashfs_truncated_file(squashfs, tmp_path):
    # a bigger image, so that cutting it loses real data
    src = tmp_path / "big"
    src.mkdir()
    rnd = random.Random(5)
    (src / "blob").write_bytes(bytes(rnd.getrandbits(8) for _ in range(200_000)))
    big = tmp_path / "big.sqfs"
    subprocess.run(
        ["mksquashfs", str(src), str(big), "-noappend", "-quiet", "-no-progress"], check=True, stdout=subprocess.DEVNULL
    )
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])
    assert "truncated" in image_error(big).message


def test_squashfs_cut_inside_superblock(squashfs):
    squashfs.write_bytes(squashfs.read_bytes()[:50])
    assert "truncated" in image_error(squashfs).message


# ---------------------------------------------------------------- synthetic SIF files

LAUNCH = b"#!/usr/bin/env run-singularity\n"


def build_sif(path, objects, arch=b"02"):
    """objects: list of dicts with datatype, data, and for partitions fstype/parttype/arch.
    Lays the file out as SIF.md says: 48 descriptors at 4096, partitions 4096-aligned."""
    total, doffset = 48, 4096
    data_offset = doffset + total * sif.DESCRIPTOR.size
    end = data_offset
    descs, blobs = [], []
    for i, obj in enumerate(objects):
        align = 4096 if obj["datatype"] == sif.PARTITION else 1
        off = (end + align - 1) // align * align
        data = obj["data"]
        if obj["datatype"] == sif.PARTITION:
            extra = struct.pack("<ii3s", obj["fstype"], obj["parttype"], obj.get("arch", b"02") + b"\0")
        else:
            extra = b""
        size = obj.get("size", len(data))
        descs.append(
            sif.DESCRIPTOR.pack(
                obj["datatype"],
                True,
                i + 1,
                0xF0000000 | 1,
                0,
                off,
                size,
                off - end + size,
                0,
                0,
                0,
                0,
                obj.get("name", b""),
                extra,
            )
        )
        blobs.append((off, data))
        end = off + len(data)
    header = sif.HEADER.pack(
        LAUNCH,
        sif.MAGIC,
        b"01\0",
        arch + b"\0",
        b"\0" * 16,
        0,
        0,
        total - len(objects),
        total,
        doffset,
        total * sif.DESCRIPTOR.size,
        data_offset,
        end - data_offset,
    )
    buf = bytearray(max(end, data_offset))
    buf[:128] = header
    for i, d in enumerate(descs):
        buf[doffset + i * 585 : doffset + (i + 1) * 585] = d
    for off, data in blobs:
        buf[off : off + len(data)] = data
    path.write_bytes(bytes(buf))
    return path


def partition(data, fstype=1, parttype=sif.PRIMSYS, arch=b"02", **kw):
    return dict(datatype=sif.PARTITION, data=data, fstype=fstype, parttype=parttype, arch=arch, **kw)


def test_synthetic_sif_with_real_squashfs(tmp_path, squashfs, opened):
    data = squashfs.read_bytes()
    p = build_sif(tmp_path / "ok.sif", [dict(datatype=0x4001, data=b"Bootstrap: scratch\n"), partition(data)])
    sf = sif.SifFile(str(p))
    assert [d.datatype for d in sf.descriptors] == [0x4001, sif.PARTITION]
    img = opened(p)
    assert img.kind == "sif"
    assert img.offset % 4096 == 0 and img.offset >= 32176
    assert img.size == len(data)
    assert img.warning is None  # amd64 image on an amd64 host


def test_synthetic_sif_unknown_arch_runs_without_warning(tmp_path, squashfs, opened):
    p = build_sif(tmp_path / "u.sif", [partition(squashfs.read_bytes(), arch=b"00")])
    assert opened(p).warning is None


def test_synthetic_sif_foreign_arch_refused(tmp_path, squashfs):
    p = build_sif(tmp_path / "s390x.sif", [partition(squashfs.read_bytes(), arch=b"11")])
    err = image_error(p)
    assert "s390x" in err.message and "amd64" in err.message


def test_synthetic_sif_ext3_primary(tmp_path):
    p = build_sif(tmp_path / "ext3.sif", [partition(b"\0" * 8192, fstype=2)])
    err = image_error(p)
    assert "Ext3" in err.message and "squashfs" in err.message
    assert "rebuild" in err.hint


@pytest.mark.parametrize("fstype,label", [(5, "Encrypted squashfs"), (6, "Gocryptfs squashfs")])
def test_synthetic_sif_encrypted_primary(tmp_path, squashfs, fstype, label):
    # even with squashfs bytes inside, an encrypted partition is refused by its type
    p = build_sif(tmp_path / "enc.sif", [partition(squashfs.read_bytes(), fstype=fstype)])
    err = image_error(p)
    assert label in err.message
    assert "encrypted" in err.hint


def test_synthetic_sif_unknown_fstype(tmp_path):
    p = build_sif(tmp_path / "odd.sif", [partition(b"hsqs" + b"\0" * 100, fstype=42)])
    assert "type 42" in image_error(p).message


def test_synthetic_sif_two_primary_partitions(tmp_path, squashfs):
    data = squashfs.read_bytes()
    p = build_sif(tmp_path / "two.sif", [partition(data), partition(data)])
    assert "two primary" in image_error(p).message


def test_synthetic_sif_only_non_primary_partitions(tmp_path, squashfs):
    p = build_sif(tmp_path / "data.sif", [partition(squashfs.read_bytes(), parttype=3)])
    assert "no primary system partition" in image_error(p).message


def test_synthetic_sif_partition_smaller_than_squashfs(tmp_path, squashfs):
    data = squashfs.read_bytes()
    used = struct.unpack_from("<Q", data, SB_BYTES_USED)[0]
    p = build_sif(tmp_path / "short.sif", [partition(data, size=used - 1)])
    assert "truncated" in image_error(p).message


def test_synthetic_sif_skips_unused_slots(tmp_path, squashfs, opened):
    p = build_sif(tmp_path / "gap.sif", [dict(datatype=0x4001, data=b"x"), partition(squashfs.read_bytes())])
    raw = bytearray(p.read_bytes())
    raw[4096 + 4] = 0  # slot 0 unused: a gap before the partition's slot
    p.write_bytes(bytes(raw))
    sf = sif.SifFile(str(p))
    assert [d.id for d in sf.descriptors] == [2]
    assert opened(p).kind == "sif"


def test_synthetic_sif_object_past_end(tmp_path):
    p = build_sif(tmp_path / "past.sif", [partition(b"hsqs", size=1 << 20)])
    err = image_error(p)
    assert "truncated" in err.message and "object 1" in err.message


def test_sif_bad_version(tmp_path):
    p = build_sif(tmp_path / "v2.sif", [partition(b"hsqs")])
    raw = bytearray(p.read_bytes())
    raw[42:45] = b"02\0"
    p.write_bytes(bytes(raw))
    assert "version" in image_error(p).message


def test_sif_descriptor_table_outside_file(tmp_path):
    p = build_sif(tmp_path / "dt.sif", [partition(b"hsqs")])
    raw = bytearray(p.read_bytes())
    struct.pack_into("<q", raw, 0x58, 100000)  # descriptors total: far past the end
    p.write_bytes(bytes(raw))
    assert "descriptor table" in image_error(p).message
