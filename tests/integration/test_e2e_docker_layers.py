"""Apptainer's docker layer tables, ported: e2e/docker/docker.go (testDockerAUFS,
testDockerPermissions, testDockerWhiteoutSymlink, testDockerLabels, testDockerDefFile,
testDockerRegistry, testDockerCMDQuotes) and e2e/docker/regressions.go (issue4524, issue4943,
issue5172, issue274, issue1704). Apptainer pulls ghcr.io/apptainer/{aufs-sanity,userperms,
linkwh,labels,issue233,issue4524,...}; here each is an OCI image the test writes (layers with
the whiteouts, modes and labels those images carry) and pushes with skopeo to a
docker-registry on loopback. Apptainer's failures exit 255; hpcrun's say which failure
(README's exit-code table): a missing image is 252."""

import gzip
import io
import json
import os
import subprocess
import tarfile

import pytest

from hpcrun_testlib import HPCRUN, WORK, hpcrun
from test_build import _base_layer, _blob, write_oci_index
from test_pull import start_registry


def tar_layer(entries):
    """entries: (name, kind, mode, data) with kind file|dir|symlink -> gzip'd tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, mode, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1700000000, mode
            if kind == "file":
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            else:
                ti.type, ti.linkname = tarfile.SYMTYPE, data
            tar.addfile(ti)
    return gzip.compress(buf.getvalue())


def write_layout(path, layers, config, tag="latest"):
    """An OCI layout at path: the gzip'd layers in order, config the image config's `config`."""
    os.makedirs(path)
    descs = [dict(_blob(path, b), mediaType="application/vnd.oci.image.layer.v1.tar+gzip") for b in layers]
    cfg = {"architecture": "amd64", "os": "linux", "config": dict({"Env": ["PATH=/bin:/usr/bin"]}, **config)}
    write_oci_index(path, json.dumps(cfg).encode(), descs, tag)


def push(layout, host, name, tag="latest"):
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:{tag}",
            f"docker://{host}/{name}:{tag}",
        ],
        check=True,
    )


D, F = 0o755, 0o644
# ghcr.io/apptainer/aufs-sanity: file1 everywhere, then whiteouts (a whole directory, one
# file), then file2 everywhere (the whited-out directory made again)
AUFS = [
    [("test", "dir", D, None)]
    + [(f"test/{d}", "dir", D, None) for d in ("whiteout-dir", "whiteout-file", "normal-dir")]
    + [(f"test/{d}/file1", "file", F, b"1") for d in ("whiteout-dir", "whiteout-file", "normal-dir")],
    [("test/.wh.whiteout-dir", "file", F, b""), ("test/whiteout-file/.wh.file1", "file", F, b"")],
    [("test/whiteout-dir", "dir", D, None)]
    + [(f"test/{d}/file2", "file", F, b"2") for d in ("whiteout-dir", "whiteout-file", "normal-dir")],
]
# ghcr.io/apptainer/userperms (#977): a file removed by a later layer from a directory its
# owner may not write (the build must still delete it, and the result stay listable)
USERPERMS = [
    [("testdir", "dir", 0o555, None), ("testdir/testfile", "file", 0o444, b"x")],
    [("testdir", "dir", 0o555, None), ("testdir/.wh.testfile", "file", F, b"")],
]
# ghcr.io/apptainer/linkwh (#1592, #1576): whiteouts of symbolic links remove the link, not
# what it points to (a link to a directory, to a file, a dangling one)
LINKWH = [
    [
        ("target", "dir", D, None),
        ("target/file", "file", F, b"kept\n"),
        ("afile", "file", F, b"afile\n"),
        ("dirlink", "symlink", 0o777, "/target"),
        ("filelink", "symlink", 0o777, "afile"),
        ("dangling", "symlink", 0o777, "/nowhere"),
    ],
    [(".wh.dirlink", "file", F, b""), (".wh.filelink", "file", F, b""), (".wh.dangling", "file", F, b"")],
]
# continuumio/miniconda3, what issue274 uses of it: conda.sh defines a `conda` function
# (activate: in this shell; the rest: the conda program)
CONDA_SH = b"""conda() {
    if [ "$1" = activate ]; then
        [ -d "/opt/conda/envs/$2" ] || { echo "EnvironmentNameNotFound: $2" >&2; return 1; }
        export CONDA_DEFAULT_ENV="$2"
    else
        /opt/conda/bin/conda "$@"
    fi
}
"""
CONDA = b"""#!/bin/sh
case "$1" in
create) mkdir -p "/opt/conda/envs/$3" ;;
info) echo "active environment : ${CONDA_DEFAULT_ENV:-None}" ;;
esac
"""
MINICONDA = [
    [("opt/conda/" + d, "dir", D, None) for d in ("", "etc", "etc/profile.d", "bin", "envs")]
    + [("opt/conda/etc/profile.d/conda.sh", "file", F, CONDA_SH), ("opt/conda/bin/conda", "file", D, CONDA)]
]
# ghcr.io/apptainer/issue4524: a directory and a file with mode 000
ISSUE4524 = [[("directory", "dir", 0o000, None), ("file", "file", 0o000, b"x")]]

IMAGES = {
    "aufs-sanity": (AUFS, {}),
    "userperms": (USERPERMS, {}),
    "linkwh": (LINKWH, {}),
    "labels": ([], {"Labels": {"LABEL1": "1", "LABEL2": "TWO"}}),
    # `CMD echo 'Test run'` in a Dockerfile: the shell form
    "issue233": ([], {"Cmd": ["/bin/sh", "-c", "echo 'Test run'"]}),
    "issue4524": (ISSUE4524, {}),
    "my-busybox": ([], {}),
    "miniconda3": (MINICONDA, {"Env": ["PATH=/opt/conda/bin:/usr/bin:/bin"]}),
}


@pytest.fixture(scope="module")
def registry(images):
    proc, host = start_registry(os.path.join(WORK, "registry-e2e-layers"), images)
    base = gzip.compress(_base_layer(images))  # the busybox tree, the first layer of each
    for name, (layers, config) in IMAGES.items():
        layout = os.path.join(WORK, "e2e-layers", name)
        write_layout(layout, [base] + [tar_layer(entries) for entries in layers], config)
        push(layout, host, name)
    yield host
    proc.terminate()
    proc.wait(10)


def build(bdir, host, name, *args, out="container"):
    path = str(bdir / out)
    r = hpcrun("build", *args, path, f"docker://{host}/{name}", env=cache_env(name), timeout=180)
    assert r.returncode == 0, r.stderr
    return path


def cache_env(name):
    return {"XDG_CACHE_HOME": os.path.join(WORK, "cache", "e2e-layers-" + name)}


def image_verify(path):
    """What Apptainer's ImageVerify checks that applies here: the image runs a shell, has
    its /.singularity.d and a runscript."""
    r = hpcrun("exec", path, "sh", "-c", "test -d /.singularity.d && test -x /.singularity.d/runscript && echo ok")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_testDockerAUFS(registry, bdir):
    img = build(bdir, registry, "aufs-sanity")
    r = hpcrun("exec", img, "ls", "/test/whiteout-dir/file2", "/test/whiteout-file/file2", "/test/normal-dir/file2")
    assert r.returncode == 0, r.stderr  # File 2
    r = hpcrun("exec", img, "ls", "/test/whiteout-dir/file1", "/test/whiteout-file/file1")
    assert r.returncode == 1, r.stdout + r.stderr  # File1
    assert hpcrun("exec", img, "cat", "/test/normal-dir/file1").stdout == "1"


@pytest.mark.parametrize("sandbox", [False, True], ids=["sif", "sandbox"])
def test_testDockerPermissions(registry, bdir, sandbox):
    img = build(bdir, registry, "userperms", *(["--sandbox"] if sandbox else []))
    assert hpcrun("exec", img, "ls", "/testdir/").returncode == 0  # TestDir
    assert hpcrun("exec", img, "ls", "/testdir/testfile").returncode == 1  # TestDirFile


def test_testDockerWhiteoutSymlink(registry, bdir):
    img = build(bdir, registry, "linkwh")
    image_verify(img)
    r = hpcrun("exec", img, "sh", "-c", "ls -d /dirlink /filelink /dangling; cat /target/file /afile")
    assert r.stdout == "kept\nafile\n", r.stdout + r.stderr


def test_testDockerLabels(registry, bdir):
    img = build(bdir, registry, "labels")
    r = hpcrun("inspect", "--labels", img)
    assert r.returncode == 0, r.stderr
    assert "LABEL1: 1" in r.stdout and "LABEL2: TWO" in r.stdout, r.stdout


def definition(bdir, **header):
    """e2e.PrepareDefFile: a header (Bootstrap first) and nothing else."""
    path = bdir / "image.def"
    path.write_text("".join(f"{k}: {v}\n" for k, v in header.items()))
    os.chmod(path, 0o644)
    return str(path)


def build_as(profile, *args, env=None):
    """hpcrun build as the test user, or as root (Apptainer's RootProfile)."""
    if profile == "user":
        return hpcrun("build", *args, env=env, timeout=180)
    root_env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8"}
    root_env.update(env or {"XDG_CACHE_HOME": os.path.join(WORK, "cache", "e2e-layers-root")})
    return subprocess.run([HPCRUN, "build", *args], env=root_env, capture_output=True, text=True, timeout=180, cwd=WORK)


@pytest.mark.parametrize("profile", ["root", "user"])
def test_testDockerDefFile(registry, bdir, profile):
    """Apptainer bootstraps alpine, rockylinux:9 and ubuntu:22.04 from Docker Hub as root;
    here the loopback registry's image, as root and as the user."""
    out = str(bdir / "container")
    d = definition(bdir, Bootstrap="docker", From=f"{registry}/my-busybox:latest")
    r = build_as(profile, out, d, env=None if profile == "root" else cache_env("deffile"))
    assert r.returncode == 0, r.stderr
    image_verify(out)


REGISTRY_CASES = [
    ("BusyBox", 0, lambda reg: {"From": f"{reg}/my-busybox"}),
    ("BusyBoxRegistry", 0, lambda reg: {"From": "my-busybox", "Registry": reg}),
    ("BusyBoxNamespace", 252, lambda reg: {"From": "my-busybox", "Registry": reg, "Namespace": "not-a-namespace"}),
]


@pytest.mark.parametrize("profile", ["root", "user"])
@pytest.mark.parametrize("name,code,header", REGISTRY_CASES, ids=[c[0] for c in REGISTRY_CASES])
def test_testDockerRegistry(registry, bdir, name, code, header, profile):
    """`Registry:` and `Namespace:` put in front of `From:`, as Apptainer's. A missing
    image: 252 (Apptainer: 255)."""
    out = str(bdir / "container")
    d = definition(bdir, Bootstrap="docker", **header(registry))
    r = build_as(profile, "--disable-cache", "--no-https", out, d)
    assert r.returncode == code, r.stderr
    if code == 0:
        image_verify(out)
    else:
        assert "/not-a-namespace/my-busybox" in r.stderr and "404" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not os.path.exists(out)


def test_testDockerCMDQuotes(registry):
    r = hpcrun("run", f"docker://{registry}/issue233", env=cache_env("issue233"), timeout=180)
    assert r.returncode == 0 and "Test run" in r.stdout, r.stdout + r.stderr


def test_issue4524(registry, bdir):
    sandbox = build(bdir, registry, "issue4524", "--fix-perms", "--sandbox", out="issue_4524")
    assert os.stat(os.path.join(sandbox, "directory")).st_mode & 0o7777 == 0o700
    assert os.stat(os.path.join(sandbox, "file")).st_mode & 0o7777 == 0o600


def test_issue4524_fix_perms_sif(registry, bdir):
    """--fix-perms in a SIF built with a subuid range (owners kept): owner rwX added too."""
    img = build(bdir, registry, "issue4524", "--fix-perms", out="issue_4524.sif")
    r = hpcrun("exec", img, "stat", "-c", "%a", "/directory", "/file")
    assert r.stdout.split() == ["700", "600"], r.stdout + r.stderr


def test_issue4943(registry, bdir):
    """`build --force /dev/null IMAGE`: the image is built and thrown away (Apptainer writes
    the SIF into /dev/null); /dev/null stays what it is."""
    before = os.stat("/dev/null")
    r = hpcrun("build", "--disable-cache", "--force", "/dev/null", f"docker://{registry}/my-busybox", timeout=180)
    assert r.returncode == 0, r.stderr
    after = os.stat("/dev/null")
    assert (after.st_rdev, after.st_ino, after.st_mode) == (before.st_rdev, before.st_ino, before.st_mode)


def test_issue5172(registry, bdir):
    """A sandbox built with --disable-cache, then a SIF pulled over it... as Apptainer's
    (each removed after): both succeed, no cache entry is made."""
    ref, path = f"docker://{registry}/my-busybox", str(bdir / "issue-5172")
    env = cache_env("issue5172")
    r = hpcrun("build", "--disable-cache", "--sandbox", path, ref, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    subprocess.run(["rm", "-rf", path], check=True)
    r = hpcrun("pull", "--disable-cache", path, ref, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "blobs"))


def test_issue274(registry, bdir):
    """Apptainer's definition, on a stand-in for continuumio/miniconda3: conda.sh defines a
    `conda` shell function; %environment sources it and activates the env %post created."""
    d = bdir / "deffile"
    d.write_text(
        f"Bootstrap: docker\nFrom: {registry}/miniconda3:latest\n\n%post\n\n"
        "\t. /opt/conda/etc/profile.d/conda.sh\n\tconda create -n env\n\n"
        "%environment\n\n\tsource /opt/conda/etc/profile.d/conda.sh\n\tconda activate env\n"
    )
    os.chmod(d, 0o644)
    out = str(bdir / "container")
    r = hpcrun("build", "--disable-cache", out, str(d), timeout=180)
    assert r.returncode == 0, r.stderr
    r = hpcrun("exec", out, "conda", "info")
    assert r.returncode == 0 and "active environment : env" in r.stdout and r.stderr == "", r.stdout + r.stderr


# test/defs/issue1704.def, From: the loopback registry's image
ISSUE1704 = "bootstrap: docker\nfrom: {reg}/my-busybox\n\n%setup\n" + "".join(
    f"    #{w}\n" for w in ("an", "abn", "nn", "ann", "nan", "anan")
)


def test_issue1704(registry, bdir):
    """Trailing n's of the definition file kept in the image (inspect -d)."""
    d = bdir / "issue1704.def"
    text = ISSUE1704.format(reg=registry)
    d.write_text(text)
    os.chmod(d, 0o644)
    out = str(bdir / "issue1704.sif")
    r = hpcrun("build", out, str(d), env=cache_env("issue1704"), timeout=180)
    assert r.returncode == 0, r.stderr
    r = hpcrun("inspect", "-d", out)
    assert r.returncode == 0 and text.strip() in r.stdout, r.stdout + r.stderr
