"""`hpcrun build OUT SOURCE`: the build launcher. builders/source.py classifies SOURCE once,
builders/buildplan.py (pure) turns it into a list of steps, and `build` runs them top to
bottom in a private work directory next to OUT:

  [probe --mksquashfs-args] -> [earlier stages, each in its own tree] ->
  fetch | copy | unsquash | debootstrap -> unpack -> metadata -> %files from -> %setup ->
  %files -> sections -> %post -> %test -> squash (mksquashfs, SIF) | sandbox -> rename onto OUT

Every write into the tree goes through inroot.Root. The work directory (mkdtemp, 0700)
holds every temporary file; a remover process forked before the first byte is written
deletes it even when hpcrun is killed; OUT appears only when complete, by rename (an OUT
that is a symlink is replaced, never written through)."""

import os
import shutil
import subprocess
import sys

from hpcrun import inroot, trees
from hpcrun.builders.buildplan import build_plan
from hpcrun import errors
from hpcrun.errors import ConfigError, HpcrunError, ImageError, UsageError

COMPRESSORS = ("gzip", "zstd", "lz4", "xz")


def build(
    out,
    source,
    force=False,
    quiet=False,
    build_args=(),
    notest=False,
    compress="gzip",
    reproducible=False,
    sandbox=False,
    fakeroot=False,
    dry_run=False,
    warn_unused_build_args=False,
    update=False,
    sections=(),
    mksquashfs_args="",
    fix_perms=False,
):
    """sandbox: OUT is a directory (Apptainer's --sandbox), all of it yours so `rm -rf`
    removes it. fakeroot: require a subuid range (else a ConfigError); without it the range
    is used when there is one, and root-only mapping is the fallback. update: run the
    definition over the sandbox OUT (Apptainer's --update; --force rebuilds instead).
    sections: --section's values (names, comma lists). mksquashfs_args: one string, split
    on white space as Apptainer does."""
    from hpcrun.builders.source import classify

    if compress not in COMPRESSORS:
        raise UsageError(f"--compress {compress}: unknown", f"use one of {', '.join(COMPRESSORS)}")
    update = update and not force  # as Apptainer: --force builds from scratch
    if update:
        _check_update(out, sandbox)
    run_sections = _sections(sections)
    classified = classify(source, build_args, update=update)
    _unused_build_args(classified, build_args, warn_unused_build_args, quiet)
    plan = build_plan(
        os.path.abspath(out),
        classified,
        _idmap(fakeroot),
        sandbox,
        notest,
        compress,
        reproducible,
        update,
        run_sections,
        (mksquashfs_args or "").split(),
        fix_perms,
    )
    if dry_run:
        import json

        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
        return 0
    if os.path.lexists(out) and not force and not update:
        raise UsageError(f"{out} exists", "use --force to replace it")
    if "squash" in plan.steps and not shutil.which("mksquashfs"):
        raise ImageError("mksquashfs is not installed", "install squashfs-tools")
    say = (
        (lambda msg: None)
        if quiet or not sys.stderr.isatty()
        else (lambda msg: sys.stderr.write(f"{errors.PROG}: {msg}\n"))
    )
    with Work(plan.out, plan.idmap) as work:
        state = State(work, say, quiet, work.rootfs, work.path)
        for step in plan.steps:
            STEPS[step](plan, state)
    return 0


def _check_update(out, sandbox):
    """Apptainer's checkBuildTarget for --update: only an existing sandbox directory."""
    if not sandbox:
        raise UsageError("--update: only sandbox update is supported: --sandbox is missing", "add --sandbox")
    if not os.path.lexists(out):
        raise UsageError(f"--update: could not update sandbox {out}: it does not exist", "build it first")
    if os.path.islink(out) or not os.path.isdir(out):
        raise UsageError(f"--update: only sandbox update is supported: {out} is not a directory")


