"""hpcrun build from tarballs, docker-archive, OCI layouts; each result run with hpcrun exec."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time

import pytest

from hpcrun_testlib import hpcrun


def _layer(entries):
    """entries: (name, kind, data) with kind file|dir|symlink|hardlink|chr -> tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000
            if kind == "file":
                ti.size, ti.mode = len(data), 0o644
                tar.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, data
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(ti)
    return buf.getvalue()


def _base_layer(images):
    """The busybox sandbox as one layer, plus things the next layer deletes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(images["sandbox"], arcname=".", filter=lambda ti: None if ".singularity.d" in ti.name else ti)
        for name, data in (("gone/file", b"x"), ("opaque/old", b"old"), ("keep/file", b"kept\n")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


TOP = [
    (".wh.gone", "file", b""),
    ("opaque", "dir", None),
    ("opaque/.wh..wh..opq", "file", b""),
    ("opaque/new", "file", b"new"),
    ("dev/null2", "chr", None),
    ("keep/link", "hardlink", "keep/file"),
]
CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/bin:/usr/bin", "GREETING=it's oci"],
        "Entrypoint": ["/bin/echo", "entry"],
        "Cmd": ["default-cmd"],
        "Labels": {"org.example.name": "test-image"},
    },
}


def _blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def write_oci_index(path, config, layers, tag):
    """The rest of an OCI layout at path whose layer blobs are written (layers: their
    descriptors): the config blob (bytes), the manifest, index.json naming it tag, oci-layout."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": dict(_blob(path, config), mediaType="application/vnd.oci.image.config.v1+json"),
        "layers": layers,
    }
    mdesc = dict(
        _blob(path, json.dumps(manifest).encode()),
        mediaType="application/vnd.oci.image.manifest.v1+json",
        annotations={"org.opencontainers.image.ref.name": tag},
    )
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [mdesc]}, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')


def make_oci_layout(path, images, tag="v1"):
    base, top = gzip.compress(_base_layer(images)), _layer(TOP)
    layers = [
        dict(_blob(path, base), mediaType="application/vnd.oci.image.layer.v1.tar+gzip"),
        dict(_blob(path, top), mediaType="application/vnd.oci.image.layer.v1.tar"),
    ]
    write_oci_index(path, json.dumps(CONFIG).encode(), layers, tag)


