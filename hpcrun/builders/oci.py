"""Read images in OCI layout (`oci:DIR[:tag]`, `oci-archive:FILE`) and `docker save`
archives (`docker-archive:FILE`): the layer blobs in order and the image config.
Every blob an OCI manifest names is checked against its sha256 digest."""
import hashlib
import json
import os
import platform
import tarfile

from hpcrun.errors import ImageError

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd", "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def _json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ImageError(f"{what}: {os.path.basename(path)} is missing") from None
    except (ValueError, OSError) as e:
        raise ImageError(f"{what}: {os.path.basename(path)} is not valid JSON ({e})") from None


def _blob(layout, desc, what):
    digest = desc.get("digest", "")
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise ImageError(f"{what}: unsupported or malformed digest {digest!r}")
    path = os.path.join(layout, "blobs", "sha256", hexd)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise ImageError(f"{what}: blob {digest} is missing") from None
    if h.hexdigest() != hexd:
        raise ImageError(f"{what}: blob {digest} does not match its digest", "the image is corrupt: fetch it again")
    return path


def from_layout(layout, tag=None, what=None):
    """-> (list of layer paths, config dict) from an OCI image layout directory."""
    what = what or f"oci:{layout}"
    index = _json(os.path.join(layout, "index.json"), what)
    manifests = index.get("manifests") or []
    if tag:
        manifests = [m for m in manifests
                     if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag]
        if not manifests:
            raise ImageError(f"{what}: no image tagged {tag!r}")
    if not manifests:
        raise ImageError(f"{what}: index.json lists no image")
    desc = manifests[0]
    for _ in range(4):          # an index may point to a platform index
        data = _json(_blob(layout, desc, what), what)
        if desc.get("mediaType") in INDEX_TYPES or "manifests" in data:
            desc = _pick_platform(data.get("manifests") or [], what)
            continue
        break
    config = _json(_blob(layout, data["config"], what), what)
    layers = []
    for layer in data.get("layers") or []:
        if layer.get("mediaType") not in LAYER_TYPES:
            raise ImageError(f"{what}: unknown layer media type {layer.get('mediaType')!r}")
        layers.append(_blob(layout, layer, what))
    return layers, config


def _pick_platform(manifests, what):
    arch = GOARCH.get(platform.machine(), platform.machine())
    for m in manifests:
        p = m.get("platform") or {}
        if p.get("os", "linux") == "linux" and p.get("architecture") == arch:
            return m
    raise ImageError(f"{what}: no image for linux/{arch}")


def from_docker_archive(path, workdir):
    """-> (layer paths, config) from `docker save` output, unpacked under workdir."""
    what = f"docker-archive:{path}"
    out = os.path.join(workdir, "archive")
    _extract_plain(path, out, what)
    if os.path.exists(os.path.join(out, "index.json")) and not os.path.exists(os.path.join(out, "manifest.json")):
        return from_layout(out, what=what)
    manifest = _json(os.path.join(out, "manifest.json"), what)
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(f"{what}: manifest.json lists no image")
    entry = manifest[0]
    config = _json(_within(out, entry.get("Config", ""), what), what)
    layers = [_within(out, name, what) for name in entry.get("Layers") or []]
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    for path, want in zip(layers, diff_ids):    # docker save layers are uncompressed: check them
        if want.startswith("sha256:") and _is_plain_tar(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if "sha256:" + h.hexdigest() != want:
                raise ImageError(f"{what}: layer {os.path.basename(path)} does not match its diff_id",
                                 "the archive is corrupt")
    return layers, config


def from_oci_archive(path, workdir, tag=None):
    out = os.path.join(workdir, "archive")
    _extract_plain(path, out, f"oci-archive:{path}")
    return from_layout(out, tag, what=f"oci-archive:{path}")


def _is_plain_tar(path):
    with open(path, "rb") as f:
        head = f.read(262)
    return head[257:262] == b"ustar"


def _within(top, name, what):
    path = os.path.realpath(os.path.join(top, name))
    if not path.startswith(top + os.sep) or not os.path.isfile(path):
        raise ImageError(f"{what}: {name!r} is missing or outside the archive")
    return path


def _extract_plain(path, out, what):
    """An archive of regular files and directories only (the image's own files are layers)."""
    os.makedirs(out)
    out = os.path.realpath(out)
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar.getmembers():
                name = os.path.normpath(m.name.lstrip("/"))
                if name.startswith(".."):
                    raise ImageError(f"{what}: member {m.name!r} points outside the archive")
                target = os.path.join(out, name)
                if m.isdir():
                    os.makedirs(target, exist_ok=True)
                elif m.isfile():
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with tar.extractfile(m) as src, open(target, "wb") as dst:
                        while True:
                            chunk = src.read(1 << 20)
                            if not chunk:
                                break
                            dst.write(chunk)
                # links in an image archive (docker's layer dedup) point to files inside
                elif m.issym() or m.islnk():
                    src = os.path.normpath(os.path.join(os.path.dirname(name), m.linkname)
                                           if m.issym() else m.linkname.lstrip("/"))
                    if src.startswith(".."):
                        raise ImageError(f"{what}: link {m.name!r} points outside the archive")
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.symlink(os.path.relpath(os.path.join(out, src), os.path.dirname(target)), target)
    except FileNotFoundError:
        raise ImageError(f"{what}: file not found") from None
    except (tarfile.TarError, EOFError) as e:
        raise ImageError(f"{what}: truncated or corrupt archive ({e})") from None
