"""The registry client reads no more than it should and trusts nothing it did not verify:
blobs stop at their declared size, manifests and token answers at fixed caps, cached blobs
are hashed again when used, and only loopback addresses get plain HTTP. A local HTTP server
on 127.0.0.1 serves crafted answers and counts the bytes it managed to send."""

import hashlib
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from hpcrun.builders import registry
from hpcrun.builders.registry import Registry, _loopback, pull
from hpcrun.errors import IMAGE, RUNTIME, ImageError

SERVE_CHUNK = 64 << 10
HPCRUN_CHUNK = 1 << 20  # what hpcrun asks for per read: it may overshoot the declared size by this


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """routes: path -> (status, headers, body); body is bytes or (byte count, filler byte), the latter
    generated as it is sent. Records, per path, the GETs and the bytes the kernel took."""

    routes, gets, sent, finished = {}, {}, {}, threading.Condition()

    def do_GET(self):
        Handler.gets[self.path] = Handler.gets.get(self.path, 0) + 1
        if self.path not in Handler.routes:
            self.send_error(404)
            return
        status, headers, body = Handler.routes[self.path]
        total = len(body) if isinstance(body, bytes) else body[0]
        # a small send buffer: what "sent" counts is close to what the client read
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVE_CHUNK)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(total))
        self.end_headers()
        n = 0
        try:
            while n < total:
                chunk = body[n : n + SERVE_CHUNK] if isinstance(body, bytes) else body[1] * min(SERVE_CHUNK, total - n)
                self.wfile.write(chunk)
                n += len(chunk)
        except OSError:  # the client hung up: what we wanted
            pass
        with Handler.finished:
            Handler.sent[self.path] = Handler.sent.get(self.path, 0) + n
            Handler.finished.notify_all()

    def log_message(self, *args):
        pass


