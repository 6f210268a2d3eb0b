"""Pull images over the OCI distribution API (`docker://REF`, `oras://REF`).

Authentication answers the registry's 401 challenge: HTTP Basic with the user's credentials
(see auth.py), or a bearer token from the challenge's realm (anonymous, or asked for with
the credentials); the Authorization header is not sent on to redirects to other hosts.
Manifest lists and OCI indexes are resolved to the host platform, every blob verified
against its sha256 digest and declared size and kept in a content-addressed cache
($XDG_CACHE_HOME/hpcrun/blobs/sha256/HEX) that later pulls reuse, after hashing it again.
Nothing is read past a blob's declared size, a manifest's or config's 4 MiB or a token
answer's 1 MiB: registry answers are hostile input. Registries on loopback (localhost,
127.0.0.0/8, ::1) are spoken to over plain HTTP, as Docker does; everything else over HTTPS."""

import errno
import hashlib
import http.client
import ipaddress
import json
import os
import re
import stat
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from hpcrun.builders import auth
from hpcrun.builders.oci import GOARCH, INDEX_TYPES, LAYER_TYPES
from hpcrun import errors
from hpcrun.errors import ImageError, UsageError

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
LOOKUP = object()  # Registry(creds=LOOKUP): find the user's credentials when challenged
MANIFEST_MAX = 4 << 20  # manifests, indexes, image configs (containerd's limit)
TOKEN_MAX = 1 << 20  # a token service's JSON answer
CHUNK = 1 << 20


class SameOriginAuth(urllib.request.HTTPRedirectHandler):
    """Keep the Authorization header (an unredirected header) on a redirect to the same scheme,
    host and port, as Go's client does; drop it elsewhere: blobs are often redirected to a CDN,
    which must not see the registry's credentials or token."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        value = req.unredirected_hdrs.get("Authorization")
        same = urllib.parse.urlsplit(newurl)[:2] == urllib.parse.urlsplit(req.full_url)[:2]
        if new is not None and value and same:
            new.add_unredirected_header("Authorization", value)
        return new


OPENER = urllib.request.build_opener(SameOriginAuth)


def cache_dir(env=os.environ):
    # APPTAINER_CACHEDIR (or SINGULARITY_): where Apptainer users put the cache (home quotas are small)
    own = env.get("APPTAINER_CACHEDIR") or env.get("SINGULARITY_CACHEDIR")
    if own:
        return os.path.join(own, "hpcrun")
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hpcrun")


def cache_for(scratch, env=os.environ):
    """The blob cache a pull uses: the user's, unless the cache is disabled
    (APPTAINER_DISABLE_CACHE, --disable-cache) or cannot be written (a read-only home, as
    on grids): then `scratch/cache`, in the build's private work directory, gone with it.
    Apptainer behaves the same (e2e/cmdenvvars: DisableCache, ReadOnlyCacheDir)."""
    disabled = (env.get("APPTAINER_DISABLE_CACHE") or env.get("SINGULARITY_DISABLE_CACHE") or "").strip().lower()
    top = cache_dir(env)
    if scratch is None or disabled not in ("1", "t", "true", "yes", "y"):
        try:
            os.makedirs(top, mode=0o700, exist_ok=True)
            if os.access(top, os.W_OK | os.X_OK) or scratch is None:
                return top
        except OSError:
            if scratch is None:
                return top  # the caller's own error says what is wrong with it
    return os.path.join(scratch, "cache")


def parse_ref(ref):
    """docker://[host[:port]/]repo[:tag][@digest] -> (host, repo, reference)."""
    for scheme in ("docker://", "oras://"):
        if ref.startswith(scheme):
            ref = ref[len(scheme) :]
            break
    else:
        raise UsageError(f"{ref!r}: not a registry reference", "use docker://HOST/REPO:TAG")
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, rest
    else:
        host, repo = "registry-1.docker.io", ref if "/" in ref else "library/" + ref
    tag = "latest"
    if ":" in repo.rsplit("/", 1)[-1]:
        repo, tag = repo.rsplit(":", 1)
    if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repo):
        raise UsageError(f"{ref!r}: invalid repository name {repo!r}")
    return host, repo, digest or tag


def _loopback(host):
    """host, host:port, [v6]:port or a bare IPv6 literal: exactly localhost, or a loopback
    address (a name like 127.evil.example is not: DNS decides where it goes)."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.split(":")[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (not is_loopback before 3.13)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _chunks(r, limit, what):
    """r's body in chunks until it ends or more than limit bytes came (the caller checks)."""
    done = 0
    while done <= limit:
        try:
            chunk = r.read(min(CHUNK, limit + 1 - done))
        except (OSError, http.client.HTTPException) as e:
            raise ImageError(f"{what}: download failed ({e or type(e).__name__})") from None
        if not chunk:
            return
        done += len(chunk)
        yield chunk


