"""The container's environment, computed from the host's (pure functions).

Order, lowest to highest: host environment (minus hpcrun's and Apptainer's own
settings, minus PATH) < the image's /.singularity.d/env/*.sh < SINGULARITYENV_X <
APPTAINERENV_X < HPCRUN_ENV_X < --env-file < --env. The image scripts can only be run
inside the container, so everything above them is "forced": re-exported after them.
"""

from hpcrun.errors import UsageError

OWN_PREFIXES = ("HPCRUN_", "APPTAINER_", "APPTAINERENV_", "SINGULARITY_", "SINGULARITYENV_")
EVAL_CHARS = ("$", "`", "\\")  # what the container's shell would change in a value
FORCE_PREFIXES = ("SINGULARITYENV_", "APPTAINERENV_", "HPCRUN_ENV_")  # rising precedence
ENV_DIR = "/.singularity.d/env"
# Host libraries (--nv, --rocm) are bound here; it is on every container's
# LD_LIBRARY_PATH, last, as in Apptainer: an image's own CUDA toolkit libraries win.
LIBS_DIR = "/.singularity.d/libs"
OLD_ENV = "/environment"  # Singularity < 2.3 images: one file, no ENV_DIR
# PWD is the container's (plan), OLDPWD means nothing there; the host's LD_LIBRARY_PATH
# (module loads) would break the image's programs: Apptainer omits it too.
HOST_ONLY = ("PATH", "PWD", "OLDPWD", "LD_LIBRARY_PATH")
# Apptainer's alwaysOmitKeys that APPTAINERENV_X may not set (create.go): the container's
# own; PATH is settable, through Apptainer's SING_USER_DEFINED_PATH.
NOT_OVERRIDABLE = ("HOME", "APPTAINER_SHELL", "APPTAINER_APPNAME", "SINGULARITY_SHELL", "SINGULARITY_APPNAME")
PATH_KEYS = ("PREPEND_PATH", "APPEND_PATH")
READONLY = ("EUID", "GID", "HOME", "IFS", "OPTIND", "PWD", "UID")  # Apptainer drops these from env files


def parse_env_file(path, text, host_env=None):
    """An env file as Apptainer reads it (it evaluates the file with an embedded shell,
    commands disabled): assignment lines, optionally after `export`, several per line;
    comments; quotes; $VAR and ${VAR} from earlier assignments or the host environment
    (host_env) expanded, except inside single quotes. A command is an error, as there."""
    out = {}
    scope = dict(host_env or {})
    for n, line in enumerate(text.splitlines(), 1):
        try:
            words = shell_words(line, scope)
        except ValueError as e:
            raise UsageError(f"--env-file {path}: line {n}: {e}", "fix the line or remove it") from None
        exported = bool(words) and words[0] == ("export", False)
        if exported and len(words) == 1:
            raise UsageError(f"--env-file {path}: line {n} is not KEY=VALUE", "fix the line or remove it")
        for word, had_eq in words[exported:]:
            key, eq, value = word.partition("=")
            if exported and not had_eq and valid_name(word):
                if word in scope and word not in READONLY:  # `export NAME`: an existing value
                    out[word] = scope[word]
                continue
            if not had_eq or not valid_name(key):
                raise UsageError(
                    f"--env-file {path}: line {n} is not KEY=VALUE", "fix the line or remove it (commands are not run)"
                )
            scope[key] = value
            if key not in READONLY:
                out[key] = value
    return out


def shell_words(line, scope):
    """Split one line into shell words -> [(text, has an unquoted '=' after a name)]:
    quotes removed, variables expanded (not inside '...'), an unquoted # starting a word
    ends the line. Command substitution is refused."""
    words, cur, eq, quote_ch, i, n = [], None, False, None, 0, len(line)

    def add(text):
        nonlocal cur
        cur = (cur or "") + text

    while i < n:
        c = line[i]
        if quote_ch == "'":
            if c == "'":
                quote_ch = None
            else:
                add(c)
        elif c == "\\" and quote_ch is None:
            if i + 1 < n:
                i += 1
                add(line[i])
        elif c == "\\" and i + 1 < n:  # in "...": only these are escapes
            i += 1
            add(line[i] if line[i] in '$`"\\' else "\\" + line[i])
        elif c == "`" or c == "$" and line[i + 1 : i + 2] == "(":
            raise ValueError("command substitution is not run")
        elif c == "$" and i + 1 < n and (line[i + 1] in "{_" or line[i + 1].isalpha()):
            if line[i + 1] == "{":
                j = line.find("}", i)
                if j < 0:
                    raise ValueError("unterminated ${")
                name, end = line[i + 2 : j], j + 1
            else:
                j = i + 1
                while j < n and (line[j].isalnum() or line[j] == "_"):
                    j += 1
                name, end = line[i + 1 : j], j
            if not valid_name(name):
                raise ValueError(f"unsupported expansion ${{{name}}}")
            add(scope.get(name, ""))
            i = end
            continue
        elif quote_ch == '"':
            if c == '"':
                quote_ch = None
            else:
                add(c)
        elif c in "'\"":
            quote_ch = c
            add("")
        elif c in " \t":
            if cur is not None:
                words.append((cur, eq))
                cur, eq = None, False
        elif c == "#" and cur is None:
            break
        elif c in ";&|<>()":
            raise ValueError(f"{c!r}: only assignments are read")
        else:
            if c == "=" and not eq and cur is not None and valid_name(cur):
                eq = True
            add(c)
        i += 1
    if quote_ch:
        raise ValueError("unterminated quote")
    if cur is not None:
        words.append((cur, eq))
    return words


