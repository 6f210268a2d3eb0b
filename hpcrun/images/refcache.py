"""`exec|run|shell|inspect docker://REF` (and oras://): the image is pulled into a
content-addressed SIF cache, $XDG_CACHE_HOME/hpcrun/sif/<manifest digest>.sif, and run
from there, as Apptainer runs such references from its cache. The tag is resolved to a
digest on every use (a moving tag gets the new image, as in Apptainer, which checks the
manifest digest each time); an image already in the cache is not pulled again. Two
tasks pulling the same digest at once: a lock file per digest, the SIF placed by rename."""

import hashlib
import os
import stat

from hpcrun.errors import ImageError, UsageError

PULLED = ("docker://", "oras://")
REFUSED = {
    "library://": "the Sylabs library is not supported",
    "shub://": "Singularity Hub is closed (read-only archive since 2021)",
}


def resolve(ref, quiet=False):
    """The path of the cached SIF for ref, pulled first when the cache lacks it."""
    for scheme, why in REFUSED.items():
        if ref.startswith(scheme):
            raise UsageError(f"{ref}: {why}", "pull it with another tool, or use docker:// or oras://")
    scheme = next((s for s in PULLED if ref.startswith(s)), None)
    if scheme is None and os.path.lexists(ref):  # a file that merely has :// in its path
        return ref
    if scheme is None:
        raise UsageError(
            f"{ref}: unknown image reference scheme", "use a file, a directory, docker://REF or oras://REF"
        )
    from hpcrun.builders import registry

    host, repo, reference = registry.parse_ref(ref)
    digest = manifest_digest(registry.Registry(host, repo, quiet), reference, ref)
    top = sif_dir(registry)
    path = os.path.join(top, digest[7:] + ".sif")
    if _cached(path):
        return path
    import fcntl

    lock = os.open(
        os.path.join(top, digest[7:] + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another task may be pulling the same image
        if not _cached(path):
            _pull(f"{scheme}{host}/{repo}@{digest}", path, quiet)
    finally:
        os.close(lock)
    return path


def manifest_digest(reg, reference, ref):
    """The digest of the manifest reference names; for a multi-platform index, that of
    this machine's entry (what will run)."""
    from hpcrun.builders import registry
    from hpcrun.builders.oci import INDEX_TYPES

    with reg._open(f"{reg.base}/manifests/{reference}", registry.ACCEPT) as r:
        body = registry._read_capped(r, registry.MANIFEST_MAX, f"manifest {reference}")
        mtype = r.headers.get("Content-Type", "").split(";")[0]
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if reference.startswith("sha256:") and digest != reference:
        raise ImageError(f"manifest {reference} does not match its digest", "the registry is corrupt")
    import json

    try:
        data = json.loads(body)
    except ValueError:
        raise ImageError(f"{ref}: the manifest is not JSON") from None
    if isinstance(data, dict) and (mtype in INDEX_TYPES or "manifests" in data):
        return registry._digest(registry._pick(data, ref))
    return digest


def sif_dir(registry):
    """cache/sif, each level the caller's (or root's), as the blob cache's; the two levels
    hpcrun makes also not writable by others."""
    cache = registry.cache_dir()
    top = os.path.join(cache, "sif")
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        path = os.path.dirname(cache)
        registry._own_dir(path)
        for part in (os.path.basename(cache), "sif"):
            path = os.path.join(path, part)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            registry._own_dir(path)
            if os.stat(path).st_mode & 0o022:  # others could swap a SIF in after the check
                raise ImageError(
                    f"cache directory {path} is writable by others",
                    f"chmod go-w {path}, or set XDG_CACHE_HOME to a directory of your own",
                )
    except OSError as e:
        raise registry._write_error(e, top) from None
    return top


def _cached(path):
    """A regular file of ours, not a link (placed only complete, by rename)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise ImageError(f"cache entry {path} is not a file of yours", "remove it")
    return True


def _pull(ref, path, quiet):
    from hpcrun.build import build

    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.tmp"
    try:
        build(tmp, ref, quiet=quiet)
        os.rename(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
