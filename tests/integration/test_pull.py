"""docker:// pulls from a real registry (Debian's docker-registry) on loopback, directly
and behind a bearer-token proxy; images pushed there with skopeo."""

import base64
import http.server
import json
import os
import pwd
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from hpcrun_testlib import USER, WORK, hpcrun, user, user_env
from test_build import check_oci_result, make_oci_layout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(top, images, auth_conf="", push_args=(), port=None):
    """docker-registry on a free loopback port with the test image pushed; -> (Popen, host:port).
    Each fixture has its own port and directory, so they never clash within one pytest run."""
    port = port or free_port()
    os.makedirs(top, exist_ok=True)
    conf = os.path.join(top, "config.yml")
    with open(conf, "w") as f:
        f.write(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {top}/data\n"
            f"http:\n  addr: 127.0.0.1:{port}\n{auth_conf}"
        )
    proc = subprocess.Popen(["docker-registry", "serve", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except urllib.error.HTTPError:  # 401: up, and wants credentials
                break
            except OSError:
                time.sleep(0.1)
        layout = os.path.join(WORK, "registry-layout")
        if not os.path.exists(layout):
            make_oci_layout(layout, images)
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                *push_args,
                f"oci:{layout}:v1",
                f"docker://127.0.0.1:{port}/test/busybox:v1",
            ],
            check=True,
        )
    except BaseException:
        proc.terminate()
        proc.wait(10)
        raise
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def registry(images):
    proc, host = start_registry(os.path.join(WORK, "registry"), images)
    yield host
    proc.terminate()
    proc.wait(10)


USER_NAME, PASSWORD = "alice", "pw-Zq7!x:colon"  # a colon: only the first one separates user:password


def auth_json(host, user=USER_NAME, password=PASSWORD):
    return json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}})


@pytest.fixture(scope="module")
def auth_registry(images):
    """The same registry with htpasswd (HTTP Basic) auth; plain HTTP is fine on loopback."""
    import bcrypt

    top = os.path.join(WORK, "registry-auth")
    os.makedirs(top, exist_ok=True)
    with open(os.path.join(top, "htpasswd"), "wb") as f:
        f.write(USER_NAME.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt()) + b"\n")
    port = free_port()
    authfile = os.path.join(top, "push-auth.json")  # skopeo gets the password from a file, not argv
    with open(authfile, "w") as f:
        f.write(auth_json(f"127.0.0.1:{port}"))
    conf = f"auth:\n  htpasswd:\n    realm: hpcrun-test\n    path: {top}/htpasswd\n"
    proc, host = start_registry(top, images, conf, ["--dest-authfile", authfile], port)
    yield host
    proc.terminate()
    proc.wait(10)


class TokenProxy(http.server.BaseHTTPRequestHandler):
    """In front of the registry: 401 + Bearer challenge without the token; counts blob GETs.
    With `basic` set, the token endpoint wants that Authorization header (a private registry)."""

    upstream = token = basic = None
    blob_gets = 0
    tamper = False

    def do_GET(self):
        if self.path.startswith("/token"):
            if TokenProxy.basic and self.headers.get("Authorization") != TokenProxy.basic:
                self.send_response(401)
                self.end_headers()
                return
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
    TokenProxy.basic = None
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


def test_pull_refuses_cache_dir_of_another_user(registry, bdir):
    """$XDG_CACHE_HOME/hpcrun planted by another user, as a symlink to their directory or as
    their directory itself: not used (they could swap a blob after hpcrun verified it)."""
    me, other = user(), pwd.getpwnam(USER + "2")
    base = bdir / "xdg"
    base.mkdir()
    os.chown(base, me.pw_uid, me.pw_gid)
    theirs = bdir / "theirs"
    theirs.mkdir()
    os.chown(theirs, other.pw_uid, other.pw_gid)
    os.chmod(theirs, 0o777)
    planted, out, ref = base / "hpcrun", str(bdir / "p.sif"), f"docker://{registry}/test/busybox:v1"
    os.symlink(theirs, planted)
    os.lchown(planted, other.pw_uid, other.pw_gid)
    r = hpcrun("pull", out, ref, env={"XDG_CACHE_HOME": str(base)})
    assert r.returncode == 252 and f"cache directory {planted} belongs to another user" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and os.listdir(theirs) == [] and not os.path.exists(out)
    os.unlink(planted)
    planted.mkdir()
    os.chown(planted, other.pw_uid, other.pw_gid)
    os.chmod(planted, 0o777)
    r = hpcrun("pull", out, ref, env={"XDG_CACHE_HOME": str(base)})
    assert r.returncode == 252 and "belongs to another user" in r.stderr, r.stderr
    assert os.listdir(planted) == [] and not os.path.exists(out)
    # the user's own symlink to a directory of their own is fine
    os.rmdir(planted)
    mine = bdir / "mine"
    mine.mkdir()
    os.chown(mine, me.pw_uid, me.pw_gid)
    os.symlink(mine, planted)
    os.lchown(planted, me.pw_uid, me.pw_gid)
    r = hpcrun("pull", out, ref, env={"XDG_CACHE_HOME": str(base)})
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(mine / "blobs" / "sha256")) == 3


