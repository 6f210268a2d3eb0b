"""Apptainer's cache tables, ported: e2e/cmdenvvars/cmdenvvars.go (apptainer/apptainer) —
testApptainerCacheDir, testApptainerDisableCache, testApptainerReadOnlyCacheDir — on a pull
from the loopback registry (docker:// instead of Apptainer's oras:// test image)."""

import os
import shutil

import pytest
from hpcrun_testlib import WORK, hpcrun, user
from test_pull import registry  # noqa: F401  (a loopback registry with test/busybox:v1)


@pytest.fixture
def cachedir():
    path = os.path.join(WORK, "cache", "e2e-cachedir")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.chown(path, user().pw_uid, user().pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pull(registry, bdir, env):  # noqa: F811
    r = hpcrun("pull", str(bdir / "testImg.sif"), f"docker://{registry}/test/busybox:v1", env=env)
    assert r.returncode == 0, r.stderr
    assert hpcrun("exec", str(bdir / "testImg.sif"), "true").returncode == 0
    return r


def test_testApptainerCacheDir(registry, bdir, cachedir):  # noqa: F811
    pull(registry, bdir, {"APPTAINER_CACHEDIR": cachedir})
    assert os.listdir(os.path.join(cachedir, "hpcrun", "blobs", "sha256"))


@pytest.mark.parametrize("how", ["env", "flag"])
def test_testApptainerDisableCache(registry, bdir, cachedir, how):  # noqa: F811
    env = {"APPTAINER_CACHEDIR": cachedir}
    if how == "env":
        env["APPTAINER_DISABLE_CACHE"] = "1"
        pull(registry, bdir, env)
    else:
        r = hpcrun("pull", "--disable-cache", str(bdir / "x.sif"), f"docker://{registry}/test/busybox:v1", env=env)
        assert r.returncode == 0, r.stderr
    assert os.listdir(cachedir) == []  # the cache has not been created
    assert not [n for n in os.listdir(bdir) if n.startswith(".")], os.listdir(bdir)  # nor left a work dir


def test_testApptainerReadOnlyCacheDir(registry, bdir, cachedir):  # noqa: F811
    os.chmod(cachedir, 0o555)  # a read-only home, as grid sites share them
    r = pull(registry, bdir, {"APPTAINER_CACHEDIR": cachedir})
    os.chmod(cachedir, 0o755)
    assert os.listdir(cachedir) == [], r.stderr
