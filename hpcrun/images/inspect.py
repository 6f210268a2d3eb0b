"""`hpcrun inspect`: an image's metadata read without mounting it.

SIF and squashfs images are read with PySquashfsImage (at the partition's offset),
sandboxes through safepath (their symlinks resolve inside the image). Apptainer keeps
metadata under /.singularity.d; a SIF may also carry the definition file and labels as
objects of their own, which win."""

import json
import os

from hpcrun import errors
from hpcrun.errors import ImageError
from hpcrun.images import sif as sifmod
from hpcrun.images.detect import open_image

META = "/.singularity.d"
FILES = {
    "runscript": "runscript",
    "deffile": "Singularity",
    "helpfile": "runscript.help",
    "startscript": "startscript",
    "test": "test",
}
SIF_DEFFILE, SIF_LABELS = 0x4001, 0x4003
# At most this much of each metadata file or object is read: an image is anyone's, and
# a runscript of 9 GB (a sparse file costs nothing to ship) must not take 9 GB here.
LIMIT = 1 << 20


def _text(data, size, path, strict=False):
    """Decoded text of the first LIMIT bytes; a note says when the file had more (strict:
    refuse it instead, for data that is useless cut short)."""
    if size > LIMIT and strict:
        raise ImageError(
            f"{path} in the image is larger than {LIMIT >> 20} MiB ({size} bytes)",
            "inspect reads metadata of up to 1 MiB per file",
        )
    text = data[:LIMIT].decode("utf-8", "replace")
    if size > LIMIT:
        text += f"\n[{errors.PROG}: {path} truncated: {size} bytes, inspect shows the first {LIMIT >> 20} MiB]\n"
    return text


