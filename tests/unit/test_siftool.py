"""`hpcrun sif list|header|info|dump` print exactly what Apptainer's siftool prints."""

import os
import struct

import pytest

from hpcrun.errors import ImageError
from hpcrun.images import sif, siftool
from hpcrun.cli import main

from .testdata import SIF_DATA

DATA = SIF_DATA
NAMES = ["one-group", "two-groups-signed-legacy-all", "one-object-sbom"]


def expected(name, kind):
    with open(os.path.join(DATA, f"{name}.sif.{kind}")) as f:
        return f.read()


@pytest.mark.parametrize("name", NAMES)
def test_list_matches_siftool(name):
    assert siftool.list_text(sif.SifFile(os.path.join(DATA, f"{name}.sif"))) == expected(name, "list")


def test_header_matches_siftool():
    assert siftool.header_text(sif.SifFile(os.path.join(DATA, "one-group.sif"))) == expected("one-group", "header")


def test_legacy_header_shows_id_and_times():
    text = siftool.header_text(sif.SifFile(os.path.join(DATA, "two-groups-signed-legacy-all.sif")))
    assert "ID:                   0b19ec2c-0b08-46c9-95ae-fa88cd9e48a1\n" in text
    assert "Created At:           2020-05-22 19:30:59 +0000 UTC\n" in text
    assert text.startswith("Launch Script:        #!/usr/bin/env run-singularity\n")


