"""docker:// pulls from a real registry (Debian's docker-registry) on loopback, directly
and behind a bearer-token proxy; images pushed there with skopeo."""
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from hpcrun_testlib import WORK, hpcrun, user_env
from test_build import check_oci_result, make_oci_layout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(images):
    port = free_port()
    top = os.path.join(WORK, "registry")
    os.makedirs(top, exist_ok=True)
    conf = os.path.join(top, "config.yml")
    with open(conf, "w") as f:
        f.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {top}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        layout = os.path.join(top, "layout")
        if not os.path.exists(layout):
            make_oci_layout(layout, images)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v1",
                        f"docker://127.0.0.1:{port}/test/busybox:v1"], check=True)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class TokenProxy(http.server.BaseHTTPRequestHandler):
    """In front of the registry: 401 + Bearer challenge without the token; counts blob GETs."""
    upstream = token = None
    blob_gets = 0
    tamper = False

    def do_GET(self):
        if self.path.startswith("/token"):
            body = json.dumps({"token": TokenProxy.token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
            return
        if self.headers.get("Authorization") != f"Bearer {TokenProxy.token}":
            host, port = self.server.server_address
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="http://{host}:{port}/token",service="test"')
            self.end_headers()
            return
        req = urllib.request.Request(f"http://{TokenProxy.upstream}{self.path}")
        if self.headers.get("Accept"):
            req.add_header("Accept", self.headers["Accept"])
        with urllib.request.urlopen(req) as r:
            body = r.read()
            ctype = r.headers.get("Content-Type", "")
        if "/blobs/" in self.path:
            TokenProxy.blob_gets += 1
            if TokenProxy.tamper and len(body) > 1000:
                body = body[:-1] + bytes([body[-1] ^ 1])
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(registry):
    TokenProxy.upstream, TokenProxy.token, TokenProxy.blob_gets, TokenProxy.tamper = registry, "s3cret", 0, False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def cache_env(name):
    path = os.path.join(WORK, "cache", name)
    return {"XDG_CACHE_HOME": path}


def test_pull_from_registry(registry, bdir):
    out = str(bdir / "pulled.sif")
    r = hpcrun("pull", out, f"docker://{registry}/test/busybox:v1", env=cache_env("plain"))
    assert r.returncode == 0, r.stderr
    check_oci_result(out)
    r = hpcrun("cache", "list", env=cache_env("plain"))
    assert r.returncode == 0 and "sha256:" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("3 blobs")


def test_pull_with_token_auth_and_cache(proxy, bdir):
    env = cache_env("token")
    r = hpcrun("pull", str(bdir / "a.sif"), f"docker://{proxy}/test/busybox:v1", env=env)
    assert r.returncode == 0, r.stderr
    assert TokenProxy.blob_gets == 3
    check_oci_result(str(bdir / "a.sif"))
    r = hpcrun("pull", str(bdir / "b.sif"), f"docker://{proxy}/test/busybox:v1", env=env)
    assert r.returncode == 0 and TokenProxy.blob_gets == 3, "the second pull must come from the cache"
    assert hpcrun("cache", "clean", env=env).stdout.strip() == "removed 3 blobs"


def test_pull_refuses_corrupt_blob(proxy, bdir):
    TokenProxy.tamper = True
    out = bdir / "bad.sif"
    r = hpcrun("pull", str(out), f"docker://{proxy}/test/busybox:v1", env=cache_env("tamper"))
    assert r.returncode == 252 and "does not match its digest" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_pull_missing_image_and_default_name(registry, bdir):
    r = hpcrun("pull", str(bdir / "x.sif"), f"docker://{registry}/test/nothere:v1", env=cache_env("miss"))
    assert r.returncode == 252 and "404" in r.stderr, r.stderr
    import subprocess as sp
    from hpcrun_testlib import as_user, HPCRUN
    r = sp.run(as_user([HPCRUN, "pull", f"docker://{registry}/test/busybox:v1"]), cwd=str(bdir),
               env=user_env(cache_env("name")), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (bdir / "busybox_v1.sif").exists()


def test_definition_file_bootstrap_docker(registry, bdir):
    (bdir / "d.def").write_text(f"Bootstrap: docker\nFrom: {registry}/test/busybox:v1\n\n"
                                "%post\n    echo built > /opt/built\n")
    os.chmod(bdir / "d.def", 0o644)
    out = str(bdir / "d.sif")
    r = hpcrun("build", out, str(bdir / "d.def"), env=cache_env("def"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert hpcrun("exec", out, "cat", "/opt/built").stdout.strip() == "built"
    assert hpcrun("run", out).stdout.strip() == "entry default-cmd"