def test_pull_missing_image_and_default_name(registry, bdir):
    r = hpcrun("pull", str(bdir / "x.sif"), f"docker://{registry}/test/nothere:v1", env=cache_env("miss"))
    assert r.returncode == 252 and "404" in r.stderr, r.stderr
    import subprocess as sp
    from hpcrun_testlib import as_user, HPCRUN

    r = sp.run(
        as_user([HPCRUN, "pull", f"docker://{registry}/test/busybox:v1"]),
        cwd=str(bdir),
        env=user_env(cache_env("name")),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (bdir / "busybox_v1.sif").exists()


def test_definition_file_bootstrap_docker(registry, bdir):
    (bdir / "d.def").write_text(
        f"Bootstrap: docker\nFrom: {registry}/test/busybox:v1\n\n%post\n    echo built > /opt/built\n"
    )
    os.chmod(bdir / "d.def", 0o644)
    out = str(bdir / "d.sif")
    r = hpcrun("build", out, str(bdir / "d.def"), env=cache_env("def"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert hpcrun("exec", out, "cat", "/opt/built").stdout.strip() == "built"
    assert hpcrun("run", out).stdout.strip() == "entry default-cmd"


# ---- private registries: credentials from the environment, auth files, helpers, login ----


def creds_env(name, **extra):
    """A cache of its own, and HOME-independent auth file locations pointed into WORK."""
    env = cache_env(name)
    env.update({"DOCKER_CONFIG": os.path.join(WORK, "t", "no-docker-config")}, **extra)
    return env


def assert_clean_failure(r, bdir, name, out, words, debug=False):
    """252, one line naming the registry and what to do (after the traceback with --debug),
    no secret even in --debug output, no OUT, no work dir, no blob."""
    assert r.returncode == 252, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    if debug:
        assert lines[0].startswith("Traceback"), r.stderr
    else:
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[-1], r.stderr
    assert "HPCRUN_DOCKER_USERNAME" in lines[-1] and "hpcrun registry login" in lines[-1], r.stderr
    assert PASSWORD not in r.stdout + r.stderr and "wrong-pw" not in r.stdout + r.stderr
    assert not os.path.exists(out) and os.listdir(bdir) == [], os.listdir(bdir)
    assert not os.path.exists(os.path.join(WORK, "cache", name, "hpcrun", "blobs")), "no cache entry"


def test_pull_private_with_env_credentials(auth_registry, bdir):
    out = str(bdir / "priv.sif")
    env = creds_env("auth-env", HPCRUN_DOCKER_USERNAME=USER_NAME, HPCRUN_DOCKER_PASSWORD=PASSWORD)
    r = hpcrun("pull", out, f"docker://{auth_registry}/test/busybox:v1", env=env)
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    check_oci_result(out)
    assert hpcrun("exec", out, "cat", "/keep/link").stdout.strip() == "kept"
    # Apptainer's names work too; HPCRUN_ wins over them
    env = creds_env("auth-env2", APPTAINER_DOCKER_USERNAME=USER_NAME, APPTAINER_DOCKER_PASSWORD=PASSWORD)
    assert hpcrun("pull", str(bdir / "a.sif"), f"docker://{auth_registry}/test/busybox:v1", env=env).returncode == 0
    env.update(HPCRUN_DOCKER_USERNAME=USER_NAME, HPCRUN_DOCKER_PASSWORD="wrong-pw")
    r = hpcrun("pull", str(bdir / "b.sif"), f"docker://{auth_registry}/test/busybox:v1", env=env)
    assert r.returncode == 252 and "from HPCRUN_DOCKER_USERNAME/PASSWORD" in r.stderr, r.stderr


def test_pull_private_with_auth_file(auth_registry, bdir):
    authfile = bdir / "auth.json"
    authfile.write_text(auth_json(auth_registry))
    os.chmod(authfile, 0o644)
    out = str(bdir / "file.sif")
    r = hpcrun(
        "pull",
        out,
        f"docker://{auth_registry}/test/busybox:v1",
        env=creds_env("auth-file", REGISTRY_AUTH_FILE=str(authfile)),
    )
    assert r.returncode == 0, r.stderr
    assert hpcrun("exec", out, "cat", "/keep/link").stdout.strip() == "kept"


def test_pull_private_wrong_password_fails_cleanly(auth_registry, bdir):
    out = str(bdir / "wrong.sif")
    for debug in ([], ["--debug"]):
        env = creds_env("auth-wrong", HPCRUN_DOCKER_USERNAME=USER_NAME, HPCRUN_DOCKER_PASSWORD="wrong-pw")
        r = hpcrun(*debug, "pull", out, f"docker://{auth_registry}/test/busybox:v1", env=env)
        assert_clean_failure(
            r, bdir, "auth-wrong", out, [auth_registry, "refused the credentials", "user 'alice'"], debug=bool(debug)
        )
    # a wrong password in the auth file: the message names the file
    authfile = os.path.join(WORK, "t", "bad-auth.json")
    with open(authfile, "w") as f:
        f.write(auth_json(auth_registry, password="wrong-pw"))
    os.chmod(authfile, 0o644)
    r = hpcrun(
        "pull",
        out,
        f"docker://{auth_registry}/test/busybox:v1",
        env=creds_env("auth-wrong", REGISTRY_AUTH_FILE=authfile),
    )
    assert_clean_failure(r, bdir, "auth-wrong", out, [f"credentials from {authfile}"])


def test_pull_private_without_credentials_fails_cleanly(auth_registry, bdir):
    out = str(bdir / "none.sif")
    r = hpcrun("pull", out, f"docker://{auth_registry}/test/busybox:v1", env=creds_env("auth-none"))
    assert_clean_failure(r, bdir, "auth-none", out, [f"{auth_registry}/test/busybox", "requires authentication"])
    # build (Bootstrap: docker goes the same way) fails the same
    r = hpcrun("build", out, f"docker://{auth_registry}/test/busybox:v1", env=creds_env("auth-none"))
    assert_clean_failure(r, bdir, "auth-none", out, ["requires authentication"])


def test_registry_login_logout_and_credential_helper(auth_registry, bdir):
    conf_dir = bdir / "docker"
    env = creds_env("auth-login", DOCKER_CONFIG=str(conf_dir))
    ref = f"docker://{auth_registry}/test/busybox:v1"
    r = hpcrun("registry", "login", "-u", USER_NAME, "--password-stdin", auth_registry, input="wrong-pw\n", env=env)
    assert r.returncode == 252 and "refused" in r.stderr and not conf_dir.exists(), r.stderr
    r = hpcrun("registry", "login", "-u", USER_NAME, "--password-stdin", auth_registry, input=PASSWORD + "\n", env=env)
    assert r.returncode == 0 and "Login succeeded" in r.stdout, r.stderr
    config = conf_dir / "config.json"
    assert oct(config.stat().st_mode & 0o777) == "0o600" and oct(conf_dir.stat().st_mode & 0o777) == "0o700"
    assert config.read_text().strip() == json.dumps({"auths": json.loads(auth_json(auth_registry))["auths"]}, indent=1)
    r = hpcrun("pull", str(bdir / "x.sif"), ref, env=env)
    assert r.returncode == 0, r.stderr
    r = hpcrun("registry", "logout", auth_registry, env=env)
    assert r.returncode == 0 and "Removed" in r.stdout, r.stderr
    r = hpcrun("pull", str(bdir / "y.sif"), ref, env=env)
    assert r.returncode == 252 and "requires authentication" in r.stderr, r.stderr
    # a credential helper named by credHelpers: password on its stdout, never in argv
    helper = bdir / "bin" / "docker-credential-hpcrun-test"
    helper.parent.mkdir()
    helper.write_text(
        f'#!/bin/sh\nread server\n[ "$server" = {auth_registry} ] || exit 1\n'
        f'echo \'{{"Username":"{USER_NAME}","Secret":"{PASSWORD}"}}\'\n'
    )
    os.chmod(helper, 0o755)
    os.chmod(helper.parent, 0o755)
    with open(config, "w") as f:
        json.dump({"auths": {}, "credHelpers": {auth_registry: "hpcrun-test"}}, f)
    r = hpcrun("pull", str(bdir / "y.sif"), ref, env=dict(env, PATH=f"{helper.parent}:/usr/bin:/bin"))
    assert r.returncode == 0, r.stderr


def test_token_request_carries_credentials(proxy, bdir):
    TokenProxy.basic = "Basic " + base64.b64encode(f"{USER_NAME}:{PASSWORD}".encode()).decode()
    ref = f"docker://{proxy}/test/busybox:v1"
    r = hpcrun("pull", str(bdir / "t.sif"), ref, env=creds_env("auth-token-none"))
    assert_clean_failure(r, bdir, "auth-token-none", str(bdir / "t.sif"), ["requires authentication"])
    env = creds_env("auth-token", HPCRUN_DOCKER_USERNAME=USER_NAME, HPCRUN_DOCKER_PASSWORD="wrong-pw")
    r = hpcrun("pull", str(bdir / "t.sif"), ref, env=env)
    assert_clean_failure(r, bdir, "auth-token", str(bdir / "t.sif"), ["refused the credentials"])
    env.update(HPCRUN_DOCKER_PASSWORD=PASSWORD)
    r = hpcrun("pull", str(bdir / "t.sif"), ref, env=env)
    assert r.returncode == 0, r.stderr
    check_oci_result(str(bdir / "t.sif"))