class Server:
    def __init__(self):
        Handler.routes, Handler.gets, Handler.sent = {}, {}, {}
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path, body, status=200, **headers):
        Handler.routes[path] = (status, headers, body)

    def blob(self, data):
        """Serve data as a blob of repository r; -> its descriptor."""
        self.serve(f"/v2/r/blobs/{digest(data)}", data)
        return {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(data), "size": len(data)}

    def sent(self, path):
        """Bytes sent for path, once its handler finished (the client has hung up by then)."""
        with Handler.finished:
            assert Handler.finished.wait_for(lambda: path in Handler.sent, 60)
            return Handler.sent[path]

    def image(self, layer=b"layer bytes " * 1000, config=b'{"config": {"Cmd": ["sh"]}}', config_desc=None):
        """A tagged manifest r:v1 with one config and one layer; -> (layer, config) descriptors."""
        lay = self.blob(layer)
        conf = config_desc or dict(self.blob(config), mediaType="application/vnd.oci.image.config.v1+json")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": conf,
            "layers": [lay],
        }
        self.serve(
            "/v2/r/manifests/v1",
            json.dumps(manifest).encode(),
            **{"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        return lay, conf


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return registry.cache_dir()


def blob_dir(cache):
    return os.path.join(cache, "blobs", "sha256")


def leftovers(cache):
    top = blob_dir(cache)
    return sorted(os.listdir(top)) if os.path.isdir(top) else []


# ---- 1. blobs: no further than the declared size, and not shorter ----


def test_blob_larger_than_declared_stops_early(server, cache):
    declared = 10 << 10
    served = 300 << 20
    path = "/v2/r/blobs/" + digest(b"\0" * declared)
    server.serve(path, (served, b"\0"))
    desc = {"digest": digest(b"\0" * declared), "size": declared}
    with pytest.raises(ImageError) as e:
        Registry(server.host, "r").blob(desc, cache)
    assert e.value.code == IMAGE
    assert e.value.message == f"blob {desc['digest']} is larger than its declared size {declared}"
    assert server.sent(path) < 2 * declared + HPCRUN_CHUNK, "hpcrun read on past the declared size"
    assert leftovers(cache) == [], "the partial file must be removed"


@pytest.mark.parametrize(
    "served, declared, words",
    [
        (20 << 10, 10 << 10, "is larger than its declared size 10240"),
        (5000, 10 << 10, "is smaller than its declared size 10240"),
    ],
)
def test_blob_with_right_digest_but_wrong_size_is_refused(server, cache, served, declared, words):
    data = os.urandom(served)
    desc = dict(server.blob(data), size=declared)
    with pytest.raises(ImageError, match=words) as e:
        Registry(server.host, "r").blob(desc, cache)
    assert e.value.code == IMAGE and "\n" not in e.value.line()
    assert leftovers(cache) == []


@pytest.mark.parametrize("size", ["missing", None, -1, "10", 10.0, 1.5, True])
def test_descriptor_without_valid_size_is_refused(server, cache, size):
    data = b"some blob"
    desc = server.blob(data)
    if size == "missing":
        del desc["size"]
    else:
        desc["size"] = size
    with pytest.raises(ImageError, match="no valid size"):
        Registry(server.host, "r").blob(desc, cache)
    assert Handler.gets == {}, "nothing is fetched for a descriptor without a size"


def test_disk_full_removes_the_partial_file_and_says_so(server, tmp_path):
    """A real ENOSPC: the cache on a 64 KiB tmpfs, mounted in a user namespace of our own."""
    desc = server.blob(os.urandom(1 << 20))
    cache = tmp_path / "small" / "hpcrun"
    cache.parent.mkdir()
    script = (
        "import os, sys\n"
        "from hpcrun.builders.registry import Registry\n"
        "from hpcrun.errors import HpcrunError\n"
        f"cache = {str(cache)!r}\n"
        "try:\n"
        f"    Registry({server.host!r}, 'r').blob({desc!r}, cache)\n"
        "    print('no error')\n"
        "except HpcrunError as e:\n"
        "    print(e.code, e.message)\n"
        "print(sorted(os.listdir(os.path.join(cache, 'blobs', 'sha256'))))\n"
    )
    tree = os.path.dirname(os.path.dirname(registry.__file__))
    r = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3"',
            "sh",
            str(cache.parent),
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=tree),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    top = os.path.join(cache, "blobs", "sha256")
    assert r.stdout.splitlines() == [f"{RUNTIME} disk full: cannot write {top}", "[]"], r.stdout + r.stderr


# ---- 2. manifests, indexes, configs, token answers: fixed caps ----


def test_manifest_is_read_up_to_4_mib_only(server, cache):
    server.serve("/v2/r/manifests/v1", b" " * ((4 << 20) - 2) + b"{}")  # at the cap: fine
    assert Registry(server.host, "r").manifest("v1") == ({}, "")
    path = "/v2/r/manifests/v2"
    server.serve(path, (64 << 20, b" "))  # valid JSON would follow; it never gets there
    with pytest.raises(ImageError) as e:
        Registry(server.host, "r").manifest("v2")
    assert e.value.message == "manifest v2 is larger than 4 MiB"
    assert server.sent(path) < 2 * (4 << 20) + HPCRUN_CHUNK


def test_huge_image_config_is_refused(server, cache):
    config = b" " * (5 << 20) + b"{}"
    server.blob(config)
    conf = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)}
    server.image(config_desc=conf)
    with pytest.raises(ImageError, match="image config sha256:[0-9a-f]+ is larger than 4 MiB"):
        pull(f"docker://{server.host}/r:v1")
    assert f"/v2/r/blobs/{digest(config)}" not in Handler.gets


def token_server(server, body):
    server.serve(
        "/v2/", b"", status=401, **{"WWW-Authenticate": f'Bearer realm="http://{server.host}/token",service="t"'}
    )
    server.serve("/token?service=t", body)
    return Registry(server.host, None, creds=None)


def test_token_answer_is_read_up_to_1_mib_only(server, cache):
    reg = token_server(server, b" " * ((1 << 20) - 16) + b'{"token": "tok"}')  # at the cap: used
    with pytest.raises(ImageError, match="requires authentication"):  # /v2/ keeps answering 401
        reg.check()
    assert reg.authorization == "Bearer tok"
    reg = token_server(server, (8 << 20, b" "))
    with pytest.raises(ImageError) as e:
        reg.check()
    assert e.value.message == f"the answer of token service http://{server.host}/token is larger than 1 MiB"
    assert server.sent("/token?service=t") < 2 * (1 << 20) + HPCRUN_CHUNK


