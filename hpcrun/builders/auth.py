"""Registry credentials, looked up the way Apptainer, podman and Docker users expect.

Precedence: HPCRUN_DOCKER_USERNAME/PASSWORD, then APPTAINER_DOCKER_*, then SINGULARITY_DOCKER_*
(these apply to every registry); then the first auth file that knows the registry:
$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, $DOCKER_CONFIG/config.json
(default ~/.docker/config.json). In a file: credHelpers[host], then auths[host].auth
(base64 "user:password"), then credsStore; a helper is run as `docker-credential-NAME get`
with the server on stdin. Secrets never go into argv, messages or logs."""

import base64
import binascii
import json
import os
import subprocess
import tempfile

from hpcrun.errors import ConfigError, ImageError

HUB_KEY = "https://index.docker.io/v1/"  # Docker Hub's key in auth files and for helpers
HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
HINT = "set HPCRUN_DOCKER_USERNAME/HPCRUN_DOCKER_PASSWORD or run hpcrun registry login {host}"


class Credentials:
    """user + secret and where they came from; repr() never shows the secret."""

    def __init__(self, user, secret, source):
        self.user, self.secret, self.source = user, secret, source

    def __repr__(self):
        return f"Credentials(user={self.user!r}, source={self.source!r})"

    def basic(self):
        return "Basic " + base64.b64encode(f"{self.user}:{self.secret}".encode()).decode()


def host_key(key):
    """'https://host:port/v1/' or 'host:port' -> 'host:port'; Docker Hub's names -> one name."""
    name = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return "docker.io" if name in HUB_NAMES else name


def from_env(env):
    for prefix in ("HPCRUN", "APPTAINER", "SINGULARITY"):
        user, secret = env.get(f"{prefix}_DOCKER_USERNAME"), env.get(f"{prefix}_DOCKER_PASSWORD")
        if user is None and secret is None:
            continue
        if not user or secret is None:
            raise ConfigError(
                f"{prefix}_DOCKER_USERNAME and {prefix}_DOCKER_PASSWORD must be set together",
                "set both, or unset both to use the auth files",
            )
        if ":" in user:  # HTTP Basic cannot carry it
            raise ConfigError(f"{prefix}_DOCKER_USERNAME contains ':'")
        return Credentials(user, secret, f"{prefix}_DOCKER_USERNAME/PASSWORD")
    return None


def auth_files(env):
    files = [env.get("REGISTRY_AUTH_FILE")]
    if env.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    files.append(docker_config(env))
    return [f for f in files if f]


def docker_config(env):
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(env.get("DOCKER_CONFIG") or os.path.join(home, ".docker"), "config.json")


def read_file(path):
    """The parsed auth file, {} when it does not exist; one-line ConfigError when unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"auth file {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"auth file {path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"auth file {path}: not a JSON object")
    return data


def _lookup(mapping, host):
    for key, value in (mapping or {}).items():
        if isinstance(key, str) and host_key(key) == host:
            return value
    return None


def from_file(path, host, env):
    data = read_file(path)
    helper = _lookup(data.get("credHelpers"), host)
    if helper:
        return from_helper(helper, host, path, env)
    entry = _lookup(data.get("auths"), host) or {}
    if entry.get("auth"):
        try:
            user, sep, secret = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, TypeError):
            user, sep = "", ""
        if not user or not sep:
            raise ConfigError(f"auth file {path}: the entry for {host} is not base64 of user:password")
        return Credentials(user, secret, path)
    if entry.get("identitytoken"):
        raise ConfigError(f"auth file {path}: identity tokens (for {host}) are not supported", HINT.format(host=host))
    if data.get("credsStore"):
        return from_helper(data["credsStore"], host, path, env)
    return None


def from_helper(name, host, path, env):
    """`docker-credential-NAME get`; None when the helper has nothing for the server."""
    prog = f"docker-credential-{name}"
    server = HUB_KEY if host == "docker.io" else host
    try:
        r = subprocess.run([prog, "get"], input=server, capture_output=True, text=True, timeout=60, env=dict(env))
    except FileNotFoundError:
        raise ConfigError(
            f"auth file {path} names credential helper {prog}, which is not installed", HINT.format(host=host)
        ) from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"credential helper {prog} failed ({type(e).__name__})") from None
    if r.returncode != 0:
        if "not found" in (r.stdout + r.stderr).lower():  # the helpers' "credentials not found"
            return None
        raise ConfigError(f"credential helper {prog} exited with status {r.returncode}")
    try:
        data = json.loads(r.stdout)
        return Credentials(data["Username"], data["Secret"], f"credential helper {prog}")
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"credential helper {prog} printed something other than its JSON answer") from None


def lookup(host, env=os.environ):
    """Credentials for host[:port] (as in the image reference), or None."""
    creds = from_env(env)
    if creds:
        return creds
    host = host_key(host)
    for path in auth_files(env):
        creds = from_file(path, host, env)
        if creds:
            return creds
    return None


def refused(host, creds, repo=None):
    """The one error for 401/403: which registry, which credentials (never the secret), what to do."""
    what = f"{host}/{repo}" if repo else host
    if creds:
        return ImageError(
            f"{what}: the registry refused the credentials from {creds.source} (user {creds.user!r})",
            HINT.format(host=host),
        )
    return ImageError(
        f"{what}: the registry requires authentication, or there is no such repository"
        if repo
        else f"{host}: the registry requires authentication",
        HINT.format(host=host),
    )


def _write_config(path, data):
    """Replace path atomically with data, mode 0600 (mkstemp creates it so)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".config-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(host, user, secret, env=os.environ):
    """`registry login`: store host's credentials in the Docker config file; -> its path."""
    path = docker_config(env)
    data = read_file(path)
    auths = data.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"auth file {path}: 'auths' is not a JSON object")
    host = host_key(host)
    for key in [k for k in auths if host_key(k) == host]:
        del auths[key]
    auths[HUB_KEY if host == "docker.io" else host] = {"auth": base64.b64encode(f"{user}:{secret}".encode()).decode()}
    _write_config(path, data)
    return path


def forget(host, env=os.environ):
    """`registry logout`: -> (path, whether an entry was removed)."""
    path = docker_config(env)
    data = read_file(path)
    host = host_key(host)
    keys = [k for k in (data.get("auths") or {}) if host_key(k) == host]
    for key in keys:
        del data["auths"][key]
    if keys:
        _write_config(path, data)
    return path, bool(keys)
