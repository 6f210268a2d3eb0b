"""Configuration: packaged defaults < /etc/hpcrun < ~/.config/hpcrun < $HPCRUN_CONFIG.

Parsing YAML costs tens of milliseconds (importing the parser alone), paid on every
container start; so the merged result is cached with marshal, keyed by each file's
path, size, mtime, inode, device and ctime, and YAML is only imported when a file changed.
"""

import marshal
import os
import sys

from hpcrun.errors import ConfigError

SCHEMA = {
    "mounts": dict,
    "scratch": list,
    "squashfuse": list,
    "fuse": str,
    "default_path": str,
    "tmpfs_size": str,
    "cleanenv_keep": list,
    "share": str,
    "share_idle_timeout": int,
    "ldconfig": list,
    "gpu_dev_dir": str,
    "cdi_dirs": list,
}
SHARE_MODES = ("auto", "always", "never")
SITE = "/etc/hpcrun/hpcrun.yaml"


def packaged_default():
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (
        os.path.join(sys.prefix, "share", "hpcrun", "hpcrun.yaml"),
        os.path.join(os.path.dirname(here), "conf", "hpcrun.yaml"),
    ):
        if os.path.exists(cand):
            return cand
    raise ConfigError("packaged default configuration hpcrun.yaml is missing", "reinstall hpcrun")


def config_files(env=os.environ):
    home = env.get("HOME") or os.path.expanduser("~")
    user_dir = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files = [packaged_default(), SITE, os.path.join(user_dir, "hpcrun", "hpcrun.yaml")]
    if env.get("HPCRUN_CONFIG"):
        files.append(env["HPCRUN_CONFIG"])
    return files


def merge(base, over, source):
    out = dict(base)
    for key, value in over.items():
        if key not in SCHEMA:
            raise ConfigError(f"{source}: unknown key {key!r}", f"known keys: {', '.join(sorted(SCHEMA))}")
        if not isinstance(value, SCHEMA[key]):
            raise ConfigError(f"{source}: key {key!r} must be a {SCHEMA[key].__name__}, not {type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: key {key!r} must be a list of strings")
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in base.get(key, {}):
                    raise ConfigError(
                        f"{source}: unknown key {key}.{k}", f"known: {', '.join(sorted(base.get(key, {})))}"
                    )
                if not isinstance(v, bool):
                    raise ConfigError(f"{source}: key {key}.{k} must be true or false")
            out[key] = {**base.get(key, {}), **value}
        else:
            out[key] = value
    if out.get("share", "auto") not in SHARE_MODES:
        raise ConfigError(f"{source}: key 'share' must be one of {', '.join(SHARE_MODES)}")
    if isinstance(out.get("share_idle_timeout"), bool) or out.get("share_idle_timeout", 0) < 0:
        raise ConfigError(f"{source}: key 'share_idle_timeout' must be a number of seconds >= 0")
    return out


def parse_file(path):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}:{where} malformed YAML: {getattr(e, 'problem', None) or e}", "fix or remove the file"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: configuration must be a mapping of keys to values")
    return data


def load(env=os.environ):
    files = config_files(env)
    key = []
    for path in files:
        try:
            st = os.stat(path)
            # size and mtime alone miss a same-size rewrite with the mtime set back
            # (os.utime); inode, device and ctime (which no user can set) catch it
            key.append((path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns))
        except FileNotFoundError:
            if path == env.get("HPCRUN_CONFIG"):
                raise ConfigError(f"HPCRUN_CONFIG names a missing file: {path}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from None
    cache = _cache_path(env)
    if cache:
        try:
            with open(cache, "rb") as f:
                cached_key, cfg = marshal.load(f)
            if cached_key == key:
                return cfg
        except (OSError, EOFError, ValueError, TypeError):
            pass
    cfg = {}
    for i, (path, *_stat) in enumerate(key):
        data = parse_file(path)
        cfg = data if i == 0 else merge(cfg, data, path)
    if cache:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}"
            with open(tmp, "wb") as f:
                marshal.dump((key, cfg), f)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the YAML parse
    return cfg


def _cache_path(env):
    """One cache per $HPCRUN_CONFIG file: runs that alternate between two would otherwise
    keep replacing each other's cache and parse YAML every time."""
    base = env.get("XDG_CACHE_HOME") or (os.path.join(env["HOME"], ".cache") if env.get("HOME") else None)
    if not base:
        return None
    name = "config.marshal"
    if env.get("HPCRUN_CONFIG"):
        import zlib

        name = f"config-{zlib.crc32(os.fsencode(env['HPCRUN_CONFIG'])):08x}.marshal"
    return os.path.join(base, "hpcrun", name)