def _sections(values):
    """--section NAME[,NAME]: None for all (the default), else the set to run; all and none
    stand alone (Apptainer's checkSections)."""
    from hpcrun.builders.buildplan import SECTION_NAMES

    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names or names == ["all"]:
        return None
    if ("all" in names or "none" in names) and len(names) > 1:
        raise UsageError(f"--section {','.join(names)}: all and none cannot go with other sections")
    bad = [n for n in names if n not in SECTION_NAMES + ("none",)]
    if bad:
        raise UsageError(f"--section {bad[0]}: unknown section", f"use all, none or {', '.join(SECTION_NAMES)}")
    return [] if names == ["none"] else sorted(set(names))


def _unused_build_args(source, build_args, warn, quiet):
    """A --build-arg that no {{ NAME }} uses fails the build, as Apptainer's does, unless
    --warn-unused-build-args."""
    given = [a.partition("=")[0] for a in build_args]
    used = source.definition.used if source.kind == "definition" else set()
    unused = sorted(set(given) - used, key=given.index)
    if not unused:
        return
    what = f"unused build args: {', '.join(unused)}"
    if not warn:
        raise UsageError(what, "remove them, or pass --warn-unused-build-args")
    if not quiet:
        sys.stderr.write(f"{errors.PROG}: warning: {what}\n")


def _idmap(fakeroot):
    """The user namespace map builds use (None when we are root). --fakeroot insists on a
    subuid range, as Apptainer's does."""
    if os.getuid() == 0:
        return None
    from hpcrun.runtime.idmap import build_idmap

    idmap = build_idmap()
    if fakeroot and idmap["mode"] != "subid":
        import pwd

        raise ConfigError(
            f"--fakeroot: no range for {pwd.getpwuid(os.getuid()).pw_name} in /etc/subuid and /etc/subgid",
            "ask your administrator for one, or build without --fakeroot",
        )
    return idmap


class Work:
    """The private work directory next to OUT, removed on every exit: normal, an error, a
    signal (TERM/HUP/INT raise, so this runs), or SIGKILL (the remover process)."""

    def __init__(self, out, idmap):
        self.out, self.idmap = out, idmap
        # OUT /dev/null (Apptainer's issue4943 check: build, keep nothing): work in $TMPDIR
        self.where = _tmpdir() if out == os.devnull else os.path.dirname(out)

    def __enter__(self):
        try:
            self.remover = trees.Remover(self.where, ".hpcrun-build-", self.idmap)
        except OSError as e:
            raise inroot.failure(e, f"cannot make a work directory in {self.where}") from None
        self.path = self.remover.top
        self.rootfs = os.path.join(self.path, "rootfs")
        self.old = _raise_on_signals()
        return self

    def __exit__(self, *exc):
        _restore_signals(self.old)
        self.remover.stop()  # removes the tree now, and waits

    def failure(self, e, what):
        return inroot.failure(e, f"{what} (in {self.where})")


class State:
    """What the steps of one stage hand on: the work directory, the stage's tree (rootfs)
    and its own directory for temporary files (tmp), the image config a source brought,
    layer paths fetched, messages; stage_roots: the trees of the named earlier stages."""

    def __init__(self, work, say, quiet, rootfs, tmp, stage_roots=None):
        self.work, self.say, self.quiet, self.rootfs, self.tmp = work, say, quiet, rootfs, tmp
        self.config, self.layers = None, []
        self.stage_roots = {} if stage_roots is None else stage_roots

    def root(self):
        return inroot.Root(self.rootfs)


class Interrupted(HpcrunError):
    pass


