"""`hpcrun build OUT SOURCE`: the build launcher. builders/source.py classifies SOURCE once,
builders/buildplan.py (pure) turns it into a list of steps, and `build` runs them top to
bottom in a private work directory next to OUT:

  fetch | copy | unsquash | debootstrap -> unpack -> metadata -> %setup -> %files ->
  sections -> %post -> %test -> squash (mksquashfs, SIF) | sandbox -> rename onto OUT

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
    fix_perms=False,
):
    """sandbox: OUT is a directory (Apptainer's --sandbox), all of it yours so `rm -rf`
    removes it. fakeroot: require a subuid range (else a ConfigError); without it the range
    is used when there is one, and root-only mapping is the fallback."""
    from hpcrun.builders.source import classify

    if compress not in COMPRESSORS:
        raise UsageError(f"--compress {compress}: unknown", f"use one of {', '.join(COMPRESSORS)}")
    classified = classify(source, build_args)
    _unused_build_args(classified, build_args, warn_unused_build_args, quiet)
    plan = build_plan(
        os.path.abspath(out), classified, _idmap(fakeroot), sandbox, notest, compress, reproducible, fix_perms
    )
    if dry_run:
        import json

        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
        return 0
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} exists", "use --force to replace it")
    if "squash" in plan.steps and not shutil.which("mksquashfs"):
        raise ImageError("mksquashfs is not installed", "install squashfs-tools")
    say = (
        (lambda msg: None)
        if quiet or not sys.stderr.isatty()
        else (lambda msg: sys.stderr.write(f"{errors.PROG}: {msg}\n"))
    )
    with Work(plan.out, plan.idmap) as work:
        state = State(work, say, quiet)
        for step in plan.steps:
            STEPS[step](plan, state)
    return 0


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
    """What the steps hand on: the work directory, the image config a source brought,
    layer paths fetched, messages."""

    def __init__(self, work, say, quiet):
        self.work, self.say, self.quiet = work, say, quiet
        self.config, self.layers = None, []

    def root(self):
        return inroot.Root(self.work.rootfs)


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


def step_mkroot(plan, st):
    os.mkdir(st.work.rootfs)


def step_copy(plan, st):
    """A sandbox directory as the source: copied in (its links as links, special files left out)."""
    os.mkdir(st.work.rootfs)
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
        st.work.rootfs,
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

    st.layers = [deffile.debootstrap(plan.source.definition, st.work.path, plan.idmap, st.quiet)]
    os.mkdir(st.work.rootfs)


def step_fetch(plan, st):
    """Layer files (in the work directory or the registry cache) and the image config."""
    from hpcrun.builders import oci

    src = plan.base()
    if src.kind == "registry":
        from hpcrun.builders import registry

        st.layers, st.config = registry.pull(src.ref, st.quiet, scratch=st.work.path)
    elif src.kind == "docker-archive":
        st.layers, st.config = oci.from_docker_archive(src.path, st.work.path)
    elif src.kind == "oci-archive":
        st.layers, st.config = oci.from_oci_archive(src.path, st.work.path, src.tag)
    elif src.kind == "oci":
        st.layers, st.config = oci.from_layout(src.path, src.tag)
    else:
        st.layers = [src.path]
    os.mkdir(st.work.rootfs)


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
                with layermod.open_tar(path, st.work.path) as tar:
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

    script = os.path.join(st.work.path, "setup.script")
    with open(script, "w") as f:
        f.write(plan.source.definition.sections["setup"] + "\n")
    os.chmod(script, 0o755)  # readable by root of the mapping too
    _as_owner(plan, lambda: deffile.setup(plan.source.definition, st.work.rootfs, plan.defdir(), script))


def step_files(plan, st):
    from hpcrun.builders import deffile

    _in_tree(plan, st, "%files", lambda root: deffile.files(plan.source.definition, root, plan.defdir()))


def step_sections(plan, st):
    from hpcrun.builders import deffile

    _in_tree(
        plan, st, "cannot write the definition's sections", lambda root: deffile.metadata(plan.source.definition, root)
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
        deffile.run_in_image("%post", st.work.rootfs, argv, writable=True, env=env)
    finally:
        _in_tree(plan, st, "cannot remove the %post script", lambda root: root.remove(deffile.POST_SCRIPT))


def step_labels(plan, st):
    from hpcrun.builders import deffile

    d = plan.source.definition
    _in_tree(plan, st, "cannot write the image labels", lambda root: deffile.labels(d, root, plan.reproducible))


def step_test(plan, st):
    """%test as `hpcrun test` runs it: /.singularity.d/test, through /bin/sh -e unless it
    names its own interpreter (a `#!` line or `%test -c SHELL`)."""
    from hpcrun.builders import deffile

    d = plan.source.definition
    first, _ = deffile.shebang(d, "test")
    argv = ["/bin/sh", "-e", "/.singularity.d/test"] if first == "#!/bin/sh" else ["/.singularity.d/test"]
    st.say("running %test")
    deffile.run_in_image("%test", st.work.rootfs, argv, writable=False)


def step_squash(plan, st):
    """mksquashfs (as root of the mapping when owners are kept, so they survive; else
    -all-root) into the work directory, the SIF around it there, then onto OUT."""
    tree = plan.source.path if plan.steps == ["squash"] else st.work.rootfs
    sqfs = os.path.join(st.work.path, "image.sqfs")
    args = ["mksquashfs", tree, sqfs, "-noappend", "-processors", str(os.cpu_count() or 1), "-comp", plan.compress]
    args += ["-mkfs-time", "0", "-all-time", "0"] if plan.reproducible else []
    args += [] if plan.owners else ["-all-root"]
    loud = sys.stderr.isatty() and not st.quiet
    args += [] if loud else ["-quiet", "-no-progress"]
    code, err = _as_owner(plan, lambda: _run(args, loud))
    if code != 0:
        _tool_failed(st, "mksquashfs failed", err)
    result = sqfs
    if plan.sif:
        from hpcrun.images.sif import write_sif

        result = os.path.join(st.work.path, "image.sif")
        try:
            if plan.reproducible:
                write_sif(result, sqfs, now=-62135596800, uuid_bytes=bytes(16))  # Go's zero time
            else:
                write_sif(result, sqfs)
        except OSError as e:
            raise st.work.failure(e, f"cannot write {plan.out}") from None
    _place(result, plan.out, st.work.path)


def step_sandbox(plan, st):
    if plan.chown_sandbox:
        # %post may have given files to subordinate ids: give everything to the caller
        # (root of the mapping), so the sandbox is theirs to change and to rm -rf.
        from hpcrun.runtime.idmap import call_mapped

        code, err = call_mapped(lambda: _run(["chown", "-R", "-h", "0:0", st.work.rootfs]), plan.idmap)
        if code != 0:
            raise ImageError(f"could not give the sandbox's files to you: {_last(err)}")
    trees.make_removable(st.work.rootfs, keep_modes=True)
    _place(st.work.rootfs, plan.out, st.work.path)


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
