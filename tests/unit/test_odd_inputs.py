"""Odd inputs, the pure parts: passwd/group lines from hostile names, bind destinations
the kernel cannot name, SIF times out of range, the config cache key, FIFOs as images."""

import os
import shutil
import signal
import struct

import pytest
import yaml

from hpcrun import config, options
from hpcrun.errors import BIND, IMAGE, BindError, ImageError
from hpcrun.images import detect, sif, siftool
from hpcrun import plan as planmod
from hpcrun.plan import Host, build_plan

from .testdata import SIF_DATA

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "hpcrun.yaml")
DATA = SIF_DATA
EVIL = "x\nroot2:x:0:0::/:/bin/sh"


@pytest.fixture
def cfg():
    with open(CONF, encoding="utf-8") as f:
        return yaml.safe_load(f)


def make_plan(cfg, user="u", group="users", home="/home/u", gecos="U Ser", shell="/bin/bash", **opts):
    o = options.defaults()
    o.update(opts)
    h = Host(1000, 100, user, group, home, "/data/proj", gecos=gecos, shell=shell, env={"HOME": home, "USER": user})
    return build_plan(o, "exec", "/images/app.sif", "sif", ["true"], cfg, h)


def test_identity_lines_plain():
    assert planmod.identity_lines("u", 1000, 100, "users", "U Ser", "/home/u", "/bin/bash") == (
        "u:x:1000:100:U Ser:/home/u:/bin/bash",
        "users:x:100:u",
    )


@pytest.mark.parametrize("field", ["user", "home", "shell"])
@pytest.mark.parametrize("bad", [EVIL, "a:b", "a\rb", "a\0b"])
def test_identity_line_dropped_for_a_bad_field(field, bad):
    kw = {
        "user": "u",
        "uid": 1000,
        "gid": 100,
        "group": "users",
        "gecos": "",
        "home": "/h",
        "shell": "/bin/sh",
        field: bad,
    }
    passwd, group = planmod.identity_lines(**kw)
    assert passwd is None
    assert group == ("users:x:100:" if field == "user" else "users:x:100:u")


@pytest.mark.parametrize("name", ["+", "-x", "+x", "a,b", ""])
def test_names_nsswitch_would_misread(name):
    assert planmod.identity_lines(name, 1, 1, "g", "", "/", "/bin/sh")[0] is None
    assert planmod.identity_lines("u", 1, 1, name, "", "/", "/bin/sh")[1] is None


def test_bad_group_drops_only_the_group_line():
    passwd, group = planmod.identity_lines("u", 1, 1, EVIL, "", "/", "/bin/sh")
    assert passwd == "u:x:1:1::/:/bin/sh" and group is None


def test_gecos_loses_separators_and_control_characters():
    passwd, _ = planmod.identity_lines("u", 1, 1, "g", "A:B\nroot2:x:0:0\x7f", "/", "/bin/sh")
    assert passwd == "u:x:1:1:A B root2 x 0 0 :/:/bin/sh"


def test_plan_uses_identity_lines(cfg):
    p = make_plan(cfg, user=EVIL)
    assert p.passwd_line is None and p.group_line == "users:x:100:"
    p = make_plan(cfg, home="/home/u\nroot2:x:0:0::/:/bin/sh", no_home=True)
    assert p.passwd_line is None
    p = make_plan(cfg, gecos="a\nb")
    assert p.passwd_line == "u:x:1000:100:a b:/home/u:/bin/bash"
    assert make_plan(cfg, group=EVIL).group_line is None


@pytest.mark.parametrize(
    "dst,word", [("/" + "a" * 256, "255"), ("/x/" + "b" * 300 + "/y", "255"), ("/aaaaaaaa" * 512, "4095")]
)
def test_bind_destination_too_long(cfg, dst, word):
    with pytest.raises(BindError) as e:
        make_plan(cfg, bind=[f"/tmp:{dst}"])
    assert e.value.code == BIND and word in e.value.message and len(e.value.line()) < 300
    fine = ("/" + "a" * 255) * 15  # 3840 bytes, names of 255: at the limits
    assert make_plan(cfg, bind=[f"/tmp:{fine}"]).mounts[-1].dst == fine


def test_home_destination_too_long(cfg):
    with pytest.raises(BindError):
        make_plan(cfg, home="/tmp:/" + "h" * 300)


def test_bind_destination_length_in_bytes(cfg):
    with pytest.raises(BindError):
        make_plan(cfg, bind=["/tmp:/" + "é" * 128])  # 128 characters, 256 bytes


