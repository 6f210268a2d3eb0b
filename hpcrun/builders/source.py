"""What a build's SOURCE is, found once (by prefix, then by content, never by file name):
the impure half of build planning, as host.py is for runs."""

import os
import re
import stat

from hpcrun.errors import UsageError

REGISTRY = ("docker://", "oras://")
ARCHIVES = {"docker-archive:": "docker-archive", "oci-archive:": "oci-archive", "oci:": "oci"}
KINDS = (
    "dir",
    "image",
    "tarball",
    "docker-archive",
    "oci-archive",
    "oci",
    "registry",
    "definition",
    "debootstrap",
    "scratch",
)
HINT = (
    "give a directory, a tarball, docker-archive:FILE, oci:DIR, oci-archive:FILE, docker://REF, "
    "oras://REF or a definition file"
)


class Source:
    """kind: one of KINDS. path: a file or directory (absolute); tag: of an OCI layout or
    archive; ref: a registry reference; definition and base: a definition file and the
    Source its Bootstrap names (None for scratch)."""

    __slots__ = ("kind", "path", "tag", "ref", "definition", "base", "stages")

    def __init__(self, kind, path=None, tag=None, ref=None, definition=None, base=None):
        self.kind, self.path, self.tag, self.ref = kind, path, tag, ref
        self.definition, self.base, self.stages = definition, base, []  # stages: the earlier ones

    def to_dict(self):
        d = {k: getattr(self, k) for k in ("kind", "path", "tag", "ref")}
        if self.kind == "definition":
            d["bootstrap"] = self.definition.header["bootstrap"].lower()
            d["sections"] = sorted(self.definition.sections)
            d["base"] = self.base.to_dict() if self.base else None
        return d


def classify(source, build_args=(), nested=False, update=False):
    """update: the last stage's bootstrap is not looked at (build --update skips it)."""
    if source.startswith(REGISTRY):
        return Source("registry", ref=source)
    for prefix, kind in ARCHIVES.items():
        if source.startswith(prefix):
            rest = source[len(prefix) :]
            rest = rest[2:] if rest.startswith("//") else rest  # docker-archive://FILE (cwltool's form)
            path, tag = _split_tag(rest) if kind != "docker-archive" else (rest, None)
            return Source(kind, _existing(path), tag)
    path = _existing(source)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return Source("dir", path)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"build source {source}: not a regular file or directory", HINT)
    head = _head(path)
    if head[:4] == b"hsqs" or head[32:42] == b"SIF_MAGIC\0":
        return Source("image", path)
    text = _text(head)
    if text is None or not re.search(r"^\s*bootstrap\s*:", text, re.IGNORECASE | re.MULTILINE):
        return Source("tarball", path)
    if nested:
        raise UsageError(
            f"{source}: a definition file's From: names another definition file",
            "build that one first and bootstrap from the image",
        )
    from hpcrun.builders import deffile

    with open(path, encoding="utf-8") as f:
        defs = deffile.parse_all(f.read(), source, build_args)
    stages = [_definition(path, d, not update or i < len(defs) - 1) for i, d in enumerate(defs)]
    stages[-1].stages = stages[:-1]  # a multi-stage file: the last stage becomes OUT
    return stages[-1]


def _definition(path, definition, with_base=True):
    from hpcrun.builders import deffile

    agent = definition.header["bootstrap"].lower()
    if agent == "scratch" or not with_base:
        base = None
    elif agent == "debootstrap":
        base = Source("debootstrap")
    else:
        base = classify(deffile.source_of(definition, os.path.dirname(path)), nested=True)
    return Source("definition", path, definition=definition, base=base)


def _head(path):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        return os.read(fd, 8192)
    finally:
        os.close(fd)


def _text(head):
    """The head as text, or None for binary data (a tarball has NUL bytes in its headers)."""
    if b"\0" in head:
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as e:
        return head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else None  # cut mid-character


def _existing(path):
    if not os.path.lexists(path) or not os.path.exists(path):
        raise UsageError(f"build source {path}: no such file or directory", HINT)
    return os.path.abspath(path)


def _split_tag(ref):
    if os.path.exists(ref) or ":" not in ref:
        return ref, None
    path, _, tag = ref.rpartition(":")
    return path, tag
