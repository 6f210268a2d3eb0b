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
        """The Source whose files fill the tree: the sandbox OUT itself for --update, a
        definition's bootstrap, else the source."""
        if self.update:
            from hpcrun.builders.source import Source

            return Source("dir", self.out)
        return self.source.base if self.source.kind == "definition" else self.source

    def defdir(self):
        import os

        return os.path.dirname(self.source.path)

    def to_dict(self):
        d = dict(self.__dict__)
        d["source"] = self.source.to_dict()
        d["stages"] = [s.to_dict() for s in self.stages]
        return d


# what --section takes (Apptainer's RunSection names), besides all and none
SECTION_NAMES = ("setup", "files", "post", "environment", "runscript", "startscript", "help", "labels", "test")


def build_plan(
    out,
    source,
    idmap,
    sandbox=False,
    notest=False,
    compress="gzip",
    reproducible=False,
    update=False,
    sections=None,
    mksquashfs_args=(),
    fix_perms=False,
):
    """idmap: None when building as root, else the caller's map (mode 'subid' with a range,
    'root' for root mapped to the caller alone). sections: the --section names to run (None:
    all). update: OUT is an existing sandbox the (last stage's) sections run over, as a copy
    renamed onto it at the end (Apptainer skips the bootstrap)."""
    subid = idmap is not None and idmap["mode"] == "subid"
    # Owners from tarballs, layers and %post are kept as root, or as root of a subuid
    # mapping; an unprivileged sandbox is handed over all the caller's instead.
    owners = idmap is None or subid and not sandbox
    steps = _steps(source, sandbox, notest, sections, update, fix_perms=fix_perms)
    extra = list(mksquashfs_args) if "squash" in steps else []
    common = dict(
        sandbox=sandbox,
        idmap=idmap,
        owners=owners,
        # steps that write the tree run as root of the mapping when owners are kept
        mapped=owners and idmap is not None,
        reproducible=reproducible,
        sections=sections,
        update=False,
    )
    stages = [
        BuildPlan(
            out=None,  # a stage is no image of its own
            source=s,
            steps=_steps(s, sandbox, notest, sections, stage=True),
            name=s.definition.stage,
            dir=f"stage-{i}",
            root_only_post=False,
            stages=[],
            **common,
        )
        for i, s in enumerate(getattr(source, "stages", ()))
    ]
    direct = steps == ["squash"]  # mksquashfs straight from the source directory
    steps[:0] = (["probe"] if extra else []) + (["stages"] if stages else [])
    plan = BuildPlan(out=out, source=source, steps=steps, stages=stages, **common)
    plan.update, plan.direct = update, direct
    plan.chown_sandbox = sandbox and subid
    plan.root_only_post = (
        idmap is not None and idmap["mode"] == "root" and ("post" in steps or any("post" in s.steps for s in stages))
    )
    # -comp in --mksquashfs-args replaces --compress, as Apptainer's replaces its gzip
    plan.compress, plan.mksquashfs_args = (None if "-comp" in extra else compress), extra
    plan.sif = not sandbox and out.endswith(".sif")
    return plan


def _steps(source, sandbox, notest, sections, update=False, stage=False, fix_perms=False):
    """The steps of one stage: fill, metadata, the definition's sections, then (the last
    stage only) squash or sandbox."""
    base = source.base if source.kind == "definition" else source
    if source.kind == "dir" and not sandbox and not stage:
        return ["squash"]  # straight from the directory: nothing to add to it
    steps = ["copy"] if update else list(FILL["scratch" if base is None else base.kind])
    steps += ["fix_perms"] * fix_perms + ["metadata"]
    if source.kind == "definition":
        from hpcrun.builders import deffile

        d = source.definition

        def run(name):
            return sections is None or name in sections

        steps += ["stagefiles"] if deffile.stage_files(d) and run("files") else []
        steps += ["setup"] if d.sections.get("setup") and run("setup") else []
        steps += ["files"] if deffile.host_files(d) and run("files") else []
        steps += ["sections"] + (["post"] if d.sections.get("post") and run("post") else []) + ["labels"]
        steps += ["test"] if d.sections.get("test") and not notest and run("test") else []
    return steps if stage else steps + ["sandbox" if sandbox else "squash"]
