"""hpcrun.builders.auth: where registry credentials come from, in which order, and what
happens with broken files and credential helpers. (Talking to a registry: tests/integration.)"""

import base64
import json
import os
import stat

import pytest

from hpcrun.builders import auth
from hpcrun.errors import CONFIG, ConfigError


def b64(s):
    return base64.b64encode(s.encode()).decode()


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_nothing_configured(env):
    assert auth.lookup("reg.example:5000", env) is None


def test_env_precedence_hpcrun_apptainer_singularity(env, tmp_path):
    write(tmp_path / "home/.docker/config.json", {"auths": {"reg.example": {"auth": b64("file:f")}}})
    env.update(SINGULARITY_DOCKER_USERNAME="sing", SINGULARITY_DOCKER_PASSWORD="s")
    assert auth.lookup("reg.example", env).user == "sing"
    env.update(APPTAINER_DOCKER_USERNAME="app", APPTAINER_DOCKER_PASSWORD="a")
    assert auth.lookup("reg.example", env).user == "app"
    env.update(HPCRUN_DOCKER_USERNAME="me", HPCRUN_DOCKER_PASSWORD="pw:with:colons")
    c = auth.lookup("reg.example", env)
    assert (c.user, c.secret, c.source) == ("me", "pw:with:colons", "HPCRUN_DOCKER_USERNAME/PASSWORD")
    assert "pw:with:colons" not in repr(c)


def test_env_half_set_is_an_error(env):
    env["HPCRUN_DOCKER_USERNAME"] = "me"
    with pytest.raises(ConfigError) as e:
        auth.lookup("reg.example", env)
    assert e.value.code == CONFIG and "HPCRUN_DOCKER_PASSWORD" in e.value.message


def test_env_user_with_colon_is_an_error(env):
    env.update(HPCRUN_DOCKER_USERNAME="a:b", HPCRUN_DOCKER_PASSWORD="p")
    with pytest.raises(ConfigError, match="contains ':'"):
        auth.lookup("reg.example", env)


def test_file_precedence_and_host_port_keys(env, tmp_path):
    docker = write(
        tmp_path / "home/.docker/config.json",
        {"auths": {"reg.example:5000": {"auth": b64("docker:d")}, "other.example": {"auth": b64("o:o")}}},
    )
    assert auth.lookup("reg.example:5000", env).source == str(docker)
    assert auth.lookup("reg.example", env) is None, "the port is part of the key"
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    write(tmp_path / "run/containers/auth.json", {"auths": {"https://reg.example:5000/v2/": {"auth": b64("xdg:x")}}})
    assert auth.lookup("reg.example:5000", env).user == "xdg"
    env["REGISTRY_AUTH_FILE"] = str(write(tmp_path / "ra.json", {"auths": {"reg.example:5000": {"auth": b64("ra:r")}}}))
    assert auth.lookup("reg.example:5000", env).user == "ra"
    # a file without an entry for the host does not stop the search
    assert auth.lookup("other.example", env).user == "o"


def test_docker_hub_key(env, tmp_path):
    write(tmp_path / "home/.docker/config.json", {"auths": {auth.HUB_KEY: {"auth": b64("hubuser:h")}}})
    for host in ("registry-1.docker.io", "docker.io", "index.docker.io"):
        assert auth.lookup(host, env).user == "hubuser"


def test_docker_config_env(env, tmp_path):
    env["DOCKER_CONFIG"] = str(tmp_path / "dc")
    write(tmp_path / "dc/config.json", {"auths": {"reg.example": {"auth": b64("dc:d")}}})
    assert auth.lookup("reg.example", env).user == "dc"


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "not a JSON object"),
        (json.dumps({"auths": {"reg.example": {"auth": "%%%"}}}), "not base64 of user:password"),
        (json.dumps({"auths": {"reg.example": {"auth": b64("nocolon")}}}), "not base64 of user:password"),
        (json.dumps({"auths": {"reg.example": {"identitytoken": "t"}}}), "identity tokens"),
        (
            json.dumps({"credsStore": "hpcrun-test-absent"}),
            "docker-credential-hpcrun-test-absent, which is not installed",
        ),
    ],
)
def test_broken_files_are_one_clear_error(env, tmp_path, content, words):
    env["REGISTRY_AUTH_FILE"] = str(write(tmp_path / "a.json", content))
    with pytest.raises(ConfigError) as e:
        auth.lookup("reg.example", env)
    assert words in e.value.message and "%%%" not in e.value.line()