def valid_name(key):
    return bool(key) and (key[0].isalpha() or key[0] == "_") and all(c.isalnum() or c == "_" for c in key)


def parse_env_opts(values):
    """--env as Apptainer's map flag (pflag StringToString) reads it: one '=' in the
    argument is one pair (commas kept, surrounding '"' trimmed); more are a CSV record of
    pairs, so a comma inside a value needs CSV quotes: --env '"A=1,2",B=3'. Repeated
    --env options add up, a later key wins."""
    out = {}
    for item in values:
        if item.count("=") == 1:
            pairs = [item.strip('"')]
        elif "=" not in item:
            pairs = [item]
        else:
            import csv

            try:
                pairs = next(csv.reader([item], strict=True), [])
            except csv.Error as e:
                raise UsageError(f"--env {item!r}: {e}", "quote a value with commas: --env '\"A=1,2\",B=3'") from None
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not valid_name(key):
                raise UsageError(f"--env {pair!r}: not KEY=VALUE", "e.g. --env OMP_NUM_THREADS=4")
            out[key] = value
    return out


def append_dirs(value, dirs):
    """LD_LIBRARY_PATH with dirs appended, each once."""
    parts = [p for p in (value or "").split(":") if p]
    for d in dirs:
        if d not in parts:
            parts.append(d)
    return ":".join(parts)


def build(
    host_env, *, cleanenv, keep, env_files, env_opts, home, default_path, extra, lib_dirs=(LIBS_DIR,), no_eval=False
):
    """Return (env, forced): env is what the container starts with, forced is re-applied
    after the image's own environment scripts. A forced value the container's shell will
    evaluate is not in env: the image's scripts must see what was there before it (a
    `PATH=$PATH:/x` extends the image's PATH, as in Apptainer)."""
    if cleanenv:
        env = {k: v for k, v in host_env.items() if k in keep}
    else:
        env = {k: v for k, v in host_env.items() if not k.startswith(OWN_PREFIXES) and k not in HOST_ONLY}
    env["PATH"] = default_path
    env["HOME"] = home
    env.update(extra)
    forced = {}
    for prefix in FORCE_PREFIXES:
        for k, v in host_env.items():
            name = k[len(prefix) :]
            if k.startswith(prefix) and valid_name(name) and name not in NOT_OVERRIDABLE:
                forced[name] = v
    for fe in env_files:
        forced.update(fe)
    forced.update(env_opts)
    now = {k: v for k, v in forced.items() if no_eval or not any(c in v for c in EVAL_CHARS)}
    env.update({k: v for k, v in now.items() if k not in PATH_KEYS})
    if "PATH" not in forced:  # a PATH given wins over both, as in Apptainer's 99-runtimevars.sh
        if "PREPEND_PATH" in now:
            env["PATH"] = forced["PREPEND_PATH"] + ":" + env["PATH"]
        if "APPEND_PATH" in now:
            env["PATH"] = env["PATH"] + ":" + forced["APPEND_PATH"]
    if "LD_LIBRARY_PATH" in forced:  # re-applied after the image's scripts: with the dirs
        forced["LD_LIBRARY_PATH"] = append_dirs(forced["LD_LIBRARY_PATH"], lib_dirs)
    env["LD_LIBRARY_PATH"] = append_dirs(env.get("LD_LIBRARY_PATH"), lib_dirs)
    return env, forced


def quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def dquote(value):
    """Apptainer's default: the value in double quotes, evaluated by the container's shell
    ($VAR, $(cmd), one level of backslashes); only '"' is escaped."""
    return '"' + value.replace('"', '\\"') + '"'


def needs_eval(forced, no_eval):
    """Would the container's shell change a forced value (so the wrapper must run)?"""
    return not no_eval and any(c in v for v in forced.values() for c in EVAL_CHARS)