def index(entry):
    return json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()


def with_layers(server, layers):
    lay, conf = server.image()
    return json.dumps({"schemaVersion": 2, "config": conf, "layers": layers}).encode()


def with_config(server, config):
    lay, conf = server.image(config=config)
    return json.dumps({"schemaVersion": 2, "config": conf, "layers": [lay]}).encode()


ARCH = registry.GOARCH.get(os.uname().machine, os.uname().machine)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda s: b"[]", "manifest v1 is not a JSON object"),
        (lambda s: b'"text"', "manifest v1 is not a JSON object"),
        (lambda s: index("not a descriptor"), "no image for linux/"),
        (
            lambda s: index({"digest": "../../../x", "platform": {"os": "linux", "architecture": ARCH}}),
            "malformed digest",
        ),
        (lambda s: index({"digest": "latest", "platform": {"os": "linux", "architecture": ARCH}}), "malformed digest"),
        (lambda s: index({"digest": "sha256:" + "a" * 64, "platform": "linux"}), "no image for linux/"),
        (lambda s: with_layers(s, "abc"), "layers are not a list"),
        (lambda s: with_layers(s, ["abc"]), "unknown layer media type None"),
        (lambda s: with_config(s, b"\xff\xfe not JSON"), "image config is not a JSON object"),
        (lambda s: with_config(s, b"[1, 2]"), "image config is not a JSON object"),
    ],
)
def test_malformed_manifest_or_config_fails_with_one_line(server, cache, make, words):
    """Hostile JSON of the wrong shape is an ImageError, not an internal error (or a fetch by tag)."""
    server.serve("/v2/r/manifests/v1", make(server))
    with pytest.raises(ImageError) as e:
        pull(f"docker://{server.host}/r:v1")
    assert words in e.value.message and "\n" not in e.value.line()


# ---- 3. cached blobs are verified when used ----


def tamper_flip(path, victim):
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(data)


def tamper_truncate(path, victim):
    os.truncate(path, 10)


def tamper_append(path, victim):
    open(path, "ab").write(b"more")


def tamper_symlink(path, victim):
    """The right bytes, but elsewhere: whoever may change them there could do so after the check."""
    with open(path, "rb") as f:
        victim.write_bytes(f.read())
    os.unlink(path)
    os.symlink(victim, path)


def tamper_fifo(path, victim):
    os.unlink(path)
    os.mkfifo(path)


@pytest.mark.parametrize("tamper", [tamper_flip, tamper_truncate, tamper_append, tamper_symlink, tamper_fifo])
def test_tampered_cache_entry_is_fetched_again(server, cache, tmp_path, capsys, tamper):
    layer = os.urandom(100 << 10)
    desc, conf = server.image(layer=layer)
    ref, blob_get = f"docker://{server.host}/r:v1", f"/v2/r/blobs/{desc['digest']}"
    paths, config = pull(ref)
    assert config == {"config": {"Cmd": ["sh"]}} and open(paths[0], "rb").read() == layer
    assert pull(ref, quiet=False) == (paths, config) and Handler.gets[blob_get] == 1, "intact: used"
    assert capsys.readouterr().err == ""
    victim = tmp_path / "victim"
    tamper(paths[0], victim)
    before = victim.read_bytes() if victim.exists() else None
    assert pull(ref, quiet=False) == (paths, config)
    assert stat.S_ISREG(os.lstat(paths[0]).st_mode) and open(paths[0], "rb").read() == layer
    assert Handler.gets[blob_get] == 2
    assert "fetching it again" in capsys.readouterr().err
    if before is not None:
        assert victim.read_bytes() == before, "nothing is written through a planted symlink"
    assert leftovers(cache) == sorted([desc["digest"][7:], conf["digest"][7:]])


# ---- 5. the cache's files: no writing through planted symlinks ----


