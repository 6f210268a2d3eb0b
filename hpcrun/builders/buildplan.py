"""Turn a build request (OUT, classified source, options, id map) into a build plan: the
fixed list of steps build.py runs, top to bottom. Pure code, printed by
`hpcrun build --dry-run`; the decisions made once here (what to fetch, whose files are
kept, which steps run as root of the subuid mapping) are never re-derived by the steps."""

# The step that puts the source's files into the root file system, per source kind.
FILL = {
    "scratch": ["mkroot"],
    "dir": ["copy"],
    "image": ["unsquash"],
    "debootstrap": ["debootstrap", "unpack"],
    "tarball": ["fetch", "unpack"],
    "docker-archive": ["fetch", "unpack"],
    "oci-archive": ["fetch", "unpack"],
    "oci": ["fetch", "unpack"],
    "registry": ["fetch", "unpack"],
}


class BuildPlan:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def base(self):
        """The Source whose files fill the tree: a definition's bootstrap, else the source."""
        return self.source.base if self.source.kind == "definition" else self.source

    def defdir(self):
        import os

        return os.path.dirname(self.source.path)

    def to_dict(self):
        d = dict(self.__dict__)
        d["source"] = self.source.to_dict()
        return d


def build_plan(out, source, idmap, sandbox=False, notest=False, compress="gzip", reproducible=False, fix_perms=False):
    """idmap: None when building as root, else the caller's map (mode 'subid' with a range,
    'root' for root mapped to the caller alone)."""
    subid = idmap is not None and idmap["mode"] == "subid"
    # Owners from tarballs, layers and %post are kept as root, or as root of a subuid
    # mapping; an unprivileged sandbox is handed over all the caller's instead.
    owners = idmap is None or subid and not sandbox
    base = source.base if source.kind == "definition" else source
    if source.kind == "dir" and not sandbox:
        steps = ["squash"]  # straight from the directory: nothing to add to it
    else:
        steps = list(FILL["scratch" if base is None else base.kind]) + ["fix_perms"] * fix_perms + ["metadata"]
        if source.kind == "definition":
            sections = source.definition.sections
            steps += [s for s in ("setup", "files") if sections.get(s)] + ["sections"]
            steps += (["post"] if sections.get("post") else []) + ["labels"]
            steps += ["test"] if sections.get("test") and not notest else []
        steps.append("sandbox" if sandbox else "squash")
    return BuildPlan(
        out=out,
        source=source,
        steps=steps,
        sandbox=sandbox,
        idmap=idmap,
        owners=owners,
        # steps that write the tree run as root of the mapping when owners are kept
        mapped=owners and idmap is not None,
        chown_sandbox=sandbox and subid,
        root_only_post=idmap is not None and idmap["mode"] == "root" and "post" in steps,
        compress=compress,
        reproducible=reproducible,
        sif=not sandbox and out.endswith(".sif"),
    )
