"""The registry client keeps its Authorization header on same-origin redirects and drops it
on redirects elsewhere (a blob CDN must not see registry credentials). Two local HTTP
servers: one redirects, both record the Authorization header they got."""

import http.server
import threading

import pytest

from hpcrun.builders.registry import Registry

SEEN = {}


class Handler(http.server.BaseHTTPRequestHandler):
    other = None

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path.startswith("/v2/r/blobs/"):  # the registry: redirect per the digest's first char
            target = f"http://127.0.0.1:{port}" if "sha256:a" in self.path else f"http://127.0.0.1:{Handler.other}"
            self.send_response(307)
            self.send_header("Location", f"{target}/cdn/{self.path.rsplit('/', 1)[-1]}")
            self.end_headers()
            return
        SEEN[self.path] = self.headers.get("Authorization")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    out = []
    for _ in range(2):
        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        out.append(s)
    Handler.other = out[1].server_address[1]
    yield out[0].server_address[1]
    for s in out:
        s.shutdown()


@pytest.mark.parametrize("digest, expect", [("sha256:" + "a" * 64, "Basic secret"), ("sha256:" + "b" * 64, None)])
def test_authorization_follows_only_same_origin_redirects(servers, digest, expect):
    reg = Registry(f"127.0.0.1:{servers}", "r")
    reg.authorization = "Basic secret"
    with reg._open(f"{reg.base}/blobs/{digest}") as r:
        assert r.read() == b"ok"
    assert SEEN[f"/cdn/{digest}"] == expect