def _read_capped(r, cap, what):
    body = b"".join(_chunks(r, cap, what))
    if len(body) > cap:
        raise ImageError(f"{what} is larger than {cap >> 20} MiB", "the registry sent more than an image needs")
    return body


def _digest(desc):
    """A descriptor's digest: sha256:HEX only (it becomes a URL path and a cache file name)."""
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return digest


def _descriptor(desc):
    """-> (digest, hex, size) of a manifest's descriptor: a sha256 digest and a size are required."""
    digest = _digest(desc)
    hexd = digest[7:]
    size = desc.get("size")
    if type(size) is not int or size < 0:  # not bool, not float
        raise ImageError(f"blob {digest}: the manifest gives no valid size ({size!r})")
    return digest, hexd, size


def _write_error(e, top):
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        from hpcrun.errors import DiskFullError

        return DiskFullError(f"disk full: cannot write {top}", "free space there, or set XDG_CACHE_HOME elsewhere")
    return ImageError(f"cannot write {top}: {e.strerror or e}")


def _blob_dir(cache):
    """cache/blobs/sha256, made if missing. Each level from cache's parent down must be the
    user's (or root's), as must a symlink on the way: another user's would let them swap a
    blob after it was verified."""
    top = os.path.join(cache, "blobs", "sha256")
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        path = os.path.dirname(cache)
        _own_dir(path)
        for part in (os.path.basename(cache), "blobs", "sha256"):
            path = os.path.join(path, part)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            _own_dir(path)
    except OSError as e:
        raise _write_error(e, top) from None
    return top


