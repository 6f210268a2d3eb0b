"""Read images in OCI layout (`oci:DIR[:tag]`, `oci-archive:FILE`) and `docker save`
archives (`docker-archive:FILE`): the layer blobs in order and the image config.
Every blob an OCI manifest names is checked against its sha256 digest. Archives are
unpacked, and layouts read, through inroot: a link among their members never reaches a
host file."""

import hashlib
import json
import os
import platform
import shutil
import tarfile

from hpcrun import inroot
from hpcrun.errors import ImageError

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


MAX_JSON = 16 << 20  # manifests, indexes and configs are kilobytes; refuse a hostile giant


class Tree:
    """An OCI layout or an unpacked image archive, read through inroot: names (and the
    links among them) resolve inside it, never to a host file."""

    def __init__(self, top, what):
        self.root, self.what = inroot.Root(os.path.realpath(top)), what

    def close(self):
        self.root.close()

    def json(self, name):
        try:
            data = self.root.read(name, MAX_JSON, self.what)
        except OSError as e:
            raise ImageError(f"{self.what}: cannot read {name}: {e.strerror}") from None
        if data is None:
            raise ImageError(f"{self.what}: {name} is missing")
        try:
            return json.loads(data)
        except ValueError as e:
            raise ImageError(f"{self.what}: {name} is not valid JSON ({e})") from None

    def file(self, name):
        """The path of the regular file name, resolved inside the tree."""
        try:
            return self.root.real_path(name)
        except OSError:
            raise ImageError(f"{self.what}: {name!r} is missing or not a regular file in the archive") from None

    def blob(self, desc):
        """blobs/sha256/HEX for a descriptor, checked against its digest."""
        digest = desc.get("digest", "") if isinstance(desc, dict) else ""
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ImageError(f"{self.what}: unsupported or malformed digest {digest!r}")
        path = self.file(f"blobs/sha256/{hexd}")
        if _sha256(path) != hexd:
            raise ImageError(
                f"{self.what}: blob {digest} does not match its digest", "the image is corrupt: fetch it again"
            )
        return path


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def from_layout(layout, tag=None, what=None):
    """-> (list of layer paths, config dict) from an OCI image layout directory."""
    tree = Tree(layout, what or f"oci:{layout}")
    try:
        return _from_tree(tree, tag)
    finally:
        tree.close()


def _from_tree(tree, tag):
    what = tree.what
    manifests = tree.json("index.json").get("manifests") or []
    if tag:
        manifests = [
            m for m in manifests if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
        ]
        if not manifests:
            raise ImageError(f"{what}: no image tagged {tag!r}")
    if not manifests:
        raise ImageError(f"{what}: index.json lists no image")
    desc = manifests[0]
    for _ in range(4):  # an index may point to a platform index
        data = _load(tree.blob(desc), what)
        if desc.get("mediaType") in INDEX_TYPES or "manifests" in data:
            desc = _pick_platform(data.get("manifests") or [], what)
            continue
        break
    config = _load(tree.blob(data.get("config")), what)
    layers = []
    for layer in data.get("layers") or []:
        if layer.get("mediaType") not in LAYER_TYPES:
            raise ImageError(f"{what}: unknown layer media type {layer.get('mediaType')!r}")
        layers.append(tree.blob(layer))
    return layers, config


def _load(path, what):
    """A verified JSON blob (a path inside our tree or the user's layout)."""
    if os.path.getsize(path) > MAX_JSON:
        raise ImageError(f"{what}: a manifest or config is larger than {MAX_JSON >> 20} MiB")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:
        raise ImageError(f"{what}: a manifest or config is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what}: a manifest or config is not a JSON object")
    return data


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
    tree = _extract_plain(path, os.path.join(workdir, "archive"), what)
    try:
        if tree.root.lstat("index.json") and not tree.root.lstat("manifest.json"):
            return _from_tree(tree, None)
        manifest = tree.json("manifest.json")
        if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
            raise ImageError(f"{what}: manifest.json lists no image")
        entry = manifest[0]
        config = _load(tree.file(str(entry.get("Config", ""))), what)
        layers = [tree.file(str(name)) for name in entry.get("Layers") or []]
    finally:
        tree.close()
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    for layer, want in zip(layers, diff_ids):  # docker save layers are uncompressed: check them
        if (
            isinstance(want, str)
            and want.startswith("sha256:")
            and _is_plain_tar(layer)
            and "sha256:" + _sha256(layer) != want
        ):
            raise ImageError(
                f"{what}: layer {os.path.basename(layer)} does not match its diff_id", "the archive is corrupt"
            )
    return layers, config


def from_oci_archive(path, workdir, tag=None):
    tree = _extract_plain(path, os.path.join(workdir, "archive"), f"oci-archive:{path}")
    try:
        return _from_tree(tree, tag)
    finally:
        tree.close()


def _is_plain_tar(path):
    with open(path, "rb") as f:
        head = f.read(262)
    return head[257:262] == b"ustar"


def _extract_plain(path, out, what):
    """Unpack an image archive (its own members are plain files, directories and links
    between them; the image's files are in the layers) into out, through inroot: a link
    member is kept as a link that resolves inside out. -> Tree of out."""
    from hpcrun.builders.layers import _clean

    os.mkdir(out, 0o700)
    tree = Tree(out, what)
    root = tree.root
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                rel = _clean(m.name, what)
                if rel is None:
                    continue
                try:
                    if m.isdir():
                        os.close(root.makedirs(rel))
                    elif m.isfile():
                        with tar.extractfile(m) as src, root.create(rel) as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                    elif m.issym():
                        root.symlink(m.linkname, rel)
                    elif m.islnk():
                        root.hardlink(_clean(m.linkname, what) or ".", rel)
                except OSError as e:
                    raise inroot.failure(e, f"{what}: cannot unpack {m.name!r}") from None
    except FileNotFoundError:
        tree.close()
        raise ImageError(f"{what}: file not found") from None
    except (tarfile.TarError, EOFError) as e:
        tree.close()
        raise ImageError(f"{what}: truncated or corrupt archive ({e})") from None
    except BaseException:
        tree.close()
        raise
    return tree
