"""`hpcrun build OUT SOURCE`: OUT ending in .sif gets a SIF (squashfs primary partition,
host arch), anything else a plain squashfs. Sources: a sandbox directory, a root file
system tarball (.tar, .tar.gz, .tar.xz, .tar.zst), `docker-archive:FILE`,
`oci:DIR[:tag]`, `oci-archive:FILE[:tag]`, or an Apptainer definition file (recognised
by its `Bootstrap:` header). Work happens in a hidden directory next to OUT, which appears
only when complete; nothing is left on failure."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from hpcrun.errors import ConfigError, ImageError, UsageError

PREFIXES = ("docker-archive:", "oci-archive:", "oci:", "docker://", "oras://")


COMPRESSORS = ("gzip", "zstd", "lz4", "xz")


def build(out, source, force=False, quiet=False, build_args=(), notest=False, compress="gzip",
          reproducible=False, sandbox=False, fakeroot=False):
    """sandbox: OUT is a directory (Apptainer's --sandbox), all of it yours so `rm -rf`
    removes it. fakeroot: require a subuid range (else a ConfigError); without it the range
    is used when there is one, and root-only mapping is the fallback."""
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} exists", "use --force to overwrite it")
    if not sandbox and not shutil.which("mksquashfs"):
        raise ImageError("mksquashfs is not installed", "install squashfs-tools")
    if compress not in COMPRESSORS:
        raise UsageError(f"--compress {compress}: unknown", f"use one of {', '.join(COMPRESSORS)}")
    sqopts = {"compress": compress, "reproducible": reproducible}
    say = (lambda msg: None) if quiet or not sys.stderr.isatty() else (
        lambda msg: sys.stderr.write(f"hpcrun: {msg}\n"))
    definition = _definition(source, build_args)
    idmap = _idmap(fakeroot)
    if definition is None and os.path.isdir(source) and not source.startswith(PREFIXES) and not sandbox:
        return squash(source, out, quiet, **sqopts)
    work = tempfile.mkdtemp(prefix=".hpcrun-build-", dir=os.path.dirname(os.path.abspath(out)))
    # Keep the owners a tarball or %post gives files: as root, or as root of a user
    # namespace mapping the subuid range. An unprivileged sandbox is handed over all yours.
    owners = idmap is None or not sandbox and idmap["mode"] == "subid"
    try:
        from hpcrun.builders import metadata
        rootfs = os.path.join(work, "rootfs")
        if definition is None:
            config = populate(source, rootfs, work, quiet, say, owners, idmap, not sandbox)
            metadata.write(rootfs, config)
            return _finish(rootfs, out, work, quiet, idmap, owners, sandbox, sqopts)
        from hpcrun.builders import deffile
        defdir = os.path.dirname(os.path.abspath(source))
        if definition.header["bootstrap"].lower() == "debootstrap":
            src = deffile.debootstrap(definition, work, idmap, quiet)
        else:
            src = deffile.source_of(definition, defdir)
        if src is None:
            os.mkdir(rootfs)
        else:
            config = populate(src, rootfs, work, quiet, say, owners, idmap, not sandbox)
            metadata.write(rootfs, config)
            if src.startswith(work):
                os.unlink(src)      # the debootstrap tarball: unpacked, no need to hold it twice
        metadata.write(rootfs)
        # %setup and %files among files of subordinate ids, as Apptainer's fakeroot
        _as_owner(lambda: deffile.apply_sections(definition, rootfs, defdir), owners, idmap)
        if idmap and idmap["mode"] == "root" and not quiet:
            sys.stderr.write("hpcrun: note: no /etc/subuid range: %post runs as root mapped to you only; "
                             "chown to other ids will fail\n")
        if definition.sections.get("post"):
            say("running %post")
            deffile.run_in_image("%post", rootfs, definition.sections["post"], writable=True)
        if definition.sections.get("test") and not notest:
            say("running %test")
            deffile.run_in_image("%test", rootfs, definition.sections["test"], writable=False)
        return _finish(rootfs, out, work, quiet, idmap, owners, sandbox, sqopts)
    finally:
        _remove(work, idmap)


def _idmap(fakeroot):
    """The user namespace map builds use (None when we are root). --fakeroot insists on a
    subuid range, as Apptainer's does."""
    if os.getuid() == 0:
        return None
    from hpcrun.runtime.idmap import build_idmap
    idmap = build_idmap()
    if fakeroot and idmap["mode"] != "subid":
        import pwd
        raise ConfigError(f"--fakeroot: no range for {pwd.getpwuid(os.getuid()).pw_name} in /etc/subuid "
                          "and /etc/subgid", "ask your administrator for one, or build without --fakeroot")
    return idmap


def _as_owner(fn, owners, idmap):
    """fn(), as root of the subuid mapping when files must keep their owners and we are
    not root ourselves."""
    if owners and idmap:
        from hpcrun.runtime.idmap import call_mapped
        return call_mapped(fn, idmap)
    return fn()


def _finish(rootfs, out, work, quiet, idmap, owners, sandbox, sqopts):
    if not sandbox:
        return squash(rootfs, out, quiet, idmap, owners=owners, **sqopts)
    if idmap and idmap["mode"] == "subid":     # (as root, owners are kept as Apptainer does)
        # %post may have given files to subordinate ids: give everything to the caller
        # (root of the mapping), so the sandbox is theirs to change and to rm -rf.
        from hpcrun.runtime.idmap import run_mapped
        if run_mapped(["chown", "-R", "-h", "0:0", rootfs], idmap) != 0:
            raise ImageError("could not give the sandbox's files to you (chown failed, see above)")
    from hpcrun import trees
    trees.make_removable(rootfs, keep_modes=True)
    if os.path.lexists(out):            # --force: the old OUT goes with the work directory
        os.rename(out, os.path.join(work, "replaced"))
    os.rename(rootfs, out)
    return 0


def populate(source, rootfs, work, quiet, say, owners=False, idmap=None, note_owners=True):
    """Fill rootfs (not existing yet for directories and images) from source; returns the
    OCI image config, if the source had one. owners: tarball and layer members keep their
    owners (we are root, or idmap maps a subuid range: unpacked as root of it); note_owners:
    say when they cannot."""
    from hpcrun.builders import layers as layermod, oci
    if os.path.isdir(source) and not source.startswith(PREFIXES):
        try:
            shutil.copytree(source, rootfs, symlinks=True)
        except (shutil.Error, OSError) as e:
            first = e.args[0][0] if isinstance(e, shutil.Error) and e.args and e.args[0] else e
            raise ImageError(f"cannot copy {source}: {first}") from None
        return None
    if not source.startswith(PREFIXES) and os.path.isfile(source) and _is_image(source):
        _as_owner(lambda: _unsquash(source, rootfs), owners, idmap)   # unsquashfs keeps owners as root
        return None
    os.makedirs(rootfs, exist_ok=True)
    config = None
    if source.startswith(("docker://", "oras://")):
        from hpcrun.builders import registry
        paths, config = registry.pull(source, quiet)
    elif source.startswith("docker-archive:"):
        paths, config = oci.from_docker_archive(_existing(source[15:]), work)
    elif source.startswith("oci-archive:"):
        path, tag = _split_tag(source[12:])
        paths, config = oci.from_oci_archive(_existing(path), work, tag)
    elif source.startswith("oci:"):
        path, tag = _split_tag(source[4:])
        paths, config = oci.from_layout(_existing(path), tag)
    elif os.path.isfile(source):
        paths = [source]
    else:
        raise UsageError(f"build source {source!r}: no such file or directory",
                         "give a directory, a tarball, docker-archive:FILE, oci:DIR, oci-archive:FILE "
                         "or a definition file")
    dest = os.path.realpath(rootfs)

    def unpack():
        skipped, lost = [], []
        for i, path in enumerate(paths, 1):
            say(f"unpacking layer {i}/{len(paths)}")
            with layermod.open_tar(path, work) as tar:
                layermod.apply(tar, dest, source if len(paths) == 1 else f"{source} layer {i}", skipped,
                               owners, lost)
        return skipped, lost
    skipped, lost = _as_owner(unpack, owners, idmap)
    if skipped and not quiet:
        sys.stderr.write(f"hpcrun: note: skipped {len(skipped)} device node(s)/FIFO(s) "
                         f"(an unprivileged build cannot create them), e.g. /{skipped[0]}\n")
    if lost and note_owners and not quiet:
        why = "their ids are outside your subuid range" if owners else "keeping them needs a subuid range"
        sys.stderr.write(f"hpcrun: note: {len(lost)} file(s) lose their owner ({why}), e.g. /{lost[0]}\n")
    return config


def _definition(source, build_args):
    if source.startswith(PREFIXES) or not os.path.isfile(source):
        return None
    with open(source, "rb") as f:
        head = f.read(8192)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not re.search(r"^\s*bootstrap\s*:", text, re.IGNORECASE | re.MULTILINE):
        return None
    from hpcrun.builders import deffile
    with open(source, encoding="utf-8") as f:
        return deffile.parse(f.read(), source, build_args)


def _is_image(path):
    with open(path, "rb") as f:
        head = f.read(64)
    return head[:4] == b"hsqs" or head[32:42] == b"SIF_MAGIC\0"


def _unsquash(path, rootfs):
    from hpcrun.images.detect import open_image
    image = open_image(path)
    try:
        proc = subprocess.run(["unsquashfs", "-no-xattrs", "-no-progress", "-d", rootfs, "-o", str(image.offset),
                               f"/proc/self/fd/{image.fd}"], pass_fds=(image.fd,), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    finally:
        image.close()
    if proc.returncode != 0:
        raise ImageError(f"{path}: unsquashfs failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def _existing(path):
    if not os.path.exists(path):
        raise UsageError(f"build source {path}: no such file or directory")
    return path


def _split_tag(ref):
    if os.path.exists(ref) or ":" not in ref:
        return ref, None
    path, _, tag = ref.rpartition(":")
    return path, tag


def _remove(work, idmap):
    from hpcrun import trees
    trees.remove(work)
    if os.path.exists(work) and idmap and idmap["mode"] == "subid":
        from hpcrun.runtime.idmap import run_mapped   # files owned by subordinate ids
        run_mapped(["rm", "-rf", work], idmap)


def squash(rootfs, out, quiet, idmap=None, owners=False, compress="gzip", reproducible=False):
    """mksquashfs with all cores. With a subuid map it runs as root of that user namespace,
    so files unpacked or chowned (%post) to other ids keep their owners in the image;
    owners=False makes every file root's (-all-root).
    reproducible: fixed times in the squashfs and a zero UUID and times in the SIF, so the
    same inputs give the same bytes."""
    sif = out.endswith(".sif")
    sqfs = out + ".sqfs.tmp" if sif else out + ".tmp"
    mapped = idmap is not None and idmap["mode"] == "subid"
    args = ["mksquashfs", rootfs, sqfs, "-noappend", "-processors", str(os.cpu_count() or 1), "-comp", compress]
    if reproducible:
        args += ["-mkfs-time", "0", "-all-time", "0"]
    args += [] if owners else ["-all-root"]
    loud = sys.stderr.isatty() and not quiet
    if not loud:
        args += ["-quiet", "-no-progress"]
    try:
        if mapped:
            from hpcrun.runtime.idmap import run_mapped
            if run_mapped(args, idmap) != 0:
                raise ImageError("mksquashfs failed (see above)")
        else:
            proc = subprocess.run(args, stdout=None if loud else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
            if proc.returncode != 0:
                raise ImageError(f"mksquashfs failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        if sif:
            from hpcrun.images.sif import write_sif
            if reproducible:
                write_sif(out, sqfs, now=-62135596800, uuid_bytes=bytes(16))  # Go's zero time
            else:
                write_sif(out, sqfs)
        else:
            os.replace(sqfs, out)
    finally:
        if os.path.exists(sqfs):
            os.unlink(sqfs)
    return 0
