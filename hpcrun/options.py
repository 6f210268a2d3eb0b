"""The options of exec/run/shell, as one table.

The click commands in cli.py are generated from this table (for --help and errors),
and `fast_parse` parses the same table without importing click: click's import alone
costs ~40 ms here, more than the whole rest of a container start. Anything the fast
parser does not recognise (--help, an unknown flag) is handed to click, so users see
click's messages and exit code 2.
"""

# (short, long, dest, kind, metavar, help); kind: flag | value | multi
OPTIONS = [
    ("-B", "--bind", "bind", "multi", "SRC[:DST[:ro|rw]]",
     "Bind a host path into the container (repeatable, comma lists; also $HPCRUN_BIND)."),
    (None, "--no-home", "no_home", "flag", None, "Do not bind the home directory."),
    ("-H", "--home", "home", "value", "SRC[:DST]", "Bind SRC as the home directory (at DST)."),
    ("-c", "--contain", "contain", "flag", None,
     "Bind neither home, /tmp, /var/tmp nor the working directory; use empty ones."),
    ("-C", "--containall", "containall", "flag", None,
     "--contain plus --pid, --ipc and --cleanenv."),
    (None, "--pwd", "pwd", "value", "DIR", "Working directory inside the container."),
    ("-e", "--cleanenv", "cleanenv", "flag", None, "Do not pass the host environment in."),
    (None, "--env", "env", "multi", "K=V", "Set an environment variable inside (repeatable)."),
    (None, "--env-file", "env_file", "multi", "FILE", "Read K=V lines into the environment."),
    (None, "--writable-tmpfs", "writable_tmpfs", "flag", None,
     "Make the root writable; changes live in memory and vanish at exit."),
    ("-w", "--writable", "writable", "flag", None,
     "Write to a sandbox directory image in place (no memory layer)."),
    (None, "--fakeroot", "fakeroot", "flag", None,
     "Run as root inside, mapping your /etc/subuid range."),
    (None, "--no-mount", "no_mount", "multi", "LIST",
     "Skip default mounts: home,tmp,cwd,proc,sys,dev,hosts,localtime,resolv,scratch or a path."),
    (None, "--unsquash", "unsquash", "flag", None,
     "Extract the image to a temporary sandbox instead of mounting it with FUSE."),
    (None, "--pid", "pid", "flag", None, "New PID namespace (the command sees only its own processes)."),
    (None, "--ipc", "ipc", "flag", None, "New IPC namespace."),
    (None, "--uts", "uts", "flag", None, "New UTS namespace."),
    (None, "--hostname", "hostname", "value", "NAME", "Host name inside (implies --uts)."),
    (None, "--net", "net", "flag", None, "New network namespace with loopback only."),
    (None, "--sharens", "sharens", "flag", None,
     "Share one container (namespaces, image mount) with other tasks of yours on this node "
     "that run the same image with the same options (automatic in Slurm steps)."),
    (None, "--no-sharens", "no_sharens", "flag", None, "Never share the container, also in Slurm steps."),
    (None, "--dry-run", "dry_run", "flag", None, "Print the container plan as JSON; run nothing."),
    ("-q", "--quiet", "quiet", "flag", None, "Print errors only."),
    ("-v", "--verbose", "verbose", "flag", None, "Print what hpcrun does."),
    (None, "--debug", "debug", "flag", None, "Print timings per phase and tracebacks."),
]

BY_FLAG = {}
for _opt in OPTIONS:
    for _flag in _opt[:2]:
        if _flag:
            BY_FLAG[_flag] = _opt


def defaults():
    return {o[2]: ([] if o[3] == "multi" else False if o[3] == "flag" else None) for o in OPTIONS}


class NeedClick(Exception):
    """The fast parser cannot handle these arguments; let click do it."""


def fast_parse(args):
    """Parse `[OPTIONS] IMAGE [COMMAND...]` -> (options dict, image, command list)."""
    opts = defaults()
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        value = None
        if a.startswith("--"):
            flag, eq, value = a.partition("=")
            if not eq:
                value = None
            names = [flag]
        elif len(a) > 2 and BY_FLAG.get(a[:2], (0, 0, 0, "flag"))[3] != "flag":
            names, value = [a[:2]], a[2:]            # -B/src:/dst
        else:
            names = ["-" + c for c in a[1:]]         # -ce
        for n, flag in enumerate(names):
            opt = BY_FLAG.get(flag)
            if opt is None:
                raise NeedClick(flag)
            kind, dest = opt[3], opt[2]
            if kind == "flag":
                if value is not None:
                    raise NeedClick(flag)
                opts[dest] = True
                continue
            if value is None:
                if n != len(names) - 1 or i + 1 >= len(args):
                    raise NeedClick(flag)
                i += 1
                value = args[i]
            if kind == "multi":
                opts[dest].append(value)
            else:
                opts[dest] = value
        i += 1
    if i >= len(args):
        raise NeedClick("IMAGE")
    return opts, args[i], args[i + 1:]
