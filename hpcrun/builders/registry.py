"""Pull images over the OCI distribution API (`docker://REF`, `oras://REF`).

Authentication answers the registry's 401 challenge: HTTP Basic with the user's credentials
(see auth.py), or a bearer token from the challenge's realm (anonymous, or asked for with
the credentials); the Authorization header is not sent on to redirects to other hosts.
Manifest lists and OCI indexes are resolved to the host platform, every blob verified
against its sha256 digest and kept in a content-addressed cache
($XDG_CACHE_HOME/hpcrun/blobs/sha256/HEX) that later pulls reuse. Registries on loopback
(localhost, 127.0.0.0/8, ::1) are spoken to over plain HTTP, as Docker does; everything
else over HTTPS."""
import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from hpcrun.builders import auth
from hpcrun.builders.oci import GOARCH, INDEX_TYPES, LAYER_TYPES
from hpcrun.errors import ImageError, UsageError

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])
LOOKUP = object()   # Registry(creds=LOOKUP): find the user's credentials when challenged


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
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hpcrun")


def parse_ref(ref):
    """docker://[host[:port]/]repo[:tag][@digest] -> (host, repo, reference)."""
    for scheme in ("docker://", "oras://"):
        if ref.startswith(scheme):
            ref = ref[len(scheme):]
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
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.index("]")]
    return name in ("localhost", "::1") or name.startswith("127.")


class Registry:
    """One repository (or, with repo None, just the registry's /v2/ root, for `registry login`).
    creds: Credentials to use; by default they are looked up (auth.lookup) at the first 401."""

    def __init__(self, host, repo, quiet=True, creds=LOOKUP):
        self.root = f"{'http' if _loopback(host) else 'https'}://{host}/v2/"
        self.base = self.root + (repo or "")
        self.host, self.repo, self.quiet, self.creds = host, repo, quiet, creds
        self.authorization = None   # the Authorization header once a challenge was answered

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
                raise ImageError(f"{url}: registry answered {e.code} {e.reason}",
                                 "check the reference and your access") from None
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
        if creds and not realm.startswith("https://") and not _loopback(urllib.parse.urlsplit(realm).netloc):
            raise ImageError(f"{self.host}: token service {realm} is not HTTPS",
                             "hpcrun sends credentials only over HTTPS or to loopback")
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        if self.repo:
            query.setdefault("scope", f"repository:{self.repo}:pull")
        req = urllib.request.Request(realm + "?" + urllib.parse.urlencode(query))
        if creds:
            req.add_unredirected_header("Authorization", creds.basic())
        try:
            with OPENER.open(req, timeout=60) as r:
                data = json.load(r)
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

    def check(self):
        """GET /v2/ (authenticating as needed): raises unless the registry lets us in."""
        with self._open(self.root):
            pass

    def manifest(self, reference):
        with self._open(f"{self.base}/manifests/{reference}", ACCEPT) as r:
            body = r.read()
            mtype = r.headers.get("Content-Type", "").split(";")[0]
        if reference.startswith("sha256:") and "sha256:" + hashlib.sha256(body).hexdigest() != reference:
            raise ImageError(f"manifest {reference} does not match its digest", "the registry is corrupt")
        try:
            return json.loads(body), mtype
        except ValueError:
            raise ImageError(f"manifest {reference} is not JSON") from None

    def blob(self, desc, cache):
        digest = desc.get("digest", "")
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
            raise ImageError(f"unsupported or malformed digest {digest!r}")
        path = os.path.join(cache, "blobs", "sha256", hexd)
        if os.path.exists(path):
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        h, done, size = hashlib.sha256(), 0, desc.get("size") or 0
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".part-")
        try:
            with self._open(f"{self.base}/blobs/{digest}") as r, os.fdopen(fd, "wb") as out:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    if not self.quiet and sys.stderr.isatty() and size:
                        sys.stderr.write(f"\rhpcrun: {digest[7:19]} {done * 100 // size:3d}%")
            if not self.quiet and sys.stderr.isatty() and size:
                sys.stderr.write("\n")
            if h.hexdigest() != hexd:
                raise ImageError(f"blob {digest} does not match its digest", "the registry sent corrupt data")
            os.replace(tmp, path)
            return path
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def pull(ref, quiet=True):
    """-> (layer paths in the cache, image config)."""
    host, repo, reference = parse_ref(ref)
    reg = Registry(host, repo, quiet)
    cache = cache_dir()
    manifest, mtype = reg.manifest(reference)
    for _ in range(3):
        if mtype in INDEX_TYPES or "manifests" in manifest:
            arch = GOARCH.get(os.uname().machine, os.uname().machine)
            pick = [m for m in manifest.get("manifests") or []
                    if (m.get("platform") or {}).get("architecture") == arch
                    and (m.get("platform") or {}).get("os", "linux") == "linux"]
            if not pick:
                raise ImageError(f"{ref}: no image for linux/{arch}")
            manifest, mtype = reg.manifest(pick[0]["digest"])
            continue
        break
    if "config" not in manifest:
        raise ImageError(f"{ref}: unsupported manifest type {mtype or manifest.get('mediaType')!r}")
    with open(reg.blob(manifest["config"], cache), encoding="utf-8") as f:
        config = json.load(f)
    layers = []
    for layer in manifest.get("layers") or []:
        if layer.get("mediaType") not in LAYER_TYPES:
            raise ImageError(f"{ref}: unknown layer media type {layer.get('mediaType')!r}")
        layers.append(reg.blob(layer, cache))
    return layers, config


def cache_entries():
    top = os.path.join(cache_dir(), "blobs", "sha256")
    try:
        names = sorted(n for n in os.listdir(top) if not n.startswith("."))
    except FileNotFoundError:
        return []
    return [(n, os.path.getsize(os.path.join(top, n))) for n in names]


def cache_clean():
    import shutil
    top = os.path.join(cache_dir(), "blobs")
    n = len(cache_entries())
    shutil.rmtree(top, ignore_errors=True)
    return n