def _raise_on_signals():
    """SIGTERM/SIGHUP (scancel, a closed terminal) end a build like ^C: as an exception, so
    the work directory goes and child tools are killed (subprocess.run kills on one)."""
    import signal

    def handler(signum, _frame):
        raise Interrupted(f"build interrupted by signal {signum}", code=128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    return old


def _restore_signals(old):
    import signal

    for s, h in old.items():
        signal.signal(s, h)


def _as_owner(plan, fn):
    """fn(), as root of the subuid mapping when the plan keeps owners and we are not root."""
    if plan.mapped:
        from hpcrun.runtime.idmap import call_mapped

        return call_mapped(fn, plan.idmap)
    return fn()


# -- the steps, in the order a plan lists them --------------------------------------------


def step_probe(plan, st):
    """--mksquashfs-args tried on an empty tree first: a bad one fails in a second with
    mksquashfs's own words, not after the whole build."""
    empty, sqfs = os.path.join(st.tmp, "probe"), os.path.join(st.tmp, "probe.sqfs")
    os.mkdir(empty)
    code, err = _run(["mksquashfs", empty, sqfs, "-noappend", "-quiet", "-no-progress"] + plan.mksquashfs_args)
    os.rmdir(empty)
    if os.path.lexists(sqfs):
        os.unlink(sqfs)
    if code != 0:
        raise UsageError(
            f"--mksquashfs-args {' '.join(plan.mksquashfs_args)!r}: mksquashfs: {_last(err)}",
            "see mksquashfs -help",
        )


def step_stages(plan, st):
    """The earlier stages of a multi-stage definition, in order, each in its own tree in
    the work directory; only the named ones are kept for %files from."""
    for stage in plan.stages:
        tmp = os.path.join(st.work.path, stage.dir)
        os.mkdir(tmp)
        sub = State(st.work, st.say, st.quiet, os.path.join(tmp, "rootfs"), tmp, st.stage_roots)
        st.say(f"building stage {stage.name or stage.dir}")
        for step in stage.steps:
            STEPS[step](stage, sub)
        if stage.name:
            st.stage_roots[stage.name] = sub.rootfs


def step_mkroot(plan, st):
    os.mkdir(st.rootfs)


def step_copy(plan, st):
    """A sandbox directory as the source: copied in (its links as links, special files left out)."""
    os.mkdir(st.rootfs)
    with st.root() as root:
        try:
            root.copy_in(plan.base().path, "/")
        except OSError as e:
            raise st.work.failure(e, f"cannot copy {plan.base().path}") from None


def step_unsquash(plan, st):
    """A SIF or squashfs as the source: unsquashfs keeps owners (as root of the mapping)."""
    path = plan.base().path
    from hpcrun.images.detect import open_image

    image = open_image(path)
    args = [
        "unsquashfs",
        "-no-xattrs",
        "-no-progress",
        "-d",
        st.rootfs,
        "-o",
        str(image.offset),
        f"/proc/self/fd/{image.fd}",
    ]
    try:
        code, err = _as_owner(plan, lambda: _run(args, pass_fds=(image.fd,)))
    finally:
        image.close()
    if code != 0:
        _tool_failed(st, f"{path}: unsquashfs failed", err)


def step_debootstrap(plan, st):
    from hpcrun.builders import deffile

    st.layers = [deffile.debootstrap(plan.source.definition, st.tmp, plan.idmap, st.quiet)]
    os.mkdir(st.rootfs)


def step_fetch(plan, st):
    """Layer files (in the work directory or the registry cache) and the image config."""
    from hpcrun.builders import oci

    src = plan.base()
    if src.kind == "registry":
        from hpcrun.builders import registry

        st.layers, st.config = registry.pull(src.ref, st.quiet, scratch=st.work.path)
    elif src.kind == "docker-archive":
        st.layers, st.config = oci.from_docker_archive(src.path, st.tmp)
    elif src.kind == "oci-archive":
        st.layers, st.config = oci.from_oci_archive(src.path, st.tmp, src.tag)
    elif src.kind == "oci":
        st.layers, st.config = oci.from_layout(src.path, src.tag)
    else:
        st.layers = [src.path]
    os.mkdir(st.rootfs)


def step_unpack(plan, st):
    from hpcrun.builders import layers as layermod

    src = plan.base()
    label = src.ref or src.path or "debootstrap"
    n = len(st.layers)

    def unpack():
        skipped, lost = [], []
        with st.root() as root:
            for i, path in enumerate(st.layers, 1):
                st.say(f"unpacking layer {i}/{n}")
                with layermod.open_tar(path, st.tmp) as tar:
                    layermod.apply(tar, root, label if n == 1 else f"{label} layer {i}", skipped, plan.owners, lost)
        return skipped, lost

    skipped, lost = _as_owner(plan, unpack)
    if src.kind == "debootstrap":
        os.unlink(st.layers[0])  # unpacked: no need to hold it twice
    if skipped and not st.quiet:
        sys.stderr.write(
            f"{errors.PROG}: note: skipped {len(skipped)} device node(s)/FIFO(s) "
            f"(an unprivileged build cannot create them), e.g. /{skipped[0]}\n"
        )
    if lost and not plan.sandbox and not st.quiet:
        why = "their ids are outside your subuid range" if plan.owners else "keeping them needs a subuid range"
        sys.stderr.write(f"{errors.PROG}: note: {len(lost)} file(s) lose their owner ({why}), e.g. /{lost[0]}\n")


def step_fix_perms(plan, st):
    """--fix-perms: owner rwX on what the source put in the tree (Apptainer's FixPerms)."""
    from hpcrun.builders import layers

    _in_tree(plan, st, "--fix-perms", layers.fix_perms)


def step_metadata(plan, st):
    from hpcrun.builders import metadata

    _in_tree(plan, st, "cannot write the image metadata", lambda root: metadata.write(root, st.config))


def step_setup(plan, st):
    from hpcrun.builders import deffile

    script = os.path.join(st.tmp, "setup.script")
    with open(script, "w") as f:
        f.write(plan.source.definition.sections["setup"] + "\n")
    os.chmod(script, 0o755)  # readable by root of the mapping too
    _as_owner(plan, lambda: deffile.setup(plan.source.definition, st.rootfs, plan.defdir(), script))


def step_stagefiles(plan, st):
    from hpcrun.builders import deffile

    d = plan.source.definition

    def copy(root):
        others = {}
        try:
            for name, _src, _dst in deffile.stage_files(d):
                others.setdefault(name, inroot.Root(st.stage_roots[name]))
            deffile.files_from(d, root, others)
        finally:
            for other in others.values():
                other.close()

    _in_tree(plan, st, "%files from", copy)


def step_files(plan, st):
    from hpcrun.builders import deffile

    def note(msg):
        if not st.quiet:
            sys.stderr.write(f"{errors.PROG}: note: {msg}\n")

    _in_tree(plan, st, "%files", lambda root: deffile.files(plan.source.definition, root, plan.defdir(), note))


def step_sections(plan, st):
    from hpcrun.builders import deffile

    _in_tree(
        plan,
        st,
        "cannot write the definition's sections",
        lambda root: deffile.metadata(plan.source.definition, root, plan.sections),
    )


def step_post(plan, st):
    """%post from /.post.script in the tree (Apptainer's place), with an empty
    $APPTAINER_ENVIRONMENT file there for it to append to (a base image's is kept)."""
    from hpcrun.builders import deffile

    d = plan.source.definition
    if plan.root_only_post and not st.quiet:
        sys.stderr.write(
            f"{errors.PROG}: note: no /etc/subuid range: %post runs as root mapped to you only;"
            " chown to other ids will fail\n"
        )

    def prepare(root):
        root.write(deffile.POST_SCRIPT, d.sections["post"] + "\n", 0o755)
        if root.lstat(deffile.ENV_FILE.lstrip("/")) is None:
            root.write(deffile.ENV_FILE.lstrip("/"), "", 0o644)

    _in_tree(plan, st, "cannot write the %post script", prepare)
    st.say("running %post")
    env = deffile.section_env("/")
    try:
        argv = deffile.section_argv(d, "post", "/" + deffile.POST_SCRIPT)
        deffile.run_in_image("%post", st.rootfs, argv, writable=True, env=env)
    finally:
        _in_tree(plan, st, "cannot remove the %post script", lambda root: root.remove(deffile.POST_SCRIPT))


def step_labels(plan, st):
    from hpcrun.builders import deffile

    d = plan.source.definition
    own = plan.sections is None or "labels" in plan.sections

    def write(root):
        deffile.labels(d, root, plan.reproducible, own)

    _in_tree(plan, st, "cannot write the image labels", write)


def step_test(plan, st):
    """%test as `hpcrun test` runs it: /.singularity.d/test, through /bin/sh -e unless it
    names its own interpreter (a `#!` line or `%test -c SHELL`)."""
    from hpcrun.builders import deffile

    d = plan.source.definition
    first, _ = deffile.shebang(d, "test")
    argv = ["/bin/sh", "-e", "/.singularity.d/test"] if first == "#!/bin/sh" else ["/.singularity.d/test"]
    st.say("running %test")
    deffile.run_in_image("%test", st.rootfs, argv, writable=False)


def step_squash(plan, st):
    """mksquashfs (as root of the mapping when owners are kept, so they survive; else
    -all-root) into the work directory, the SIF around it there, then onto OUT."""
    tree = plan.source.path if plan.direct else st.rootfs
    sqfs = os.path.join(st.tmp, "image.sqfs")
    args = ["mksquashfs", tree, sqfs, "-noappend", "-processors", str(os.cpu_count() or 1)]
    args += ["-comp", plan.compress] if plan.compress else []
    args += ["-mkfs-time", "0", "-all-time", "0"] if plan.reproducible else []
    args += [] if plan.owners else ["-all-root"]
    loud = sys.stderr.isatty() and not st.quiet
    args += [] if loud else ["-quiet", "-no-progress"]
    args += plan.mksquashfs_args
    code, err = _as_owner(plan, lambda: _run(args, loud))
    if code != 0:
        _tool_failed(st, "mksquashfs failed", err)
    result = sqfs
    if plan.sif:
        from hpcrun.images.sif import write_sif

        result = os.path.join(st.tmp, "image.sif")
        try:
            if plan.reproducible:
                write_sif(result, sqfs, now=-62135596800, uuid_bytes=bytes(16))  # Go's zero time
            else:
                write_sif(result, sqfs)
        except OSError as e:
            raise st.work.failure(e, f"cannot write {plan.out}") from None
    _place(result, plan.out, st.tmp)


def step_sandbox(plan, st):
    if plan.chown_sandbox:
        # %post may have given files to subordinate ids: give everything to the caller
        # (root of the mapping), so the sandbox is theirs to change and to rm -rf.
        from hpcrun.runtime.idmap import call_mapped

        code, err = call_mapped(lambda: _run(["chown", "-R", "-h", "0:0", st.rootfs]), plan.idmap)
        if code != 0:
            raise ImageError(f"could not give the sandbox's files to you: {_last(err)}")
    trees.make_removable(st.rootfs, keep_modes=True)
    _place(st.rootfs, plan.out, st.tmp)


STEPS = {name[5:]: fn for name, fn in globals().items() if name.startswith("step_")}


def _in_tree(plan, st, what, fn):
    """fn(root) on the tree (as owner when the plan keeps owners); OSErrors as one line."""

    def go():
        with st.root() as root:
            try:
                fn(root)
            except OSError as e:
                raise st.work.failure(e, what) from None

    _as_owner(plan, go)


def _run(args, loud=False, pass_fds=()):
    """(exit status, stderr) of a tool; its stdout goes to the terminal only when loud."""
    from hpcrun.runtime.idmap import dies_with_us

    proc = subprocess.run(
        args,
        stdout=None if loud else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        text=True,
        errors="replace",
        preexec_fn=dies_with_us(),
    )
    if proc.stderr and loud:
        sys.stderr.write(proc.stderr)
    return proc.returncode, proc.stderr


def _last(err):
    return (err.strip().splitlines() or ["?"])[-1]


def _tool_failed(st, what, err):
    if "No space left" in err or "Disk quota exceeded" in err:
        raise inroot.disk_full(f"{what}: no space left in {st.work.where}")
    raise ImageError(f"{what}: {_last(err)}")


def _tmpdir():
    import tempfile

    return tempfile.gettempdir()


def _place(path, out, work):
    """rename path onto OUT. An OUT there (--force) goes into the work directory first if
    it is a directory; a file or link is replaced by the rename itself, never followed.
    OUT /dev/null: the result stays in the work directory, removed with it (Apptainer
    writes the image into the device)."""
    if out == os.devnull:
        return
    try:
        # a directory there, or anything where a directory goes (rename cannot swap kinds)
        if os.path.lexists(out) and (os.path.isdir(out) and not os.path.islink(out) or os.path.isdir(path)):
            os.rename(out, os.path.join(work, "replaced"))
        os.rename(path, out)
    except OSError as e:
        raise inroot.failure(e, f"cannot put the result at {out}") from None