def app_script(app):
    """--app NAME, after the image's env scripts (so an Apptainer image's own 95-apps.sh
    finds no SINGULARITY_APPNAME and stays idle): as Apptainer's: the app's root and bin
    before PATH, its lib before LD_LIBRARY_PATH, its 01-base.sh and 90-environment.sh."""
    a = quote(f"/scif/apps/{app}")
    return (
        f"export SINGULARITY_APPNAME={quote(app)} APPTAINER_APPNAME={quote(app)}\n"
        f"export SCIF_APPS=/scif/apps SCIF_APPROOT={a}\n"
        f'PATH={a}:"$PATH"\n'
        f'[ ! -d {a}/bin ] || PATH={a}/bin:"$PATH"\n'
        f'[ ! -d {a}/lib ] || export LD_LIBRARY_PATH={a}/lib"${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"\n'
        f'for __f in {a}/scif/env/01-base.sh {a}/scif/env/90-environment.sh; do [ -f "$__f" ] && . "$__f"; done\n'
        "unset __f; export PATH"
    )


# Apptainer's action script (set_default_ld_library_path, then PREPEND_/APPEND_LD_LIBRARY_PATH):
# when LD_LIBRARY_PATH is only the libs directory and that holds libraries (--nv), the
# image's own library directories (its ldconfig's list) go first, so that the image's
# libraries, searched before the system's otherwise, still win over the host's.
LD_DEFAULTS = f"""__n=; for __f in {LIBS_DIR}/*; do [ -e "$__f" ] && __n=1; break; done
if [ "$LD_LIBRARY_PATH" = {LIBS_DIR} ] && [ -n "$__n${{PREPEND_LD_LIBRARY_PATH:-}}${{APPEND_LD_LIBRARY_PATH:-}}" ]; then
    __n=$(/sbin/ldconfig -Nv 2>/dev/null | while IFS= read -r __f; do
        case $__f in "	"* | "") ;; *) printf %s: "${{__f%%:*}}" ;; esac; done)
    export LD_LIBRARY_PATH="$__n$LD_LIBRARY_PATH"
fi
if [ -n "${{LD_LIBRARY_PATH:-}}" ]; then
    [ -z "${{PREPEND_LD_LIBRARY_PATH:-}}" ] || LD_LIBRARY_PATH="$PREPEND_LD_LIBRARY_PATH:$LD_LIBRARY_PATH"
    [ -z "${{APPEND_LD_LIBRARY_PATH:-}}" ] || LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$APPEND_LD_LIBRARY_PATH"
fi
unset __n __f"""


LD_KEYS = {"PREPEND_LD_LIBRARY_PATH", "APPEND_LD_LIBRARY_PATH"}


def under_libs(path):
    """A mount into the libs directory (--nv, -B X:/.singularity.d/libs/Y): LD_DEFAULTS must run."""
    return path == LIBS_DIR or path.startswith(LIBS_DIR + "/")


def wrapper_script(forced, no_eval=True, ids=None, app=None, lib_dirs=(LIBS_DIR,)):
    """Shell text that sources the image's env scripts, then re-applies forced values
    (evaluated by the shell unless no_eval). The PATH it starts with already has
    PREPEND/APPEND_PATH (for images without a wrapper): they are taken off first, so
    that they are applied once, after the image's scripts, as Apptainer's
    99-runtimevars.sh does. ids: (uid, gid) for $UID, $EUID and $GID in evaluated values,
    as Apptainer's embedded shell defines them (bash has them already; not exported)."""
    q = quote if no_eval else dquote
    lines = []
    if ids and not no_eval:
        lines.append(': "${UID:=%d}" "${EUID:=%d}" "${GID:=%d}"' % (ids[0], ids[0], ids[1]))
    if "PREPEND_PATH" in forced:
        lines.append(f"PATH=${{PATH#{quote(forced['PREPEND_PATH'] + ':')}}}")
    if "APPEND_PATH" in forced:
        lines.append(f"PATH=${{PATH%{quote(':' + forced['APPEND_PATH'])}}}")
    lines.append(  # ENV_DIR's scripts, else an old image's /environment (Apptainer's action script)
        f'if [ -d {ENV_DIR} ]; then for __f in {ENV_DIR}/*.sh; do [ -f "$__f" ] && . "$__f"; done; unset __f; '
        f"elif [ -f {OLD_ENV} ]; then . {OLD_ENV}; fi"
    )
    if app:
        lines.append(app_script(app))
    for k, v in forced.items():
        if k not in PATH_KEYS and k != "PATH":
            lines.append(f"export {k}={q(v)}")
    if "PATH" in forced:  # last and alone, as Apptainer's 99-runtimevars.sh applies it
        lines.append(f"export PATH={q(forced['PATH'])}")
    else:
        if "PREPEND_PATH" in forced:
            lines.append(f'export PATH={q(forced["PREPEND_PATH"])}:"$PATH"')
        if "APPEND_PATH" in forced:
            lines.append(f'export PATH="$PATH":{q(forced["APPEND_PATH"])}')
    for d in lib_dirs:  # an image's script may have set LD_LIBRARY_PATH: append again
        add = f'export LD_LIBRARY_PATH="${{LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}}"{quote(d)}'
        lines.append(f'case ":$LD_LIBRARY_PATH:" in *:{quote(d)}:*) ;; *) {add} ;; esac')
    lines.append(LD_DEFAULTS)
    lines.append('exec "$@"')
    return "\n".join(lines)