def _own_dir(path):
    me = (os.geteuid(), 0)
    link, st = os.lstat(path), os.stat(path)
    if (stat.S_ISLNK(link.st_mode) and link.st_uid not in me) or st.st_uid not in me:
        raise ImageError(
            f"cache directory {path} belongs to another user",
            "remove it, or set XDG_CACHE_HOME to a directory of your own",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ImageError(f"cache directory {path} is not a directory")


def _intact(path, hexd, size):
    """Is path a regular file (not a symlink: opened O_NOFOLLOW) of this size and sha256?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        os.close(fd)
        return False
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() == hexd


class Registry:
    """One repository (or, with repo None, just the registry's /v2/ root, for `registry login`).
    creds: Credentials to use; by default they are looked up (auth.lookup) at the first 401."""

    def __init__(self, host, repo, quiet=True, creds=LOOKUP):
        self.root = f"{'http' if _loopback(host) else 'https'}://{host}/v2/"
        self.base = self.root + (repo or "")
        self.host, self.repo, self.quiet, self.creds = host, repo, quiet, creds
        self.authorization = None  # the Authorization header once a challenge was answered

    def _open(self, url, accept=None):
        for attempt in range(2):
            req = urllib.request.Request(url)
            if accept:
                req.add_header("Accept", accept)
            if self.authorization:
                req.add_unredirected_header("Authorization", self.authorization)
            try:
                return OPENER.open(req, timeout=60)
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0:
                    self._login(e.headers.get("WWW-Authenticate", ""))
                    continue
                if e.code in (401, 403):
                    raise auth.refused(self.host, self._creds(), self.repo) from None
                raise ImageError(
                    f"{url}: registry answered {e.code} {e.reason}", "check the reference and your access"
                ) from None
            except (urllib.error.URLError, OSError) as e:
                raise ImageError(f"{url}: cannot reach the registry ({getattr(e, 'reason', e)})") from None

    def _creds(self):
        if self.creds is LOOKUP:
            self.creds = auth.lookup(self.host)
        return self.creds

    def _login(self, challenge):
        """Answer a 401's WWW-Authenticate: Basic with the credentials, Bearer with a token
        from the realm (asked with the credentials as Basic auth when there are any)."""
        scheme = challenge.split(" ", 1)[0].lower()
        creds = self._creds()
        if scheme == "basic":
            if not creds:
                raise auth.refused(self.host, None, self.repo)
            self.authorization = creds.basic()
            return
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if scheme != "bearer" or "realm" not in params:
            raise ImageError(f"{self.host}: unsupported authentication challenge {scheme or 'none'!r}")
        realm = params["realm"]
        self._check_realm(realm, creds)
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        if self.repo:
            query.setdefault("scope", f"repository:{self.repo}:pull")
        req = urllib.request.Request(realm + "?" + urllib.parse.urlencode(query))
        if creds:
            req.add_unredirected_header("Authorization", creds.basic())
        try:
            with OPENER.open(req, timeout=60) as r:
                data = json.loads(_read_capped(r, TOKEN_MAX, f"the answer of token service {realm}"))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise auth.refused(self.host, creds, self.repo) from None
            raise ImageError(f"token request to {realm} failed ({e.code} {e.reason})") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageError(f"token request to {realm} failed ({getattr(e, 'reason', e)})") from None
        token = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not token:
            raise ImageError(f"token service {realm} answered without a token")
        self.authorization = f"Bearer {token}"

    def _check_realm(self, realm, creds):
        """A token service is an http(s) URL with a plain host[:port] (no user@: that hides
        the real host); credentials go to it over HTTPS, or over HTTP to loopback only."""
        try:
            url = urllib.parse.urlsplit(realm)
            ok = url.scheme in ("http", "https") and url.hostname and "@" not in url.netloc
        except ValueError:
            ok = False
        if not ok:
            raise ImageError(f"{self.host}: token service {realm!r} is not an http(s) URL")
        if creds and url.scheme != "https" and not _loopback(url.netloc):
            raise ImageError(
                f"{self.host}: token service {realm} is not HTTPS",
                "hpcrun sends credentials only over HTTPS or to loopback",
            )

    def check(self):
        """GET /v2/ (authenticating as needed): raises unless the registry lets us in."""
        with self._open(self.root):
            pass

    def manifest(self, reference):
        with self._open(f"{self.base}/manifests/{reference}", ACCEPT) as r:
            body = _read_capped(r, MANIFEST_MAX, f"manifest {reference}")
            mtype = r.headers.get("Content-Type", "").split(";")[0]
        if reference.startswith("sha256:") and "sha256:" + hashlib.sha256(body).hexdigest() != reference:
            raise ImageError(f"manifest {reference} does not match its digest", "the registry is corrupt")
        try:
            data = json.loads(body)
        except ValueError:
            raise ImageError(f"manifest {reference} is not JSON") from None
        if not isinstance(data, dict):
            raise ImageError(f"manifest {reference} is not a JSON object")
        return data, mtype

    def blob(self, desc, cache, cap=None):
        """The cached blob's path, fetched and verified unless the cache has it intact.
        cap: refuse a declared size above it (image configs)."""
        digest, hexd, size = _descriptor(desc)
        if cap is not None and size > cap:
            raise ImageError(
                f"image config {digest} is larger than {cap >> 20} MiB", "the registry sent more than an image needs"
            )
        top = _blob_dir(cache)
        path = os.path.join(top, hexd)
        if _intact(path, hexd, size):
            return path
        if os.path.lexists(path):
            self._drop(path, digest)
        try:
            fd, tmp = tempfile.mkstemp(dir=top, prefix=".part-")  # O_EXCL|O_NOFOLLOW, mode 0600
        except OSError as e:
            raise _write_error(e, top) from None
        try:
            with os.fdopen(fd, "wb") as out:
                got = self._download(digest, size, out)
            if got != hexd:
                raise ImageError(f"blob {digest} does not match its digest", "the registry sent corrupt data")
            os.replace(tmp, path)  # replaces the name: never writes through what is there
            return path
        except OSError as e:
            raise _write_error(e, top) from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _drop(self, path, digest):
        """Remove a cache entry that is not the blob it is named after."""
        if not self.quiet:
            sys.stderr.write(f"{errors.PROG}: note: cached blob {digest} is damaged, fetching it again\n")
        try:
            os.unlink(path)
        except IsADirectoryError:
            raise ImageError(f"cache entry {path} is not a file", "remove it, or run hpcrun cache clean") from None
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ImageError(f"cannot remove the damaged cache entry {path}: {e.strerror}") from None

    def _download(self, digest, size, out):
        """Stream the blob into out, hashing it; stop as soon as more than size bytes came.
        -> the hex sha256."""
        h, done = hashlib.sha256(), 0
        show = not self.quiet and sys.stderr.isatty() and size
        try:
            with self._open(f"{self.base}/blobs/{digest}") as r:
                for chunk in _chunks(r, size, f"blob {digest}"):
                    done += len(chunk)
                    if done > size:
                        raise ImageError(
                            f"blob {digest} is larger than its declared size {size}",
                            "the registry sent more than the manifest says",
                        )
                    h.update(chunk)
                    out.write(chunk)
                    if show:
                        sys.stderr.write(f"\r{errors.PROG}: {digest[7:19]} {done * 100 // size:3d}%")
        finally:
            if show:
                sys.stderr.write("\n")
        if done < size:
            raise ImageError(
                f"blob {digest} is smaller than its declared size {size} ({done} bytes came)",
                "the download was cut short, or the registry is corrupt",
            )
        return h.hexdigest()


def _pick(index, ref):
    """The index entry for linux on this machine's architecture."""
    arch = GOARCH.get(os.uname().machine, os.uname().machine)
    entries = index.get("manifests")
    for m in entries if isinstance(entries, list) else []:
        platform = (m.get("platform") or {}) if isinstance(m, dict) else None
        if (
            isinstance(platform, dict)
            and platform.get("architecture") == arch
            and platform.get("os", "linux") == "linux"
        ):
            return m
    raise ImageError(f"{ref}: no image for linux/{arch}")


# what `apptainer push`/`oras push` give a SIF's one layer (sic: Apptainer < 3.7 wrote "appliciation")
SIF_LAYER_TYPES = ("application/vnd.sylabs.sif.layer.v1.sif", "appliciation/vnd.sylabs.sif.layer.tar")


def _image_manifest(ref, quiet):
    """-> (Registry, the manifest for this platform, its media type)."""
    host, repo, reference = parse_ref(ref)
    reg = Registry(host, repo, quiet)
    manifest, mtype = reg.manifest(reference)
    for _ in range(3):
        if mtype in INDEX_TYPES or "manifests" in manifest:
            manifest, mtype = reg.manifest(_digest(_pick(manifest, ref)))  # by digest: verified
            continue
        break
    return reg, manifest, mtype


def _sif_layer(manifest):
    """The descriptor of a SIF artifact's one layer (Apptainer's oras checks), else None."""
    layers = manifest.get("layers")
    if isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], dict):
        return layers[0] if layers[0].get("mediaType") in SIF_LAYER_TYPES else None
    return None