def make_docker_archive(path, images):
    base, top = _base_layer(images), _layer(TOP)
    cfg = dict(
        CONFIG, rootfs={"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(b).hexdigest() for b in (base, top)]}
    )
    files = {
        "l1/layer.tar": base,
        "l2/layer.tar": top,
        "config.json": json.dumps(cfg).encode(),
        "manifest.json": json.dumps(
            [{"Config": "config.json", "RepoTags": ["test:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]
        ).encode(),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


def check_oci_result(out):
    r = hpcrun("run", out)
    assert r.stdout.strip() == "entry default-cmd", r.stderr
    assert hpcrun("run", out, "given").stdout.strip() == "entry given"
    r = hpcrun(
        "exec",
        out,
        "sh",
        "-c",
        'echo "$GREETING"; test -e /gone || echo gone-deleted;'
        " ls /opaque; cat /keep/link; test -e /dev/null2 || echo no-dev",
    )
    assert r.stdout.split("\n")[:5] == ["it's oci", "gone-deleted", "new", "kept", "no-dev"], r.stdout + r.stderr
    assert "org.example.name: test-image" in hpcrun("inspect", out).stdout


def test_build_from_oci_layout(images, bdir):
    layout = bdir / "layout"
    make_oci_layout(str(layout), images)
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    out = str(bdir / "oci.sif")
    r = hpcrun("build", out, f"oci:{layout}:v1")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 device node" in r.stderr
    check_oci_result(out)
    assert not [n for n in os.listdir(bdir) if n.startswith(".hpcrun-build-")]


def test_build_from_oci_archive_and_docker_archive(images, bdir):
    layout = bdir / "layout"
    make_oci_layout(str(layout), images)
    with tarfile.open(bdir / "oci.tar", "w") as tar:
        tar.add(layout, arcname=".")
    make_docker_archive(str(bdir / "docker.tar"), images)
    os.chmod(bdir / "oci.tar", 0o644)
    os.chmod(bdir / "docker.tar", 0o644)
    for src, out in ((f"oci-archive:{bdir / 'oci.tar'}", "a.sif"), (f"docker-archive:{bdir / 'docker.tar'}", "d.sqfs")):
        r = hpcrun("build", str(bdir / out), src)
        assert r.returncode == 0, (src, r.stderr)
        check_oci_result(str(bdir / out))


def test_build_from_rootfs_tarballs(images, bdir):
    for ext, compress in (("tar", None), ("tar.gz", ["gzip", "-kf"]), ("tar.zst", ["zstd", "-qf"])):
        plain = bdir / "rootfs.tar"
        subprocess.run(["tar", "-C", images["sandbox"], "-cf", str(plain), "."], check=True)
        if compress:
            subprocess.run(compress + [str(plain)], check=True)
        src = bdir / f"rootfs.{ext}"
        os.chmod(src, 0o644)
        out = str(bdir / f"from-{ext}.sif")
        r = hpcrun("build", out, str(src))
        assert r.returncode == 0, (ext, r.stderr)
        assert hpcrun("run", out, "x").stdout.strip() == "runscript:x"


def test_member_through_a_symlink_lands_inside(images, bdir):
    """a -> /tmp, then a/hpcrun-owned: resolved inside the image (as the container sees it,
    as Docker and umoci unpack), never on the host."""
    src = bdir / "evil.tar"
    src.write_bytes(_layer([("a", "symlink", "/tmp"), ("a/hpcrun-owned", "file", b"x")]))
    os.chmod(src, 0o644)
    out = bdir / "evil.sqfs"
    r = hpcrun("build", str(out), str(src))
    assert r.returncode == 0, r.stderr
    assert not os.path.exists("/tmp/hpcrun-owned")
    listing = subprocess.run(["unsquashfs", "-ll", str(out)], capture_output=True, text=True).stdout
    assert "squashfs-root/a -> /tmp" in listing and "squashfs-root/tmp/hpcrun-owned" in listing, listing


@pytest.mark.parametrize(
    "entries,word",
    [
        ([("../escape", "file", b"x")], "outside the image"),
        ([("h", "hardlink", "../../etc/passwd")], "outside the image"),
    ],
)
def test_hostile_tarballs_refused(images, bdir, entries, word):
    src = bdir / "evil.tar"
    src.write_bytes(_layer(entries))
    os.chmod(src, 0o644)
    out = bdir / "evil.sif"
    r = hpcrun("build", str(out), str(src))
    assert r.returncode == 252, r.stderr
    assert word in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not os.path.exists("/tmp/hpcrun-owned")
    assert not [n for n in os.listdir(bdir) if n.startswith(".hpcrun-build-")]


def test_bad_oci_inputs(images, bdir):
    layout = bdir / "layout"
    make_oci_layout(str(layout), images)
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    blob = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"].split(":")[1]
    good = blob.read_bytes()
    blob.write_bytes(good + b"tampered")
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    r = hpcrun("build", str(bdir / "x.sif"), f"oci:{layout}")
    assert r.returncode == 252 and "does not match its digest" in r.stderr, r.stderr
    blob.write_bytes(good)
    r = hpcrun("build", str(bdir / "x.sif"), f"oci:{layout}:nosuchtag")
    assert r.returncode == 252 and "nosuchtag" in r.stderr
    (bdir / "trunc.tar").write_bytes((bdir / "x").read_bytes() if (bdir / "x").exists() else b"\0" * 700)
    os.chmod(bdir / "trunc.tar", 0o644)
    r = hpcrun("build", str(bdir / "x.sif"), f"docker-archive:{bdir / 'trunc.tar'}")
    assert r.returncode == 252 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (bdir / "x.sif").exists()


DEF = """Bootstrap: localimage
From: base.sif

%arguments
GREETING=hello

%setup
    touch "$APPTAINER_ROOTFS/from-setup"

%files
data.txt /opt/data.txt

%post
    echo "{{ GREETING }} from post" > /opt/post.txt
    mkdir -p /opt/owned && chown 5:6 /opt/owned
    id -u > /opt/postuid

%environment
    export APP_MODE=def

%runscript
    echo "app runscript: $APP_MODE $*"

%labels
    Author hpcrun-tests

%help
    This is the help.

%test
    test -f /opt/post.txt
"""


def test_build_from_definition_file(images, bdir):
    import shutil

    shutil.copy(images["sif"], bdir / "base.sif")
    (bdir / "data.txt").write_text("payload\n")
    (bdir / "app.def").write_text(DEF)
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    out = str(bdir / "app.sif")
    r = hpcrun("build", "--build-arg", "GREETING=hi", out, str(bdir / "app.def"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert hpcrun("run", out, "x").stdout.strip() == "app runscript: def x"
    r = hpcrun(
        "exec", out, "sh", "-c", "cat /opt/post.txt /opt/data.txt /opt/postuid; test -e /from-setup && echo setup"
    )
    assert r.stdout.split("\n")[:4] == ["hi from post", "payload", "0", "setup"], r.stdout + r.stderr
    # %post ran as root through the subuid range: the chown survives into the image
    r = hpcrun("exec", "--fakeroot", out, "stat", "-c", "%u:%g", "/opt/owned")
    assert r.stdout.strip() == "5:6", r.stdout + r.stderr
    listing = subprocess.run(["unsquashfs", "-o", "32768", "-lln", out], capture_output=True, text=True).stdout
    owned = [ln for ln in listing.splitlines() if ln.endswith("squashfs-root/opt/owned")]
    assert len(owned) == 1 and " 5/6 " in owned[0], owned
    r = hpcrun("inspect", "-l", "-H", "-d", out)  # (--all is JSON, as in Apptainer)
    assert "Author: hpcrun-tests" in r.stdout and "This is the help." in r.stdout and "%post" in r.stdout
    assert not [n for n in os.listdir(bdir) if n.startswith(".hpcrun-build-")]


@pytest.mark.parametrize(
    "body,code,word",
    [
        ("Bootstrap: localimage\nFrom: base.sif\n%post\n    exit 7\n", 7, "%post failed with exit code 7"),
        ("Bootstrap: localimage\nFrom: base.sif\n%bogus\n", 2, "unknown section %bogus"),
        ("Bootstrap: nonsense\n", 2, "unknown bootstrap agent"),
        ("Bootstrap: localimage\n", 2, "needs a 'From:'"),
        ("Bootstrap: localimage\nFrom: base.sif\n%post\n    echo {{ MISSING }}\n", 2, "MISSING"),
    ],
)
def test_definition_file_errors(images, bdir, body, code, word):
    import shutil

    shutil.copy(images["sif"], bdir / "base.sif")
    (bdir / "bad.def").write_text(body)
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    out = bdir / "bad.sif"
    r = hpcrun("build", str(out), str(bdir / "bad.def"))
    assert r.returncode == code, r.stdout + r.stderr
    assert word in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert not [n for n in os.listdir(bdir) if n.startswith(".hpcrun-build-")]


def test_compression_choices_and_reproducible_builds(images, bdir):
    import struct
    from hpcrun.images.sif import SifFile

    for name, comp_id in (("gzip", 1), ("xz", 4), ("lz4", 5), ("zstd", 6)):
        out = str(bdir / f"{name}.sif")
        r = hpcrun("build", "--compress", name, out, images["sandbox"])
        assert r.returncode == 0, r.stderr
        part = SifFile(out).primary_partition()
        with open(out, "rb") as f:
            f.seek(part.offset + 20)
            assert struct.unpack("<H", f.read(2))[0] == comp_id
        assert hpcrun("run", out, "z").stdout.strip() == "runscript:z"
    a, b = str(bdir / "r1.sif"), str(bdir / "r2.sif")
    for out in (a, b):
        assert hpcrun("build", "--reproducible", out, images["sandbox"]).returncode == 0
        time.sleep(1.1)  # a different wall-clock second must not matter
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    assert hpcrun("build", "--compress", "rar", str(bdir / "x.sif"), images["sandbox"]).returncode == 2