def test_cli_list_and_json(capsys):
    path = os.path.join(DATA, "two-groups-signed-legacy-all.sif")
    assert main(["sif", "list", path]) == 0
    assert capsys.readouterr().out == expected("two-groups-signed-legacy-all", "list")
    assert main(["sif", "list", "--json", path]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [r["type"] for r in rows][-1] == "Signature (SHA-384)" and rows[3]["link"] == 1


def test_cli_rejects_non_sif(tmp_path, capsys):
    p = tmp_path / "x"
    p.write_bytes(b"x" * 200)
    assert main(["sif", "header", str(p)]) == 252
    assert "not a SIF file" in capsys.readouterr().err


def test_written_sif_round_trip(tmp_path):
    """A SIF hpcrun writes: 48 descriptors at 4096, partition 4096-aligned, squashfs
    listable by `unsquashfs -o OFFSET -l`, and `sif list` describes it."""
    import subprocess

    src = tmp_path / "tree"
    src.mkdir()
    (src / "hello.txt").write_text("hi")
    sq = tmp_path / "t.sqfs"
    subprocess.run(["mksquashfs", str(src), str(sq), "-quiet", "-no-progress", "-all-root"], check=True)
    out = str(tmp_path / "t.sif")
    sif.write_sif(out, str(sq), arch="amd64", now=1700000000)
    f = sif.SifFile(out)
    assert (f.doffset, f.dtotal, f.dfree, f.data_offset) == (4096, 48, 47, 32176)
    part = f.primary_partition()
    assert part.offset == 32768 and part.size == os.path.getsize(sq)
    listing = subprocess.run(
        ["unsquashfs", "-o", str(part.offset), "-l", out], capture_output=True, text=True, check=True
    ).stdout
    assert "squashfs-root/hello.txt" in listing
    assert siftool.list_text(f).splitlines()[3] == (
        f"1    |1       |NONE    |{'32768-%d' % (32768 + part.size):<26}|FS (Squashfs/*System/amd64)"
    )


# --- siftool's rules, on Apptainer's wider test set (tests/data/sif, goldens from apptainer/sif) ---

LOCAL = os.path.join(os.path.dirname(__file__), "..", "data", "sif")
GOLDEN = sorted(
    (os.path.join(d, n), kind)
    for d in (LOCAL, DATA)
    for n in os.listdir(d)
    for kind in ("list", "header", "info1")
    if n.endswith(".sif") and os.path.exists(os.path.join(d, f"{n}.{kind}"))
)
RENDER = {
    "list": siftool.list_text,
    "header": siftool.header_text,
    "info1": lambda f: siftool.info_text(f, 1),
}


@pytest.mark.parametrize("path,kind", GOLDEN, ids=[f"{os.path.basename(p)}-{k}" for p, k in GOLDEN])
def test_matches_siftool_golden(path, kind):
    """siftool's TestApp_List/Header/Info goldens: 'Created At', no 'Primary Architecture'
    when unknown, '1   (G)' group links, OpenPGP/Clear Signature, OCI digests, names."""
    with open(f"{path}.{kind}", "rb") as g:
        assert siftool.to_bytes(RENDER[kind](sif.SifFile(path))) == g.read()
    assert len(GOLDEN) >= 29  # the goldens are found: 25 here, 4 in shared


def test_info_signature_entity():
    """As siftool's DataSignature golden (same key): hash type, then the fingerprint in hex."""
    f = sif.SifFile(os.path.join(LOCAL, "one-group-signed-pgp.sif"))
    assert siftool.info_text(f, 3) == (
        "  Data Type:  Signature\n  ID:         3\n  Group ID:   NONE\n  Linked ID:  1 (G)\n"
        "  Offset:     40960\n  Size:       1048\n  Hash Type:  SHA-256\n"
        "  Entity:     12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84\n"
    )


def _desc(oid, datatype=0x4007, group=0xF0000001, link=0, offset=32176, size=0, extra=b"", name=b"", used=True):
    t = siftool.GO_ZERO_TIME
    return sif.DESCRIPTOR.pack(datatype, used, oid, group, link, offset, size, size, t, t, 0, 0, name, extra)


def make_sif(tmp_path, descs=(), launch=b"", arch=b"00\0", ctime=siftool.GO_ZERO_TIME, dsize=None, dfree=None):
    """A SIF as pkg/sif lays it out (48 descriptors at 4096, data at 32176), objects given raw."""
    total, table = 48, b"".join(descs)
    dfree = total - len(descs) if dfree is None else dfree
    head = sif.HEADER.pack(
        launch, sif.MAGIC, b"01\0", arch, bytes(16), ctime, ctime, dfree, total, 4096,
        total * sif.DESCRIPTOR.size if dsize is None else dsize, 32176, 2560,
    )  # fmt: skip
    p = tmp_path / "t.sif"
    p.write_bytes(head.ljust(4096, b"\0") + table.ljust(total * sif.DESCRIPTOR.size, b"\0") + b"0123456789" * 300)
    return sif.SifFile(str(p))


def rows(f):
    return siftool.list_text(f).splitlines()[3:]


def test_list_table_order_go_columns_and_links(tmp_path):
    """Table order (not sorted); Go's '%-4d ' and '%-26s ' grow past their width; a link
    is a group link only with all four mask bits, its ID is shown masked."""
    descs = [
        _desc(12345, link=0x10000002, offset=1234567890123, size=1),  # beyond any small file: no SifFile
        _desc(2, group=0xF0000000, link=0xF0000000),
        _desc(3, datatype=0x4999, link=0xF0000007),
    ]

    class Table:
        descriptors = [sif.Descriptor(sif.DESCRIPTOR.unpack(d)) for d in descs]

    assert rows(Table) == [
        "12345 |1       |2       |1234567890123-1234567890124  |Generic/Raw",
        "2    |NONE    |NONE    |32176-32176               |Generic/Raw",
        "3    |1       |7   (G) |32176-32176               |Unknown",
    ]


def test_list_unknown_partition_metadata_and_hash(tmp_path):
    """Unknown FS/partition types are 'Unknown', an arch code without its NUL is
    'unknown'; a signature with a hash siftool does not know shows its bare type."""
    part = struct.pack("<ii3s", 9, 9, b"02x")
    sig = struct.pack("<i", 77)
    f = make_sif(tmp_path, [_desc(1, datatype=0x4004, extra=part), _desc(2, datatype=0x4005, extra=sig)])
    assert [r.split("|")[-1] for r in rows(f)] == ["FS (Unknown/Unknown/unknown)", "Signature"]
    with pytest.raises(ImageError, match="hash algorithm unsupported"):
        siftool.info_text(f, 2)


def test_header_rules(tmp_path):
    """No 'Primary Architecture' line when unknown; one trailing newline trimmed from the
    launch script (a second ends the tabwriter block); Go's rounding of sizes; Go's years."""
    f = make_sif(tmp_path, launch=b"#!/bin/sh\n\n", ctime=253402300800, dsize=-2048)
    assert siftool.header_text(f) == (
        "Launch Script: #!/bin/sh\n"
        "\n"
        "Version:            01\n"
        "Created At:         10000-01-01 00:00:00 +0000 UTC\n"
        "Modified At:        10000-01-01 00:00:00 +0000 UTC\n"
        "Descriptors Free:   48\n"
        "Descriptors Total:  48\n"
        "Descriptors Offset: 4096\n"
        "Descriptors Size:   -2 KiB\n"
        "Data Offset:        32176\n"
        "Data Size:          3 KiB\n"
    )


@pytest.mark.parametrize(
    "t,text",
    [
        (0, "1970-01-01 00:00:00 +0000 UTC"),
        (-62135596801, "0000-12-31 23:59:59 +0000 UTC"),
        (-62198755200, "-0001-01-01 00:00:00 +0000 UTC"),
        (2**63 - 1, "292277026596-12-04 15:30:07 +0000 UTC"),
    ],
)
def test_go_time(t, text):
    assert siftool.go_time(t) == text


@pytest.mark.parametrize(
    "n,text",
    [(1023, "1023 B"), (-1023, "-1023 B"), (1536, "2 KiB"), (2560, "3 KiB"), (2047, "2 KiB"), (1 << 60, "1 EiB")],
)
def test_readable_size(n, text):
    """siftool's Test_readableSize cases and math.Round's half away from zero."""
    assert siftool.readable_size(n) == text


def test_info_raw_name_with_tab_and_bad_utf8(tmp_path, capsysbinary):
    """The name is printed as its bytes; a tab in it makes a cell of its own, as in Go."""
    f = make_sif(tmp_path, [_desc(1, datatype=0x4006, size=2, name=b"a\tb\xff\xfe")])
    text = siftool.info_text(f, 1)
    assert text.splitlines()[-1] == "  Name:       a  " + siftool.raw_text(b"b\xff\xfe")
    assert main(["sif", "info", "1", f.path]) == 0
    assert capsysbinary.readouterr().out.endswith(b"Name:       a  b\xff\xfe\n")


def test_tabwriter_escape_and_formfeed():
    """0xff...0xff is one cell whatever it holds (tabs too), its width without the 0xffs;
    a formfeed ends the block."""
    esc = siftool.ESCAPE
    assert siftool.tabwrite(f"a:\tx\n{esc}b\tc{esc}:\ty\n", 1) == f"a:   x\n{esc}b\tc{esc}: y\n"
    assert siftool.tabwrite("a:\tx\fbbbb:\ty\n", 1) == "a: x\nbbbb: y\n"


def test_info_bad_oci_digest(tmp_path):
    f = make_sif(tmp_path, [_desc(1, datatype=0x400B, extra=b"sha256:abc")])
    with pytest.raises(ImageError, match="OCI digest"):
        siftool.info_text(f, 1)


def test_find_object_errors_in_siftool_order(tmp_path):
    f = make_sif(tmp_path, [_desc(1, used=False)], dfree=48)
    with pytest.raises(ImageError, match="no objects in image"):
        siftool.info_text(f, 0)
    f = make_sif(tmp_path, [_desc(1), _desc(1)])
    with pytest.raises(ImageError, match="invalid object ID 0"):
        siftool.info_text(f, 0)
    with pytest.raises(ImageError, match="multiple objects"):
        siftool.info_text(f, 1)
    with pytest.raises(ImageError, match="object 2 not found"):
        siftool.info_text(f, 2)


@pytest.mark.parametrize("text", ["+1", "1_0", "0x1", " 1", "\uff11", "4294967296", ""])
def test_cli_id_must_be_decimal_uint32(text, capsys):
    """strconv.ParseUint(id, 10, 32), as siftool parses it."""
    assert main(["sif", "info", text, os.path.join(DATA, "one-group.sif")]) == 2
    err = capsys.readouterr().err
    assert "invalid object ID" in err


def test_cli_dump_writes_object_bytes(capsysbinary):
    """siftool's TestApp_Dump/Two: object 2 of one-group.sif is its squashfs partition."""
    assert main(["sif", "dump", "02", os.path.join(DATA, "one-group.sif")]) == 0
    out = capsysbinary.readouterr().out
    assert len(out) == 4096 and out.startswith(b"hsqs") and b"Hello from Sylabs!" in out


def test_dump_to_closed_pipe(tmp_path):
    """A reader that went away ends the dump quietly (141, as SIGPIPE), no traceback."""
    f = make_sif(tmp_path, [_desc(1, offset=32176, size=3000)])
    r, w = os.pipe()
    os.close(r)
    with open(w, "wb") as out:
        assert siftool.dump(f.path, 1, out) == 141
