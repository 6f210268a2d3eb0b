"""The container's environment, computed from the host's (pure functions).

Order, lowest to highest: host environment (minus hpcrun's and Apptainer's own
settings, minus PATH) < the image's /.singularity.d/env/*.sh < SINGULARITYENV_X <
APPTAINERENV_X < HPCRUN_ENV_X < --env-file < --env. The image scripts can only be run
inside the container, so everything above them is "forced": re-exported after them.
"""
from hpcrun.errors import UsageError

OWN_PREFIXES = ("HPCRUN_", "APPTAINER_", "APPTAINERENV_", "SINGULARITY_", "SINGULARITYENV_")
FORCE_PREFIXES = ("SINGULARITYENV_", "APPTAINERENV_", "HPCRUN_ENV_")  # rising precedence
ENV_DIR = "/.singularity.d/env"


def parse_env_file(path, text):
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, eq, value = line.partition("=")
        if not eq or not valid_name(key):
            raise UsageError(f"--env-file {path}: line {n} is not KEY=VALUE", "fix the line or remove it")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def valid_name(key):
    return bool(key) and (key[0].isalpha() or key[0] == "_") and all(c.isalnum() or c == "_" for c in key)


def parse_env_opts(values):
    out = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq or not valid_name(key):
            raise UsageError(f"--env {item!r}: not KEY=VALUE", "e.g. --env OMP_NUM_THREADS=4")
        out[key] = value
    return out


def build(host_env, *, cleanenv, keep, env_files, env_opts, home, default_path, extra):
    """Return (env, forced): env is what the container starts with, forced is re-applied
    after the image's own environment scripts."""
    if cleanenv:
        env = {k: v for k, v in host_env.items() if k in keep}
    else:
        env = {k: v for k, v in host_env.items() if not k.startswith(OWN_PREFIXES) and k != "PATH"}
    env["PATH"] = default_path
    env["HOME"] = home
    env.update(extra)
    forced = {}
    for prefix in FORCE_PREFIXES:
        for k, v in host_env.items():
            if k.startswith(prefix) and valid_name(k[len(prefix):]):
                forced[k[len(prefix):]] = v
    for fe in env_files:
        forced.update(fe)
    forced.update(env_opts)
    env.update({k: v for k, v in forced.items() if k not in ("PREPEND_PATH", "APPEND_PATH")})
    if "PREPEND_PATH" in forced:
        env["PATH"] = forced["PREPEND_PATH"] + ":" + env["PATH"]
    if "APPEND_PATH" in forced:
        env["PATH"] = env["PATH"] + ":" + forced["APPEND_PATH"]
    return env, forced


def quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def wrapper_script(forced):
    """Shell text that sources the image's env scripts, then re-applies forced values."""
    lines = [f'for __f in {ENV_DIR}/*.sh; do [ -f "$__f" ] && . "$__f"; done; unset __f']
    for k, v in forced.items():
        if k == "PREPEND_PATH":
            lines.append(f'export PATH={quote(v)}:"$PATH"')
        elif k == "APPEND_PATH":
            lines.append(f'export PATH="$PATH":{quote(v)}')
        else:
            lines.append(f"export {k}={quote(v)}")
    lines.append('exec "$@"')
    return "\n".join(lines)
