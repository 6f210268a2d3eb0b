"""Parse bind specifications: SRC[:DST[:ro|rw]], comma lists, as Apptainer does."""

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


def parse_one(spec, cwd, origin="--bind"):
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"{origin} {spec!r}: malformed bind", "use SRC[:DST[:ro|rw]]")
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
    """Parse a list of bind arguments, each possibly a comma-separated list."""
    out = []
    for arg in specs:
        for spec in arg.split(","):
            if spec.strip():
                out.append(parse_one(spec.strip(), cwd, origin))
    return out