def pull_sif(ref, quiet=True, scratch=None):
    """oras://REF that is a SIF artifact -> the SIF's path in the cache (verified against its
    digest, and a SIF), or None when REF is an OCI image (pull() it)."""
    reg, manifest, _ = _image_manifest(ref, quiet)
    layer = _sif_layer(manifest)
    if layer is None:
        return None
    path = reg.blob(layer, cache_for(scratch))
    with open(path, "rb") as f:
        if f.read(42)[32:] != b"SIF_MAGIC\0":
            raise ImageError(f"{ref}: the artifact is not a SIF image", "push a SIF file there")
    return path


def pull(ref, quiet=True, scratch=None):
    """-> (layer paths in the cache, image config). scratch: a private directory to
    cache in when the user's cache is disabled or read-only (cache_for)."""
    reg, manifest, mtype = _image_manifest(ref, quiet)
    cache = cache_for(scratch)
    if _sif_layer(manifest) is not None:
        raise ImageError(f"{ref}: a SIF artifact, not an OCI image", f"fetch it with `{errors.PROG} pull OUT {ref}`")
    if "config" not in manifest:
        raise ImageError(f"{ref}: unsupported manifest type {mtype or manifest.get('mediaType')!r}")
    layers = manifest.get("layers") or []
    if not isinstance(layers, list):
        raise ImageError(f"{ref}: the manifest's layers are not a list")
    with open(reg.blob(manifest["config"], cache, MANIFEST_MAX), "rb") as f:
        try:
            config = json.load(f)
        except ValueError:
            config = None
    if not isinstance(config, dict):
        raise ImageError(f"{ref}: the image config is not a JSON object")
    paths = []
    for layer in layers:
        mt = layer.get("mediaType") if isinstance(layer, dict) else None
        if mt not in LAYER_TYPES:
            raise ImageError(f"{ref}: unknown layer media type {mt!r}")
        paths.append(reg.blob(layer, cache))
    return paths, config


def cache_entries():
    top = os.path.join(cache_dir(), "blobs", "sha256")
    try:
        names = sorted(n for n in os.listdir(top) if not n.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for n in names:  # what is not a regular file is no blob (it is dropped when used)
        st = os.lstat(os.path.join(top, n))
        if stat.S_ISREG(st.st_mode):
            out.append((n, st.st_size))
    return out


def cache_clean():
    """Remove the cache's blobs (fd-based: a link planted in it is removed, not followed)."""
    from hpcrun import trees

    top = os.path.join(cache_dir(), "blobs")
    n = len(cache_entries())
    trees.remove(top)
    return n
