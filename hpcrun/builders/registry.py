"""Pull images over the OCI distribution API (`docker://REF`, `oras://REF`).

Anonymous or bearer-token auth (the WWW-Authenticate challenge), manifest lists and OCI
indexes resolved to the host platform, every blob verified against its sha256 digest and
kept in a content-addressed cache ($XDG_CACHE_HOME/hpcrun/blobs/sha256/HEX) that later
pulls reuse. Registries on loopback (localhost, 127.0.0.0/8, ::1) are spoken to over
plain HTTP, as Docker does; everything else over HTTPS."""
import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from hpcrun.builders.oci import GOARCH, INDEX_TYPES, LAYER_TYPES
from hpcrun.errors import ImageError, UsageError

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


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
    def __init__(self, host, repo, quiet=True):
        self.base = f"{'http' if _loopback(host) else 'https'}://{host}/v2/{repo}"
        self.repo, self.token, self.quiet = repo, None, quiet

    def _open(self, url, accept=None):
        for attempt in range(2):
            req = urllib.request.Request(url)
            if accept:
                req.add_header("Accept", accept)
            if self.token:
                req.add_header("Authorization", f"Bearer {self.token}")
            try:
                return urllib.request.urlopen(req, timeout=60)
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0 and self._login(e.headers.get("WWW-Authenticate", "")):
                    continue
                raise ImageError(f"{url}: registry answered {e.code} {e.reason}",
                                 "check the reference and your access") from None
            except (urllib.error.URLError, OSError) as e:
                raise ImageError(f"{url}: cannot reach the registry ({getattr(e, 'reason', e)})") from None
        raise ImageError(f"{url}: not authorised")

    def _login(self, challenge):
        if not challenge.lower().startswith("bearer "):
            return False
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if "realm" not in params:
            return False
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        query.setdefault("scope", f"repository:{self.repo}:pull")
        url = params["realm"] + "?" + urllib.parse.urlencode(query)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = json.load(r)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageError(f"token request to {params['realm']} failed ({e})") from None
        self.token = data.get("token") or data.get("access_token")
        return bool(self.token)

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