class _Head:
    """A regular file's inode limited to its first `blocks` data blocks (and no tail
    fragment), so that PySquashfsImage reads only those."""

    def __init__(self, inode, blocks):
        self._inode, self.blocks, self.frag_bytes = inode, blocks, 0

    def __getattr__(self, name):
        return getattr(self._inode, name)


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

    def read(self, path, strict=False):
        node = self._node(path)
        if node is None or not node.is_file:
            return None
        inode = node.inode
        if node.size > LIMIT:
            inode = _Head(inode, min(inode.blocks, LIMIT // self.im.sblk.block_size + 1))
        data = bytearray()
        try:
            for chunk in self.im.iter_file(inode):
                data += chunk
                if len(data) > LIMIT:
                    break
        except Exception as e:  # plain exceptions on corrupt data, as in __init__
            raise ImageError(f"cannot read {path} from the squashfs: {e}") from None
        return _text(bytes(data), node.size, path, strict)

    def listdir(self, path):
        node = self._node(path)
        return sorted(c.name for c in node) if node is not None and node.is_dir else []

    def close(self):
        self.im.close()


class _Sandbox:
    def __init__(self, image):
        self.root = image.path

    def read(self, path, strict=False):
        import stat
        from hpcrun.runtime import safepath

        try:
            fd = safepath.open_in_root(self.root, path)
        except OSError:
            return None
        try:  # the O_PATH fd pins the inode: checked regular, it cannot become a FIFO
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                data = f.read(LIMIT + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        return _text(data, st.st_size, path, strict)

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


def metadata(path, app=None, apps=None):
    """{labels: dict, environment: {path: text}, runscript, deffile, helpfile, startscript,
    test}. app: that SCIF app's instead, as {"apps": {app: {...}}} (an ImageError when the
    image has none of that name). apps: "list" adds {"apps": {name: {}}} for every app,
    "all" every app's metadata."""
    image = open_image(path)
    try:
        reader = _Sandbox(image) if image.kind == "sandbox" else _Squash(image)
        try:
            if app:
                if app not in list_apps(reader):
                    from hpcrun.errors import PROG

                    raise ImageError(f"no app {app!r} in {path}", f"list its apps: {PROG} inspect --list-apps IMAGE")
                return {"labels": {}, "environment": {}, "apps": {app: _app_meta(reader, app)}}
            out = {key: reader.read(f"{META}/{name}") for key, name in FILES.items()}
            if apps:
                out["apps"] = {n: _app_meta(reader, n) if apps == "all" else {} for n in list_apps(reader)}
            env, total = {}, 0
            for name in reader.listdir(f"{META}/env"):
                if is_env_file(name):
                    if total > LIMIT:  # many files: the limit holds for all of them together
                        more = f"more files, not shown: inspect shows {LIMIT >> 20} MiB"
                        env[f"{META}/env/"] = f"[{errors.PROG}: {more}]\n"
                        break
                    text = reader.read(f"{META}/env/{name}")
                    if text:
                        env[f"{META}/env/{name}"] = text
                        total += len(text)
            out["environment"] = env
            labels = reader.read(f"{META}/labels.json", strict=True)
        finally:
            reader.close()
        if image.kind == "sif":  # objects in the SIF itself
            f = sifmod.SifFile(image.path, image.fd)
            for d in f.descriptors:
                if d.datatype in (SIF_DEFFILE, SIF_LABELS):
                    data = _text(
                        os.pread(image.fd, min(d.size, LIMIT + 1), d.offset),
                        d.size,
                        f"SIF object {d.id}",
                        strict=d.datatype == SIF_LABELS,
                    )
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


def list_apps(reader):
    """The SCIF apps: /scif/apps/NAME with a scif/ metadata directory (as Apptainer's
    inspect). Names are image content: only plain ones are shown."""
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")
    names = [n for n in reader.listdir("/scif/apps") if set(n) <= ok and not n.startswith(".")]
    return [n for n in names if reader.listdir(f"/scif/apps/{n}/scif")]


def _app_meta(reader, name):
    """An app's labels, scripts, help and %appenv file, from /scif/apps/NAME/scif."""
    meta = f"/scif/apps/{name}/scif"
    out = {key: reader.read(f"{meta}/{file}") for key, file in FILES.items() if key != "deffile"}
    env = f"{meta}/env/90-environment.sh"
    text = reader.read(env)
    out["environment"] = {env: text} if text else {}
    labels = reader.read(f"{meta}/labels.json", strict=True)
    try:
        out["labels"] = json.loads(labels) if labels else {}
    except ValueError:
        raise ImageError(f"app {name}: labels.json is not valid JSON") from None
    return out


def is_env_file(name):
    """The environment files Apptainer's inspect shows: the image config's and %environment's."""
    return name.endswith(".sh") and (name.startswith("10-docker") or name.startswith("9") and "-environment" in name)


def render(meta, which):
    parts = []
    for key in which:
        value = meta.get(key)
        if key == "labels":
            parts.append("".join(f"{k}: {v}\n" for k, v in sorted(value.items())))
        elif key == "environment":
            parts.append("\n".join(f"=== {path} ===\n{text}" for path, text in value.items()))
        elif value:
            parts.append(value if value.endswith("\n") else value + "\n")
    return "".join(parts)


# Apptainer's JSON field order (pkg/inspect/metadata.go); empty fields are left out.
JSON_ORDER = ("environment", "labels", "runscript", "test", "helpfile", "deffile", "startscript")


def render_json(meta, which):
    """`inspect --json` as Apptainer prints it: {"data": {"attributes": {...}}, "type": "container"}."""
    import json

    attrs = {}
    if meta.get("apps"):  # Apptainer's first field; an app's own fields in its order
        attrs["apps"] = {n: _attributes(a, APP_ORDER, which) for n, a in sorted(meta["apps"].items())}
    attrs.update(_attributes(meta, JSON_ORDER, which))
    return json.dumps({"data": {"attributes": attrs}, "type": "container"}, indent="\t")


APP_ORDER = ("environment", "labels", "runscript", "startscript", "test", "helpfile")


def _attributes(meta, order, which):
    attrs = {k: meta[k] for k in order if k in which and meta.get(k)}
    for k in ("runscript", "test", "helpfile", "deffile", "startscript"):  # as its setAttribute does
        if k in attrs:
            attrs[k] = attrs[k].rstrip("\n")
    if "environment" in attrs:
        attrs["environment"] = {path: text.rstrip("\n") for path, text in attrs["environment"].items()}
    if "labels" in attrs:
        attrs["labels"] = {k: attrs["labels"][k] for k in sorted(attrs["labels"])}
    return attrs
