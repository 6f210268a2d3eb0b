"""`hpcrun inspect`: an image's metadata read without mounting it.

SIF and squashfs images are read with PySquashfsImage (at the partition's offset),
sandboxes through safepath (their symlinks resolve inside the image). Apptainer keeps
metadata under /.singularity.d; a SIF may also carry the definition file and labels as
objects of their own, which win."""
import json
import os

from hpcrun.errors import ImageError
from hpcrun.images import sif as sifmod
from hpcrun.images.detect import open_image

META = "/.singularity.d"
FILES = {"runscript": "runscript", "deffile": "Singularity", "helpfile": "runscript.help",
         "startscript": "startscript", "test": "test"}
SIF_DEFFILE, SIF_LABELS = 0x4001, 0x4003


class _Squash:
    def __init__(self, image):
        from PySquashfsImage import SquashFsImage
        try:
            self.im = SquashFsImage.from_file(f"/proc/self/fd/{image.fd}", offset=image.offset)
        except Exception as e:  # the library raises plain exceptions on corrupt data
            raise ImageError(f"{image.path}: cannot read squashfs: {e}") from None

    def _node(self, path, depth=0):
        node = self.im.select(path)
        if node is not None and node.is_symlink and depth < 16:
            target = node.readlink()
            target = target if target.startswith("/") else os.path.join(os.path.dirname(path), target)
            return self._node(os.path.normpath(target), depth + 1)
        return node

    def read(self, path):
        node = self._node(path)
        return node.read_bytes().decode("utf-8", "replace") if node is not None and node.is_file else None

    def listdir(self, path):
        node = self._node(path)
        return sorted(c.name for c in node) if node is not None and node.is_dir else []

    def close(self):
        self.im.close()


class _Sandbox:
    def __init__(self, image):
        self.root = image.path

    def read(self, path):
        from hpcrun.runtime import safepath
        try:
            fd = safepath.open_in_root(self.root, path)
        except OSError:
            return None
        try:
            with open(f"/proc/self/fd/{fd}", encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None
        finally:
            os.close(fd)

    def listdir(self, path):
        from hpcrun.runtime import safepath
        try:
            fd = safepath.open_in_root(self.root, path)
        except OSError:
            return []
        try:
            return sorted(os.listdir(f"/proc/self/fd/{fd}"))
        except OSError:
            return []
        finally:
            os.close(fd)

    def close(self):
        pass


def metadata(path):
    """{labels: dict, environment: str, runscript, deffile, helpfile, startscript, test}."""
    image = open_image(path)
    try:
        reader = _Sandbox(image) if image.kind == "sandbox" else _Squash(image)
        try:
            out = {key: reader.read(f"{META}/{name}") for key, name in FILES.items()}
            env = []
            for name in reader.listdir(f"{META}/env"):
                if name.endswith(".sh"):
                    text = reader.read(f"{META}/env/{name}")
                    if text:
                        env.append(f"=== /.singularity.d/env/{name} ===\n{text}")
            out["environment"] = "\n".join(env) or None
            labels = reader.read(f"{META}/labels.json")
        finally:
            reader.close()
        if image.kind == "sif":   # objects in the SIF itself
            f = sifmod.SifFile(image.path, image.fd)
            for d in f.descriptors:
                if d.datatype in (SIF_DEFFILE, SIF_LABELS):
                    data = os.pread(image.fd, d.size, d.offset).decode("utf-8", "replace")
                    if d.datatype == SIF_DEFFILE:
                        out["deffile"] = data
                    else:
                        labels = data
        try:
            out["labels"] = json.loads(labels) if labels else {}
        except ValueError:
            raise ImageError(f"{path}: labels.json is not valid JSON") from None
        return out
    finally:
        image.close()


def render(meta, which):
    parts = []
    for key in which:
        value = meta.get(key)
        if key == "labels":
            parts.append("".join(f"{k}: {v}\n" for k, v in sorted(value.items())))
        elif value:
            parts.append(value if value.endswith("\n") else value + "\n")
    return "".join(parts)