def crafted_sif(tmp_path, header=None, descriptor=None):
    """A copy of one-group.sif with header fields or its first used descriptor's times set."""
    src = os.path.join(DATA, "one-group.sif")
    out = str(tmp_path / "t.sif")
    shutil.copyfile(src, out)  # not its mode: shared/ is read-only
    with open(out, "r+b") as f:
        if header is not None:  # ctime, mtime at 0x40, 0x48
            f.seek(0x40)
            f.write(struct.pack("<qq", header, header))
        if descriptor is not None:
            doffset = struct.unpack_from("<q", open(src, "rb").read(0x68), 0x60)[0]
            f.seek(doffset + 41)  # ctime, mtime of the first descriptor
            f.write(struct.pack("<qq", descriptor, descriptor))
    return out


@pytest.mark.parametrize("t", [2**62, -(2**62), 2**63 - 1, -(2**63), 253402300800])
def test_sif_times_out_of_range(tmp_path, t):
    """Printed as Go prints them (years past 9999, Go's int64 wrap); descriptor times break nothing."""
    f = sif.SifFile(crafted_sif(tmp_path, header=t, descriptor=t))
    text = siftool.header_text(f)
    assert f"Created At:           {siftool.go_time(t)}\n" in text
    assert siftool.header_dict(f)["Modified At"] == siftool.go_time(t)
    assert f.descriptors[0].ctime == t
    assert siftool.list_text(f) == siftool.list_text(sif.SifFile(os.path.join(DATA, "one-group.sif")))
    assert siftool.list_rows(f)
    text = siftool.header_text(sif.SifFile(crafted_sif(tmp_path, header=0)))
    assert "Created At:           1970-01-01 00:00:00 +0000 UTC\n" in text


@pytest.fixture
def no_hang():
    """A blocking open() of a FIFO fails the test after 5 s instead of hanging it."""

    def hung(*_):
        raise AssertionError("blocked: the FIFO was opened")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("opener", [detect.open_image, lambda p: sif.SifFile(p)])
def test_fifo_is_refused_without_opening(tmp_path, opener, no_hang):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as e:  # a blocking open would hang here
        opener(fifo)
    assert e.value.code == IMAGE and "is a FIFO" in e.value.message


def test_sif_of_a_directory(tmp_path):
    with pytest.raises(ImageError) as e:
        sif.SifFile(str(tmp_path))
    assert "is a directory" in e.value.message


def test_device_is_refused(tmp_path):
    with pytest.raises(ImageError) as e:
        detect.open_image("/dev/zero")
    assert "character device" in e.value.message


def test_swapped_to_a_fifo_after_stat(tmp_path, monkeypatch, no_hang):
    """The path passes stat as a regular file, then is a FIFO when opened: the
    non-blocking open returns at once and fstat refuses it."""
    path = str(tmp_path / "img")
    open(path, "wb").close()
    real_open = os.open

    def swap(p, flags, *a, **kw):
        if p == path:
            os.unlink(path)
            os.mkfifo(path)
            assert flags & os.O_NONBLOCK and flags & os.O_NOCTTY
        return real_open(p, flags, *a, **kw)

    monkeypatch.setattr(detect.os, "open", swap)
    with pytest.raises(ImageError) as e:
        detect.open_image(path)
    assert "is a FIFO" in e.value.message


@pytest.fixture
def cenv(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "SITE", str(tmp_path / "etc" / "hpcrun.yaml"))
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HPCRUN_CONFIG": str(tmp_path / "c.yaml"),
    }


def _same_size_same_mtime(path, text, replace):
    st = os.stat(path)
    if replace:  # a new file renamed over the old one: another inode
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)
    else:  # rewritten in place
        with open(path, "w") as f:
            f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = os.stat(path)
    assert (new.st_size, new.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return st


@pytest.mark.parametrize("replace", [True, False])
def test_config_cache_sees_same_size_same_mtime_rewrite(cenv, replace):
    path = cenv["HPCRUN_CONFIG"]
    with open(path, "w") as f:
        f.write("tmpfs_size: 11m\n")
    assert config.load(cenv)["tmpfs_size"] == "11m"
    old = _same_size_same_mtime(path, "tmpfs_size: 22m\n", replace)
    while not replace and os.stat(path).st_ctime_ns == old.st_ctime_ns:
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # a coarse clock: the same tick
    assert config.load(cenv)["tmpfs_size"] == "22m"