def test_planted_symlinks_are_not_written_through(server, cache, tmp_path, monkeypatch):
    """A symlink at the blob's path (to a file with other bytes) and one named like the next
    temporary file: the blob ends up a regular file of its own, both targets unchanged."""
    import tempfile

    data = b"the real blob"
    desc = server.blob(data)
    top = blob_dir(cache)
    os.makedirs(top)
    victim, victim2 = tmp_path / "victim", tmp_path / "victim2"
    victim.write_bytes(b"precious")
    victim2.write_bytes(b"precious too")
    os.symlink(victim, os.path.join(top, desc["digest"][7:]))
    os.symlink(victim2, os.path.join(top, ".part-planted"))
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["planted", "fresh"]))
    path = Registry(server.host, "r").blob(desc, cache)
    assert not os.path.islink(path) and open(path, "rb").read() == data
    assert victim.read_bytes() == b"precious" and victim2.read_bytes() == b"precious too"


def test_blob_path_that_is_a_directory_fails_cleanly(server, cache):
    desc = server.blob(b"data")
    os.makedirs(os.path.join(blob_dir(cache), desc["digest"][7:]))
    with pytest.raises(ImageError, match="is not a file") as e:
        Registry(server.host, "r").blob(desc, cache)
    assert "hpcrun cache clean" in e.value.hint


# ---- 4. loopback means a loopback address ----

LOOPBACK = [
    "localhost",
    "localhost:5000",
    "LOCALHOST:5000",
    "127.0.0.1",
    "127.0.0.1:5000",
    "127.8.9.10:80",
    "[::1]:5000",
    "[::1]",
    "::1",
    "[::ffff:127.0.0.1]:5000",
]
NOT_LOOPBACK = [
    "127.evil.example",
    "127.evil.example:5000",
    "127.0.0.1.nip.io:5000",
    "localhost.evil.example",
    "evil.example:5000",
    "[::2]:5000",
    "0.0.0.0:5000",
    "10.0.0.1",
    "[::1",
    "",
]


def test_loopback_is_a_loopback_address_or_localhost():
    got = {host: _loopback(host) for host in LOOPBACK + NOT_LOOPBACK}
    assert got == {host: host in LOOPBACK for host in LOOPBACK + NOT_LOOPBACK}
    for host in LOOPBACK + NOT_LOOPBACK:
        assert Registry(host, "r").root.startswith("http://" if host in LOOPBACK else "https://"), host


def test_token_realm_gets_credentials_over_http_only_on_loopback(server):
    """Credentials go to a token service over HTTPS, or over HTTP to a loopback address only;
    a realm that is not an http(s) URL of a plain host is refused outright."""
    from hpcrun.builders.auth import Credentials

    port = server.host.rsplit(":", 1)[1]
    creds = Credentials("alice", "s3cret", "test")
    seen = {}

    class Token(Handler):
        def do_GET(self):
            if self.path.startswith("/token"):
                seen["auth"] = self.headers.get("Authorization")
            super().do_GET()

    server.httpd.RequestHandlerClass = Token
    server.serve("/token?service=t", b'{"token": "tok"}')
    cases = {
        f"http://127.evil.example:{port}/token": "is not HTTPS",
        "http://127.0.0.1@evil.example/token": "not an http(s) URL",
        f"http://127.0.0.1:{port}@evil.example/token": "not an http(s) URL",
        "file:///etc/passwd": "not an http(s) URL",
        f"http://{server.host}/token": "refused the credentials",  # sent, then /v2/ says 401
        f"http://localhost:{port}/token": "refused the credentials",
    }
    for realm, words in cases.items():
        server.serve("/v2/", b"", status=401, **{"WWW-Authenticate": f'Bearer realm="{realm}",service="t"'})
        reg = Registry(server.host, None, creds=creds)
        with pytest.raises(ImageError) as e:
            reg.check()
        assert words in e.value.message, (realm, e.value.message)
        assert "s3cret" not in e.value.line()
        assert seen.pop("auth", None) == (creds.basic() if words == "refused the credentials" else None), realm


def test_cache_list_and_clean_survive_planted_links(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    top = tmp_path / "cache" / "hpcrun" / "blobs" / "sha256"
    top.mkdir(parents=True)
    (top / ("a" * 64)).write_bytes(b"blob")
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    os.symlink(str(tmp_path / "missing"), top / ("b" * 64))
    os.symlink(str(canary), top / ("c" * 64))
    assert registry.cache_entries() == [("a" * 64, 4)]  # a dangling link crashed `cache list`
    assert registry.cache_clean() == 1
    assert not top.exists() and (canary / "keep").read_text() == "keep"