def test_unreadable_file(env, tmp_path):
    p = tmp_path / "a.json"
    p.mkdir()  # unreadable as a file, also for root (who CI runs as)
    env["REGISTRY_AUTH_FILE"] = str(p)
    with pytest.raises(ConfigError, match="Is a directory"):
        auth.lookup("reg.example", env)


def helper(tmp_path, env, name, body):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    prog = bindir / f"docker-credential-{name}"
    prog.write_text("#!/bin/sh\n" + body)
    prog.chmod(0o755)
    env["PATH"] = f"{bindir}:{env['PATH']}"


def test_credential_helpers(env, tmp_path):
    # the helper gets "get" as argument and the server on stdin, answers JSON
    helper(
        tmp_path,
        env,
        "fake",
        '[ "$1" = get ] || exit 3\nread server\n'
        'printf \'{"ServerURL":"%s","Username":"u-%s","Secret":"s"}\' "$server" "$server"\n',
    )
    helper(tmp_path, env, "empty", 'echo "credentials not found in native keychain"; exit 1\n')
    helper(tmp_path, env, "broken", "exit 7\n")
    p = tmp_path / "home/.docker/config.json"
    write(p, {"credHelpers": {"reg.example": "fake"}, "auths": {"reg.example": {"auth": b64("file:f")}}})
    c = auth.lookup("reg.example", env)
    assert (c.user, c.secret, c.source) == ("u-reg.example", "s", "credential helper docker-credential-fake")
    write(p, {"credsStore": "fake", "auths": {"reg.example": {"auth": b64("file:f")}}})
    assert auth.lookup("reg.example", env).user == "file", "an auths entry comes before credsStore"
    assert auth.lookup("docker.io", env).user == "u-" + auth.HUB_KEY
    write(p, {"credsStore": "empty"})
    assert auth.lookup("reg.example", env) is None
    write(p, {"credsStore": "broken"})
    with pytest.raises(ConfigError, match="exited with status 7"):
        auth.lookup("reg.example", env)


def test_save_and_forget(env, tmp_path):
    p = write(tmp_path / "home/.docker/config.json", {"auths": {"keep.example": {"auth": b64("k:k")}}, "psFormat": "x"})
    assert auth.save("reg.example:5000", "me", "pw", env) == str(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    data = json.loads(p.read_text())
    assert data["psFormat"] == "x" and data["auths"]["keep.example"]
    assert auth.lookup("reg.example:5000", env).secret == "pw"
    auth.save("reg.example:5000", "me", "pw2", env)
    assert auth.lookup("reg.example:5000", env).secret == "pw2"
    assert auth.forget("reg.example:5000", env) == (str(p), True)
    assert auth.lookup("reg.example:5000", env) is None and auth.lookup("keep.example", env).user == "k"
    assert auth.forget("reg.example:5000", env) == (str(p), False)


def test_save_creates_private_directory(env, tmp_path):
    auth.save("docker.io", "me", "pw", env)
    d = tmp_path / "home/.docker"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert list(json.loads((d / "config.json").read_text())["auths"]) == [auth.HUB_KEY]


def test_refused_messages_never_carry_the_secret():
    c = auth.Credentials("me", "hunter2", "HPCRUN_DOCKER_USERNAME/PASSWORD")
    line = auth.refused("reg.example:5000", c, "team/app").line()
    assert "hunter2" not in line and "reg.example:5000/team/app" in line and "hpcrun registry login" in line
    assert "requires authentication" in auth.refused("reg.example", None, "x").line()
