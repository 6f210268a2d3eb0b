"""Apptainer's pull tables, ported: e2e/pull/pull.go (apptainer/apptainer) — testPullCmd,
testPullDisableCacheCmd, testPullUmask — and testDockerPulls of e2e/docker/docker.go.
Apptainer pulls ghcr.io/apptainer/alpine (oras://) and Docker Hub's busybox; here a
docker-registry on loopback holds the test image (docker://, pushed with skopeo) and SIF
artifacts pushed as `oras push` does (a SIF config and one SIF layer). Apptainer's
failures all exit 255; hpcrun's say which failure (README's exit-code table): a missing or
invalid image is 252, an OUT that exists without --force is a usage error, 2."""

import hashlib
import json
import os
import subprocess
import urllib.request

import pytest

from hpcrun_testlib import WORK, hpcrun, user
from test_pull import start_registry

SIF_CONFIG = "application/vnd.sylabs.sif.config.v1+json"
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
SIF_LAYER_PROTO = "appliciation/vnd.sylabs.sif.layer.tar"  # sic: Apptainer < 3.7 wrote this


def push_blob(host, name, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"http://{host}/v2/{name}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(req) as r:
        loc = r.headers["Location"]
    loc = loc if loc.startswith("http") else f"http://{host}{loc}"
    sep = "&" if "?" in loc else "?"
    req = urllib.request.Request(f"{loc}{sep}digest={digest}", method="PUT", data=data)
    req.add_header("Content-Type", "application/octet-stream")
    urllib.request.urlopen(req).close()
    return {"digest": digest, "size": len(data)}


def push_sif(host, name, data, layer_type=SIF_LAYER, tag="latest"):
    """What `oras push` (Apptainer's orasPushNoCheck) puts in a registry: data need not be a SIF."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": dict(push_blob(host, name, b"{}"), mediaType=SIF_CONFIG),
        "layers": [
            dict(
                push_blob(host, name, data),
                mediaType=layer_type,
                annotations={"org.opencontainers.image.title": "image.sif"},
            )
        ],
    }
    body = json.dumps(manifest).encode()
    req = urllib.request.Request(f"http://{host}/v2/{name}/manifests/{tag}", method="PUT", data=body)
    req.add_header("Content-Type", manifest["mediaType"])
    urllib.request.urlopen(req).close()


@pytest.fixture(scope="module")
def registry(images):
    proc, host = start_registry(os.path.join(WORK, "registry-e2e-pull"), images)
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{host}/test/busybox:v1",
            f"docker://{host}/test/busybox:latest",
        ],
        check=True,
    )
    with open(images["sif"], "rb") as f:
        sif = f.read()
    push_sif(host, "pull_test_sif", sif)
    push_sif(host, "pull_test_sif_mediatypeproto", sif, SIF_LAYER_PROTO)
    push_sif(host, "pull_test_invalid_file", b"Invalid Image Contents")
    yield host
    proc.terminate()
    proc.wait(10)


def cache_env(name):
    return {"XDG_CACHE_HOME": os.path.join(WORK, "cache", "e2e-pull-" + name)}


def manifest_digest(host, name, tag):
    req = urllib.request.Request(f"http://{host}/v2/{name}/manifests/{tag}", method="HEAD")
    req.add_header("Accept", "application/vnd.oci.image.manifest.v1+json")
    with urllib.request.urlopen(req) as r:
        return r.headers["Docker-Content-Digest"]


def pull(bdir, *args, env=None, umask=None):
    """hpcrun pull ARGS from bdir (Apptainer runs each case in a fresh working directory)."""
    if umask is None:
        return hpcrun("pull", *args, cwd=str(bdir), env=env, timeout=180)
    from hpcrun_testlib import HPCRUN, as_user, user_env

    return subprocess.run(
        as_user(["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", HPCRUN, "pull", *args]),
        cwd=str(bdir),
        env=user_env(env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def one_line(r):
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def verify(path):
    """Apptainer's ImageVerify, what applies: a shell runs in it."""
    r = hpcrun("exec", path, "sh", "-c", "echo ok")
    assert r.returncode == 0 and r.stdout == "ok\n", r.stdout + r.stderr


def docker(reg, ref="test/busybox:v1"):
    return f"docker://{reg}/{ref}"


# ---- testPullCmd ----


def test_non_existent_image(registry, bdir):
    r = pull(bdir, docker(registry, "image/does/not:exist"), env=cache_env("missing"))
    assert r.returncode == 252 and "404" in r.stderr, r.stderr
    one_line(r)
    assert os.listdir(bdir) == []


@pytest.mark.parametrize("exists", [True, False], ids=["force existing file", "force non-existing file"])
def test_force(registry, bdir, exists):
    out = bdir / "busybox_v1.sif"
    if exists:
        out.write_bytes(b"")
    r = pull(bdir, "--force", docker(registry), env=cache_env("force"))
    assert r.returncode == 0, r.stderr
    verify(str(out))


def test_existing_file_refused(registry, bdir):
    """testDockerPulls' BusyboxLatestPullFail: an OUT there without --force is refused and
    left alone (Apptainer: 255; hpcrun: 2, a usage error)."""
    out = bdir / "image.sif"
    out.write_bytes(b"mine")
    r = pull(bdir, str(out), docker(registry), env=cache_env("exists"))
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr, r.stderr
    one_line(r)
    assert out.read_bytes() == b"mine"


def test_image_with_specific_hash(registry, bdir):
    """By digest. The default name is hpcrun's REPO_DIGEST12.sif (Apptainer's GetName makes
    `busybox@sha256_DIGEST.sif` of it)."""
    digest = manifest_digest(registry, "test/busybox", "v1")
    r = pull(bdir, docker(registry, f"test/busybox@{digest}"), env=cache_env("digest"))
    assert r.returncode == 0, r.stderr
    verify(str(bdir / f"busybox_{digest[7:19]}.sif"))


def test_latest_tag(registry, bdir):
    r = pull(bdir, docker(registry, "test/busybox"), env=cache_env("latest"))
    assert r.returncode == 0, r.stderr
    verify(str(bdir / "busybox_latest.sif"))


def test_dir_no_image_path(registry, bdir):
    d = bdir / "pull_dir"
    d.mkdir()
    os.chown(d, user().pw_uid, user().pw_gid)
    r = pull(bdir, "--dir", str(d), docker(registry), env=cache_env("dir"))
    assert r.returncode == 0, r.stderr
    verify(str(d / "busybox_v1.sif"))
    assert os.listdir(bdir) == ["pull_dir"]


def test_dir_image_path(registry, bdir):
    """--dir and an absolute image path are joined as Apptainer joins them (DIR/ABS), so
    the image is not written at ABS: DIR/ABS's directory does not exist (one line, 252)."""
    d = bdir / "pull_dir"
    d.mkdir()
    os.chown(d, user().pw_uid, user().pw_gid)
    image = bdir / "image.sif"
    r = pull(bdir, "--dir", str(d), str(image), docker(registry), env=cache_env("dirpath"))
    assert r.returncode == 252, r.stderr
    one_line(r)
    assert not image.exists() and os.listdir(d) == []


def test_relative_name_in_dir(registry, bdir):
    """testDockerPulls' Busybox1.28Pull: --force --dir DIR NAME puts NAME in DIR."""
    r = pull(bdir, "--force", "--dir", str(bdir), "test_container.sif", docker(registry), env=cache_env("dirname"))
    assert r.returncode == 0, r.stderr
    verify(str(bdir / "test_container.sif"))


def test_name(registry, bdir):
    """--name OUT, alone and in --dir. OUT and --name both: hpcrun refuses (2); Apptainer
    takes --name and ignores OUT."""
    r = pull(bdir, "--name", "named.sif", docker(registry), env=cache_env("name"))
    assert r.returncode == 0, r.stderr
    verify(str(bdir / "named.sif"))
    d = bdir / "pull_dir"
    d.mkdir()
    os.chown(d, user().pw_uid, user().pw_gid)
    r = pull(bdir, "--dir", str(d), "--name", "named.sif", docker(registry), env=cache_env("name"))
    assert r.returncode == 0, r.stderr
    verify(str(d / "named.sif"))
    r = pull(bdir, "--name", "other.sif", "out.sif", docker(registry), env=cache_env("name"))
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr
    one_line(r)
    assert sorted(os.listdir(bdir)) == ["named.sif", "pull_dir"]


def test_dir_fail(registry, bdir):
    """testDockerPulls' Busybox1.28PullDirFail: OUT in a directory that does not exist."""
    r = pull(bdir, "/foo/sif.sif", docker(registry), env=cache_env("dirfail"))
    assert r.returncode == 252 and "/foo" in r.stderr, r.stderr
    one_line(r)


@pytest.mark.parametrize("name", ["pull_test_sif", "pull_test_sif_mediatypeproto"])
def test_oras_transport_for_SIF_from_registry(registry, bdir, images, name):
    """The SIF artifact is the image: its bytes, unchanged (Apptainer keeps signatures so)."""
    r = pull(bdir, "--force", f"oras://{registry}/{name}:latest", env=cache_env("oras"))
    assert r.returncode == 0, r.stderr
    out = bdir / f"{name}_latest.sif"
    with open(images["sif"], "rb") as f:
        assert out.read_bytes() == f.read()
    verify(str(out))


@pytest.mark.parametrize(
    "name,code", [("pull_test_", 2), ("pull_test_invalid_file", 252)], ids=["non SIF file", "packed dir"]
)
def test_oras_pull_of_invalid(registry, bdir, name, code):
    """`pull_test_` is no valid repository name (the distribution spec's grammar): hpcrun
    says so before asking the registry, a usage error (2); an artifact that is not a SIF:
    252. One line, nothing left (Apptainer: 255 for both)."""
    r = pull(bdir, "--force", f"oras://{registry}/{name}:latest", env=cache_env("oras-bad"))
    assert r.returncode == code, r.stderr
    one_line(r)
    assert os.listdir(bdir) == []


def test_no_https(registry, bdir):
    """--no-https: a no-op here (loopback registries are spoken to over HTTP anyway)."""
    r = pull(bdir, "--no-https", "--force", f"oras://{registry}/pull_test_sif:latest", env=cache_env("nohttps"))
    assert r.returncode == 0, r.stderr
    verify(str(bdir / "pull_test_sif_latest.sif"))


@pytest.mark.parametrize("scheme", ["oras", "docker"])
def test_pulling_as_sandbox(registry, bdir, scheme):
    """--sandbox over an existing file with --force: a directory, the user's to remove."""
    ref = f"oras://{registry}/pull_test_sif:latest" if scheme == "oras" else docker(registry)
    out = bdir / ("pull_test_sif_latest.sif" if scheme == "oras" else "busybox_v1.sif")
    out.write_bytes(b"")
    r = pull(bdir, "--force", "--sandbox", ref, env=cache_env("sandbox-" + scheme))
    assert r.returncode == 0, r.stderr
    assert out.is_dir() and (out / "bin" / "sh").exists()
    verify(str(out))


def test_sandbox_over_a_link(registry, bdir):
    """--force --sandbox where OUT is a symlink (to a directory of the user's): the link is
    replaced by the sandbox, what it pointed to is left as it was."""
    target = bdir / "target"
    target.mkdir()
    (target / "mine").write_text("x")
    os.chown(target, user().pw_uid, user().pw_gid)
    out = bdir / "sandbox"
    os.symlink(target, out)
    r = pull(bdir, "--force", "--sandbox", str(out), docker(registry), env=cache_env("sandbox-link"))
    assert r.returncode == 0, r.stderr
    assert not out.is_symlink() and (out / "bin" / "sh").exists()
    assert os.listdir(target) == ["mine"]


# ---- testPullDisableCacheCmd ----


@pytest.mark.parametrize(
    "name,ref,sandbox",
    [
        ("library", "docker", False),
        ("oras", "oras", False),
        ("oras pulls as sandbox", "oras", True),
        ("docker pulls as sandbox", "docker", True),
    ],
)
def test_testPullDisableCacheCmd(registry, bdir, name, ref, sandbox):
    """--disable-cache: no cache entry made, the image where asked (#5628)."""
    env = cache_env("disabled-" + name.replace(" ", "-"))
    src = f"oras://{registry}/pull_test_sif:latest" if ref == "oras" else docker(registry)
    path = bdir / ("image" if sandbox else "image.sif")
    r = pull(bdir, "--disable-cache", *(["--sandbox"] if sandbox else []), str(path), src, env=env)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "blobs"))
    assert path.is_dir() if sandbox else path.is_file()
    verify(str(path))


# ---- testPullUmask ----

UMASK_CASES = [(0o022, 0o755), (0o077, 0o700), (0o027, 0o750)]


@pytest.mark.parametrize("scheme", ["oras", "docker"])
def test_testPullUmask(registry, bdir, scheme):
    """The pulled file's mode is 0777 less the umask, also when --force replaces a file
    (made 0666 before each pull). Apptainer serves the SIF over http://; hpcrun pulls
    oras:// and docker://."""
    src = f"oras://{registry}/pull_test_sif:latest" if scheme == "oras" else docker(registry)
    for force in (False, True):
        for umask, want in UMASK_CASES:
            path = bdir / f"{umask:04o}-umask-pull"
            if path.exists():
                os.chmod(path, 0o666)
            r = pull(bdir, *(["--force"] if force else []), str(path), src, env=cache_env("umask"), umask=umask)
            assert r.returncode == 0, r.stderr
            assert os.stat(path).st_mode & 0o7777 == want, (umask, force, oct(os.stat(path).st_mode))
