"""`hpcrun sif list|header` print exactly what Apptainer's siftool prints."""

import os

import pytest

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
    assert "Created:              2020-05-22 19:30:59 +0000 UTC\n" in text
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
