"""Parse bind specifications: SRC[:DST[:ro|rw]], comma lists, as Apptainer does;
`\\,` and `\\:` are a comma and a colon in a path (Apptainer's ParseBindPath)."""

import os

from hpcrun.errors import UsageError


class Bind:
    __slots__ = ("src", "dst", "readonly", "origin")

    def __init__(self, src, dst, readonly=False, origin="--bind"):
        self.src, self.dst, self.readonly, self.origin = src, dst, readonly, origin

    def __repr__(self):
        return f"Bind({self.src!r}, {self.dst!r}, ro={self.readonly})"

    def __eq__(self, other):
        return (self.src, self.dst, self.readonly) == (other.src, other.dst, other.readonly)


ESCAPES = (",", ":")


def split(text, sep):
    """Split at each `sep` not escaped by a backslash; escapes are kept for unescape()."""
    out, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and text[i + 1 : i + 2] in ESCAPES:
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def unescape(field):
    """`\\,` -> `,` and `\\:` -> `:`; any other backslash stays, as in Apptainer."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 2] in ESCAPES:
            i += 1
        out.append(field[i])
        i += 1
    return "".join(out)


def parse_one(spec, cwd, origin="--bind"):
    parts = [unescape(p) for p in split(spec, ":")]
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"{origin} {spec!r}: malformed bind", "use SRC[:DST[:ro|rw]] (\\: and \\, in names)")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else None
    opts = parts[2] if len(parts) > 2 else "rw"
    if len(parts) == 2 and parts[1] in ("ro", "rw"):
        dst, opts = None, parts[1]  # SRC:ro is shorthand for SRC:SRC:ro
    if opts not in ("ro", "rw"):
        raise UsageError(f"{origin} {spec!r}: unknown bind option {opts!r}", "use ro or rw")
    src = os.path.normpath(os.path.join(cwd, src))
    if dst is None:
        dst = src
    elif not dst.startswith("/"):
        raise UsageError(
            f"{origin} {spec!r}: destination {dst!r} is relative",
            "bind destinations are absolute paths inside the container",
        )
    return Bind(src, os.path.normpath(dst), opts == "ro", origin)


def parse(specs, cwd, origin="--bind"):
    """Parse a list of bind arguments, each possibly a comma-separated list. As in
    Apptainer, a bare `ro`/`rw` after a SRC:DST:OPT item is one more option of it
    (SRC:DST:rw,ro is read-only), not a path."""
    out = []
    for arg in specs:
        full = False  # the last item had all three fields
        for spec in split(arg, ","):
            spec = spec.strip()
            if spec in ("ro", "rw") and full:
                out[-1].readonly = out[-1].readonly or spec == "ro"
            elif spec:
                out.append(parse_one(spec, cwd, origin))
                full = len(split(spec, ":")) == 3
    return out
