"""Bad input: a documented exit code, one line on stderr, no traceback, nothing left."""

import os
import shutil

import pytest

from hpcrun_testlib import TESTDATA, WORK, hpcrun

IMAGE, BIND, USAGE, CONFIG = 252, 253, 2, 251


def one_line(r, code, *words):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def bad_file(name, data):
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)
    return path


def test_missing_image(images):
    one_line(hpcrun("exec", "/nonexistent.sif", "true"), IMAGE, "not found", "/nonexistent.sif")


def test_not_an_image(images):
    one_line(hpcrun("exec", bad_file("text.sif", b"hello world\n" * 100), "true"), IMAGE, "not a container image")


def test_truncated_sif(images):
    with open(images["sif"], "rb") as f:
        data = f.read()
    one_line(hpcrun("exec", bad_file("trunc1.sif", data[:100]), "true"), IMAGE, "truncated")
    one_line(hpcrun("exec", bad_file("trunc2.sif", data[: len(data) // 2]), "true"), IMAGE, "truncated")


def test_corrupt_squashfs(images):
    with open(images["squashfs"], "rb") as f:
        data = bytearray(f.read())
    data[96 : len(data) - 4096] = b"\xa5" * (len(data) - 4096 - 96)  # keep the superblock
    one_line(hpcrun("exec", bad_file("corrupt.sqfs", bytes(data)), "true"), IMAGE, "corrupt.sqfs")
    data = bytearray(data[:4096])
    one_line(hpcrun("exec", bad_file("short.sqfs", bytes(data)), "true"), IMAGE, "truncated")


@pytest.mark.parametrize(
    "name,word",
    [("one-object-sbom.sif", "no primary system partition"), ("two-groups-signed-legacy-all.sif", "no squashfs data")],
)
def test_sif_without_runnable_partition(images, name, word):
    dst = os.path.join(WORK, name)
    shutil.copy(os.path.join(TESTDATA, name), dst)
    os.chmod(dst, 0o644)
    one_line(hpcrun("exec", dst, "true"), IMAGE, word)


def test_bind_errors(images):
    one_line(hpcrun("exec", "-B", "/nonexistent-src:/x", images["sif"], "true"), BIND, "/nonexistent-src")
    one_line(hpcrun("exec", "-B", "/tmp:relative", images["sif"], "true"), USAGE, "relative")
    one_line(hpcrun("exec", "-B", "/tmp:/x:rx", images["sif"], "true"), USAGE, "bind option")
    one_line(hpcrun("exec", "-B", ":/x", images["sif"], "true"), USAGE, "malformed")


def test_unknown_flag(images):
    r = hpcrun("exec", "--no-such-flag", images["sif"], "true")
    assert r.returncode == USAGE and "Traceback" not in r.stderr and "--no-such-flag" in r.stderr


def test_command_not_found(images):
    one_line(hpcrun("exec", images["plain"], "no-such-command"), 127, "no-such-command")


def test_malformed_config(images, utmp):
    conf = utmp / "bad.yaml"
    conf.write_text("scratch: [unclosed\n")
    os.chmod(utmp, 0o755)
    one_line(hpcrun("exec", images["sif"], "true", env={"HPCRUN_CONFIG": str(conf)}), CONFIG, str(conf), "malformed")
    conf.write_text("no_such_key: 1\n")
    one_line(hpcrun("exec", images["sif"], "true", env={"HPCRUN_CONFIG": str(conf)}), CONFIG, "no_such_key")


def test_debug_shows_traceback(images):
    r = hpcrun("--debug", "exec", "/nonexistent.sif", "true")
    assert r.returncode == IMAGE and "Traceback" in r.stderr
