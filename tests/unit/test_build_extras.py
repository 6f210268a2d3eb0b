"""Definition file headers for Bootstrap: debootstrap, layer owners bookkeeping, sandbox
directory modes (no privilege needed)."""

import io
import os
import stat
import tarfile

import pytest

from hpcrun import inroot, trees
from hpcrun.builders import deffile, layers
from hpcrun.errors import UsageError


def test_debootstrap_headers_and_build_args():
    d = deffile.parse(
        "Bootstrap: debootstrap\nOSVersion: bookworm\nInclude: python3 {{ X }}\n%arguments\nX=\n",
        "d.def",
        ["X=gcc,make"],
    )
    assert d.header["osversion"] == "bookworm" and d.header["include"] == "python3 gcc,make"
    assert "mirrorurl" not in d.header  # the builder defaults to deb.debian.org
    with pytest.raises(UsageError, match="OSVersion"):
        deffile.parse("Bootstrap: debootstrap\nMirrorURL: http://deb.debian.org/debian\n", "d.def")


def _tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, uid, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.uid, ti.gid, ti.size, ti.mode = uid, uid, 1, mode
            tar.addfile(ti, io.BytesIO(b"x"))
    buf.seek(0)
    return tarfile.open(fileobj=buf)


def test_unprivileged_unpack_reports_lost_owners_and_drops_setuid(tmp_path):
    skipped, lost = [], []
    with inroot.Root(str(tmp_path)) as root:
        layers.apply(_tar([("root-file", 0, 0o644), ("d/user-file", 5, 0o4755)]), root, "t", skipped, False, lost)
    assert lost == ["d/user-file"] and skipped == []
    assert stat.S_IMODE(os.stat(tmp_path / "d/user-file").st_mode) == 0o755


def test_sandbox_dirs_get_owner_rwx_and_keep_other_bits(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    os.chmod(tmp_path / "a/b", 0o055)
    os.chmod(tmp_path / "a", 0o005)
    trees.make_removable(str(tmp_path), keep_modes=True)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o705
    assert stat.S_IMODE(os.stat(tmp_path / "a/b").st_mode) == 0o755
