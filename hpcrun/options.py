"""The options of exec/run/shell (and of Apptainer's other commands), as one table.

The click commands in clickapp.py are generated from this table (for --help and errors),
and `fast_parse` parses the same table without importing click: click's import alone
costs ~40 ms here, more than the whole rest of a container start. Anything the fast
parser does not recognise (--help, an unknown flag) is handed to click, so users see
click's messages and exit code 2.

Every name Apptainer has for these commands is in a table (tests/data/apptainer-flags.txt
lists them, tests/unit/test_apptainer_cli.py checks), each with a status: implemented
(""), "noop:WHY" (hpcrun always behaves that way) or "refused:WHY" (one line, exit 2).
Options are also read from APPTAINER_<KEY> and SINGULARITY_<KEY> (`apply_env`).
"""

# The Apptainer release `--version` claims. Clients gate on it (Snakemake: apptainer >= 1.0,
# cwltool: apptainer >= 1.1 for its current code path); 1.3 is the series most clusters run,
# and every flag of 1.3.6 is in the tables below (they come from a newer Apptainer, a
# superset), so clients that pick flags by version find them all.
APPTAINER_VERSION = "1.3.6"

ACTIONS = ("exec", "run", "shell", "test")
_ALL = ACTIONS + ("instance start",)


def _o(flags, dest, kind="flag", metavar=None, help_="", env="", status="", cmds=_ALL):
    """flags: "-B --bind" (first short, if any); env: Apptainer's EnvKeys, space-separated;
    cmds: the commands that take it."""
    return (tuple(flags.split()), dest, kind, metavar, help_, tuple(env.split()), status, cmds)


_ROOT = "refused:needs root privileges, which hpcrun never has"
_GPU = "refused:GPU support is not there yet in hpcrun"
_CGROUP = "refused:hpcrun sets no cgroup limits (use your batch system's, e.g. Slurm's --mem/--cpus-per-task)"
_NET = "refused:hpcrun makes no network interfaces (only --network none: loopback only)"
_CREDS = (
    "refused:give registry credentials as APPTAINER_DOCKER_USERNAME/APPTAINER_DOCKER_PASSWORD "
    "or with hpcrun registry login"
)


def _credential_options(authfile_help):
    """The registry credential flags that exec/run/shell and build/pull share."""
    refused = "Refused: see hpcrun registry login."
    return [
        _o("--docker-login", "docker_login", help_=refused, status=_CREDS),
        _o("--docker-username", "docker_username", "value", "NAME", refused, status=_CREDS),
        _o("--docker-password", "docker_password", "value", "PASSWORD", refused, status=_CREDS),
        _o(
            "--docker-host",
            "docker_host",
            "value",
            "HOST",
            "Refused: no Docker daemon.",
            status="refused:hpcrun talks to no Docker daemon",
        ),
        _o("--authfile", "authfile", "value", "FILE", authfile_help, "AUTH_FILE"),
    ]


# Apptainer EnvKeys that are not read as options here: the registry code reads the
# credentials itself (APPTAINER_DOCKER_USERNAME/PASSWORD), and a refused option must not
# stop every start because a site exports APPTAINER_DOCKER_HOST or _LOGIN.
ENV_ELSEWHERE = ("DOCKER_USERNAME", "DOCKER_PASSWORD", "DOCKER_LOGIN", "DOCKER_HOST")
_NOCACHE = "noop:hpcrun's content-addressed cache is always used (each entry is checked by digest)"
_NOHTTPS = "noop:hpcrun speaks plain HTTP to registries on loopback addresses only"
_CRYPT = "refused:encrypted images are not supported"
_BIND_HELP = "Bind a host path into the container (repeatable, comma lists; also $HPCRUN_BIND)."

# (flags, dest, kind, metavar, help, env keys, status, commands); kind: flag | value | multi
OPTIONS = [
    _o("-B --bind", "bind", "multi", "SRC[:DST[:ro|rw]]", _BIND_HELP, "BIND BINDPATH"),
    _o(
        "--mount",
        "mount",
        "multi",
        "type=bind,src=S,dst=D[,ro]",
        "Docker-style bind (type bind only; keys src/source, dst/target/destination, ro/readonly).",
        "MOUNT",
    ),
    _o("--no-home", "no_home", help_="Do not bind the home directory.", env="NO_HOME"),
    _o("-H --home", "home", "value", "SRC[:DST]", "Bind SRC as the home directory (at DST).", "HOME"),
    _o(
        "-c --contain",
        "contain",
        help_="Bind neither home, /tmp, /var/tmp nor the working directory (empty ones instead); a minimal /dev.",
        env="CONTAIN",
    ),
    _o("-C --containall", "containall", help_="--contain plus --pid, --ipc and --cleanenv.", env="CONTAINALL"),
    _o(
        "--compat",
        "compat",
        help_="As Apptainer's: --containall --no-init --no-umask --no-eval --writable-tmpfs.",
        env="COMPAT",
    ),
    _o(
        "--pwd --cwd",
        "pwd",
        "value",
        "DIR",
        "Working directory inside the container.",
        "CWD TARGET_CWD PWD TARGET_PWD",
        cmds=ACTIONS,
    ),
    _o("-e --cleanenv", "cleanenv", help_="Do not pass the host environment in.", env="CLEANENV"),
    _o("--env", "env", "multi", "K=V", "Set an environment variable inside (repeatable)."),
    _o("--env-file", "env_file", "multi", "FILE", "Read K=V lines into the environment.", "ENV_FILE"),
    _o("--no-env", "no_env", "multi", "LIST", "Do not pass these host variables in (comma list).", "NOENV"),
    _o(
        "--no-eval",
        "no_eval",
        help_="Do not shell-evaluate environment values or the runscript's arguments.",
        env="NO_EVAL",
    ),
    _o(
        "--writable-tmpfs",
        "writable_tmpfs",
        help_="Make the root writable; changes live in memory and vanish at exit.",
        env="WRITABLE_TMPFS",
    ),
    _o(
        "-w --writable",
        "writable",
        help_="Write to a sandbox directory image in place (no memory layer).",
        env="WRITABLE",
    ),
    _o("-f --fakeroot", "fakeroot", help_="Run as root inside, mapping your /etc/subuid range.", env="FAKEROOT"),
    _o(
        "--no-mount",
        "no_mount",
        "multi",
        "LIST",
        "Skip default mounts: home,tmp,cwd,proc,sys,dev,devpts,hosts,localtime,resolv,scratch or a path.",
        "NO_MOUNT",
    ),
    _o(
        "--unsquash",
        "unsquash",
        help_="Extract the image to a temporary sandbox instead of mounting it with FUSE.",
        env="UNSQUASH",
    ),
    _o(
        "-p --pid",
        "pid",
        help_="New PID namespace (the command sees only its own processes).",
        env="PID UNSHARE_PID",
        cmds=ACTIONS,
    ),
    _o(
        "--no-pid",
        "no_pid",
        help_="No new PID namespace (also not with --containall/--compat).",
        env="NO_PID",
        cmds=ACTIONS,
    ),
    _o("-i --ipc", "ipc", help_="New IPC namespace.", env="IPC UNSHARE_IPC"),
    _o("--uts", "uts", help_="New UTS namespace.", env="UTS UNSHARE_UTS"),
    _o("--hostname", "hostname", "value", "NAME", "Host name inside (implies --uts).", "HOSTNAME"),
    _o("-n --net", "net", help_="New network namespace with loopback only.", env="NET UNSHARE_NET"),
    _o(
        "--network",
        "network",
        "value",
        "TYPE",
        "none: a network namespace with loopback only (the only type hpcrun has).",
        "NETWORK",
    ),
    _o("--no-umask", "no_umask", help_="Start the command with umask 0022, not yours.", env="NO_UMASK"),
    _o(
        "-s --shell",
        "shell",
        "value",
        "PATH",
        "The program `shell` starts (default /bin/bash, else /bin/sh).",
        "SHELL",
        cmds=("shell",),
    ),
    _o("--tmpdir", "tmpdir", "value", "DIR", "Where --unsquash extracts the image (default $TMPDIR).", "TMPDIR"),
    _o(
        "--sharens",
        "sharens",
        help_="Share one container (namespaces, image mount) with other tasks of "
        "yours on this node that run the same image with the same options (automatic in Slurm steps).",
        env="SHARENS",
        cmds=ACTIONS,
    ),
    _o("--no-sharens", "no_sharens", help_="Never share the container, also in Slurm steps.", cmds=ACTIONS),
    _o("--dry-run", "dry_run", help_="Print the container plan as JSON; run nothing.", cmds=ACTIONS),
    _o("-q --quiet", "quiet", help_="Print errors only."),
    _o("-v --verbose", "verbose", help_="Print what hpcrun does."),
    _o("--debug", "debug", help_="Print timings per phase and tracebacks."),
    # Always so in hpcrun:
    _o(
        "-u --userns",
        "userns",
        help_="No-op: hpcrun always runs in a user namespace.",
        env="USERNS UNSHARE_USERNS",
        status="noop:hpcrun always runs in an unprivileged user namespace",
    ),
    _o(
        "--no-init",
        "no_init",
        help_="With a PID namespace, the command itself is PID 1 (it may then ignore signals).",
        env="NOSHIMINIT",
    ),
    _o(
        "--no-privs",
        "no_privs",
        help_="No-op: you run as yourself, without privileges.",
        env="NO_PRIVS",
        status="noop:you run as yourself without privileges (root of --fakeroot is "
        "root of your own user namespace only)",
    ),
    _o(
        "--disable-cache",
        "disable_cache",
        help_="No-op: the cache is always used.",
        env="DISABLE_CACHE",
        status=_NOCACHE,
    ),
    _o(
        "--no-https --nohttps",
        "no_https",
        help_="No-op: registries on loopback addresses are spoken to over HTTP already.",
        env="NOHTTPS NO_HTTPS",
        status=_NOHTTPS,
    ),
    _o(
        "--underlay",
        "underlay",
        help_="No-op (deprecated in Apptainer).",
        env="UNDERLAY",
        status="noop:hpcrun makes missing mount points itself",
    ),
    _o(
        "--no-nv",
        "no_nv",
        help_="No-op: --nv is off unless given.",
        env="NV_OFF NO_NV",
        status="noop:hpcrun binds GPUs only when --nv is given",
    ),
    _o(
        "--no-rocm",
        "no_rocm",
        help_="No-op: --rocm is off unless given.",
        env="ROCM_OFF NO_ROCM",
        status="noop:hpcrun binds GPUs only when --rocm is given",
    ),
    _o(
        "--ignore-fakeroot-command",
        "ignore_fakeroot_command",
        help_="No-op: hpcrun uses no fakeroot command.",
        env="IGNORE_FAKEROOT_COMMAND",
        status="noop:hpcrun never uses the fakeroot command",
    ),
    _o(
        "--runscript-timeout",
        "runscript_timeout",
        "value",
        "DURATION",
        "No-op: no timeout is applied.",
        "RUNSCRIPT_TIMEOUT",
        status="noop:hpcrun applies no timeout to the runscript",
        cmds=("run", "instance run"),
    ),
    # Not possible (or not yet) without privilege:
    _o("--keep-privs", "keep_privs", help_="Refused: needs root.", env="KEEP_PRIVS", status=_ROOT),
    _o("--allow-setuid", "allow_setuid", help_="Refused: needs root.", env="ALLOW_SETUID", status=_ROOT),
    _o("--boot", "boot", help_="Refused: needs root.", env="BOOT", status=_ROOT, cmds=("instance start",)),
    _o("--apply-cgroups", "apply_cgroups", "value", "FILE", "Refused: needs root.", "APPLY_CGROUPS", _ROOT),
    _o("--add-caps", "add_caps", "value", "CAPS", "Refused: needs root.", "ADD_CAPS", _ROOT),
    _o(
        "--drop-caps",
        "drop_caps",
        "value",
        "CAPS",
        "Refused: not supported.",
        "DROP_CAPS",
        "refused:capability sets are not supported (you run without privileges anyway)",
    ),
    _o(
        "--security",
        "security",
        "multi",
        "SPEC",
        "Refused: not supported.",
        "SECURITY",
        "refused:SELinux, AppArmor and seccomp profiles are not supported",
    ),
    _o("--netns-path", "netns_path", "value", "PATH", "Refused: needs root.", "NETNS_PATH", _ROOT),
    _o("--network-args", "network_args", "multi", "ARGS", "Refused: no CNI networks.", "NETWORK_ARGS", _NET),
    _o(
        "--dns",
        "dns",
        "value",
        "LIST",
        "Refused: no network set-up.",
        "DNS",
        "refused:hpcrun uses the host's /etc/resolv.conf (bind your own over it with -B)",
    ),
    _o("--nv", "nv", help_="Bind the host's NVIDIA driver, tools and GPU devices in (conf/nvliblist.conf).", env="NV"),
    _o(
        "--nvccli",
        "nvccli",
        help_="As --nv, with the files nvidia-container-cli lists for $NVIDIA_VISIBLE_DEVICES.",
        env="NVCCLI",
    ),
    _o("--rocm", "rocm", help_="Bind the host's ROCm driver, tools, /dev/kfd and /dev/dri in.", env="ROCM"),
    _o("--compat32", "compat32", help_="Refused: no GPU support yet.", env="COMPAT32", status=_GPU),
    _o(
        "--intel-hpu",
        "intel_hpu",
        help_="Refused: no accelerator support yet.",
        env="INTEL_HPU",
        status="refused:accelerator support is not there yet in hpcrun",
    ),
    _o(
        "--device",
        "device",
        "multi",
        "VENDOR/CLASS=NAME",
        "CDI device(s) from the specs in /etc/cdi, /var/run/cdi (NAME may be all; comma lists).",
        cmds=ACTIONS + ("instance start",),
    ),
    _o(
        "--cdi-dirs",
        "cdi_dirs",
        "multi",
        "DIR",
        "Directories of CDI spec files, instead of /etc/cdi,/var/run/cdi (comma list).",
        cmds=ACTIONS + ("instance start",),
    ),
    _o("--cpu-shares", "cpu_shares", "value", "N", "Refused: no cgroups.", "CPU_SHARES", _CGROUP),
    _o("--cpus", "cpus", "value", "N", "Refused: no cgroups.", "CPU_SHARES", _CGROUP),
    _o("--cpuset-cpus", "cpuset_cpus", "value", "LIST", "Refused: no cgroups.", "CPUSET_CPUS", _CGROUP),
    _o("--cpuset-mems", "cpuset_mems", "value", "LIST", "Refused: no cgroups.", "CPUSET_MEMS", _CGROUP),
    _o("--memory", "memory", "value", "BYTES", "Refused: no cgroups.", "MEMORY", _CGROUP),
    _o(
        "--memory-reservation",
        "memory_reservation",
        "value",
        "BYTES",
        "Refused: no cgroups.",
        "MEMORY_RESERVATION",
        _CGROUP,
    ),
    _o("--memory-swap", "memory_swap", "value", "BYTES", "Refused: no cgroups.", "MEMORY_SWAP", _CGROUP),
    _o("--oom-kill-disable", "oom_kill_disable", help_="Refused: no cgroups.", env="OOM_KILL_DISABLE", status=_CGROUP),
    _o("--pids-limit", "pids_limit", "value", "N", "Refused: no cgroups.", "PIDS_LIMIT", _CGROUP),
    _o("--blkio-weight", "blkio_weight", "value", "N", "Refused: no cgroups.", "BLKIO_WEIGHT", _CGROUP),
    _o(
        "--blkio-weight-device",
        "blkio_weight_device",
        "multi",
        "DEV:N",
        "Refused: no cgroups.",
        "BLKIO_WEIGHT_DEVICE",
        _CGROUP,
    ),
    _o(
        "-o --overlay",
        "overlay",
        "multi",
        "IMAGE",
        "Refused: no overlay images.",
        "OVERLAY OVERLAYIMAGE",
        "refused:overlay images are not supported (use --writable-tmpfs, or a sandbox with --writable)",
    ),
    _o(
        "-W --workdir",
        "workdir",
        "value",
        "DIR",
        "Your directory for --contain's /tmp, /var/tmp and home (DIR/tmp, DIR/var_tmp, DIR/home) "
        "and -S's directories (DIR/scratch/...), instead of memory.",
        "WORKDIR",
    ),
    _o(
        "-S --scratch",
        "scratch",
        "multi",
        "DIR",
        "An empty directory at DIR: in memory (gone at exit), or in -W's DIR (repeatable, comma lists).",
        "SCRATCH SCRATCHDIR",
    ),
    _o(
        "--fusemount",
        "fusemount",
        "multi",
        "SPEC",
        "Refused: not supported.",
        "FUSESPEC",
        "refused:FUSE mounts other than the image's are not supported",
    ),
    _o(
        "--containlibs",
        "containlibs",
        "multi",
        "LIST",
        "Refused: not supported.",
        "CONTAINLIBS",
        "refused:not supported (bind the libraries with -B)",
    ),
    _o(
        "--app",
        "app",
        "value",
        "NAME",
        "Run the SCIF app NAME: its runscript/test/startscript, its environment, bin and lib.",
        "APP APPNAME",
    ),
    _o(
        "--ignore-subuid",
        "ignore_subuid",
        help_="Refused: not supported.",
        env="IGNORE_SUBUID",
        status="refused:not supported (without an /etc/subuid range --fakeroot maps root only)",
    ),
    _o(
        "--ignore-userns",
        "ignore_userns",
        help_="Refused: hpcrun needs user namespaces.",
        env="IGNORE_USERNS",
        status="refused:hpcrun always needs unprivileged user namespaces",
    ),
    *_credential_options("Registry credentials for docker:// images (as $REGISTRY_AUTH_FILE)."),
    _o("--passphrase", "passphrase", help_="Refused: no encrypted images.", status=_CRYPT),
    _o("--pem-path", "pem_path", "value", "FILE", "Refused: no encrypted images.", status=_CRYPT),
    _o(
        "--pid-file",
        "pid_file",
        "value",
        "FILE",
        "Write the instance's PID to FILE.",
        "PID_FILE",
        cmds=("instance start",),
    ),
    _o(
        "--dmtcp-launch",
        "dmtcp_launch",
        "value",
        "DIR",
        "Refused: no DMTCP.",
        "DMTCP_LAUNCH",
        "refused:DMTCP checkpoints are not supported",
        cmds=("instance start",),
    ),
    _o(
        "--dmtcp-restart",
        "dmtcp_restart",
        "value",
        "DIR",
        "Refused: no DMTCP.",
        "DMTCP_RESTART",
        "refused:DMTCP checkpoints are not supported",
        cmds=("instance start",),
    ),
]

# The options before the command (Apptainer's global flags).
GLOBAL = [
    _o("-q --quiet", "quiet", help_="Print errors only.", env="QUIET"),
    _o("-s --silent", "silent", help_="Print errors only (as --quiet).", env="SILENT"),
    _o("-v --verbose", "verbose", help_="Print what hpcrun does.", env="VERBOSE"),
    _o("-d --debug", "debug", help_="Print timings and tracebacks.", env="DEBUG"),
    _o(
        "--nocolor",
        "nocolor",
        help_="No-op: hpcrun prints no colour.",
        env="NOCOLOR",
        status="noop:hpcrun prints no colour",
    ),
    _o(
        "-c --config",
        "config",
        "value",
        "FILE",
        "Refused: hpcrun has its own configuration.",
        env="CONFIG_FILE",
        status="refused:hpcrun reads its own configuration (see $HPCRUN_CONFIG), not apptainer.conf",
    ),
    _o("--version", "version", help_="Print the version (as `apptainer`/`singularity`: Apptainer's line)."),
    _o(
        "--build-config",
        "build_config",
        help_="No-op: builds always run as you.",
        status="noop:hpcrun builds always run as you, without privileges",
    ),
]


def _by_flag(table, cmd):
    out = {}
    for opt in table:
        if cmd in opt[7]:
            for flag in opt[0]:
                out[flag] = opt
    return out


BY_CMD = {cmd: _by_flag(OPTIONS, cmd) for cmd in ACTIONS}
BY_FLAG = BY_CMD["exec"]
GLOBAL_BY_FLAG = _by_flag(GLOBAL, "exec")


def global_options(argv):
    """Apptainer's global flags before the command (also from APPTAINER_QUIET etc.) ->
    ({quiet, verbose, debug, version}, index of the command). NeedClick when unknown."""
    g = {o[1]: _default(o[2]) for o in GLOBAL}
    i = parse_options(argv, GLOBAL_BY_FLAG, g)
    if i < len(argv) and argv[i - 1 : i] == ["--"]:
        raise NeedClick("--")
    settle_table(GLOBAL, "exec", g, _environ(), stderr_note(g))
    return {
        "quiet": g["quiet"] or g["silent"],
        "verbose": g["verbose"],
        "debug": g["debug"],
        "version": g["version"],
    }, i


def _environ():
    import os

    return os.environ


def stderr_note(opts):
    """note(level, text) for apply_env: a line on stderr unless quiet."""

    def note(level, text):
        if not (opts.get("quiet") or opts.get("silent")):
            import sys

            from hpcrun import errors

            sys.stderr.write(f"{errors.PROG}: {level}: {text}\n")

    return note


def for_command(cmd):
    return [o for o in OPTIONS if cmd in o[7]]


def _default(kind):
    return [] if kind == "multi" else False if kind == "flag" else None


def defaults():
    return {o[1]: _default(o[2]) for o in OPTIONS}


class NeedClick(Exception):
    """The fast parser cannot handle these arguments; let click do it."""


def parse_options(args, by_flag, opts, stop_at_positional=True):
    """Parse leading options of args into opts; returns the index of the first
    argument that is not one. Raises NeedClick for anything unknown."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return i + 1
        if not a.startswith("-") or a == "-":
            return i
        value = None
        if a.startswith("--"):
            flag, eq, value = a.partition("=")
            if not eq:
                value = None
            names = [flag]
        elif len(a) > 2 and by_flag.get(a[:2], (0, 0, "flag"))[2] != "flag":
            names, value = [a[:2]], a[2:]  # -B/src:/dst
        else:
            names = ["-" + c for c in a[1:]]  # -ce
        for n, flag in enumerate(names):
            opt = by_flag.get(flag)
            if opt is None:
                raise NeedClick(flag)
            dest, kind = opt[1], opt[2]
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
    return i


def fast_parse(args, action="exec"):
    """Parse `[OPTIONS] IMAGE [COMMAND...]` -> (options dict, image, command list)."""
    opts = defaults()
    i = parse_options(args, BY_CMD.get(action, BY_FLAG), opts)
    if i >= len(args):
        raise NeedClick("IMAGE")
    return opts, args[i], args[i + 1 :]


# --- options from the environment, as Apptainer reads them ---------------------------

PREFIXES = ("APPTAINER_", "SINGULARITY_")
# Go's strconv.ParseBool, which Apptainer's boolean flags use
TRUE = ("1", "t", "T", "TRUE", "true", "True")
FALSE = ("0", "f", "F", "FALSE", "false", "False")
# Apptainer appends these to the command line's values (EnvAppendValue); all others
# are taken only when the option is not on the command line.
APPEND = ("bind", "mount")


def apply_env(table, cmd, opts, env, note, origins=None):
    """Fill opts from APPTAINER_<KEY>, then SINGULARITY_<KEY> (deprecated: a note), as
    Apptainer does: a command-line option wins, the APPTAINER_ key wins over the
    SINGULARITY_ one. note(level, text) reports; origins[dest] = the variable used."""
    from hpcrun.errors import UsageError

    env = {k: v for k, v in env.items() if k.startswith(PREFIXES)}  # one pass, usually empty:
    if not env:  # a miss in os.environ raises and catches a KeyError, ~200 of them per start
        return
    changed = {o[1] for o in table if opts.get(o[1], _default(o[2])) != _default(o[2])}
    found = {}
    for rank, prefix in enumerate(PREFIXES):
        for opt in table:
            if cmd not in opt[7]:
                continue
            for key in opt[5]:
                name = prefix + key
                val = env.get(name)
                if val is None:
                    continue
                if rank:
                    if key in found:
                        if found[key] != val:
                            note("warning", f"{name} and APPTAINER_{key} have different values, using the latter")
                        continue
                    note("info", f"Environment variable {name} is set, but APPTAINER_{key} is preferred")
                found[key] = val
                dest, kind, v = opt[1], opt[2], val.strip()
                if not v or dest in changed and dest not in APPEND:
                    continue
                if kind == "flag":
                    if v not in TRUE and v not in FALSE:
                        raise UsageError(f"{name}={val!r}: not a boolean", "use 1, true, t or 0, false, f")
                    opts[dest] = v in TRUE
                elif kind == "multi":
                    opts[dest].append(v)
                else:
                    opts[dest] = v
                changed.add(dest)
                if origins is not None:
                    origins[dest] = name


def settle_table(table, cmd, opts, env, note):
    """Environment keys, then a one-line UsageError for a refused option given."""
    from hpcrun.errors import UsageError

    origins = {}
    apply_env(table, cmd, opts, env, note, origins)
    for opt in table:
        status = opt[6]
        if status.startswith("refused:") and cmd in opt[7] and opts.get(opt[1]) not in (None, False, []):
            where = origins.get(opt[1])
            what = f"{where} ({opt[0][-1]})" if where else opt[0][-1]
            raise UsageError(f"{what} is not supported", status[len("refused:") :])


def settle(cmd, opts, env, note):
    """After parsing: environment keys, refusals, --compat and --network; raises
    UsageError with one line for anything hpcrun cannot do."""
    from hpcrun.errors import UsageError

    settle_table(OPTIONS, cmd, opts, env, note)
    if opts["compat"]:  # Apptainer's set (action_flags.go: --compat)
        for dest in ("containall", "no_init", "no_umask", "no_eval", "writable_tmpfs"):
            opts[dest] = True
    if opts["network"] is not None:
        kinds = [k.strip() for k in opts["network"].split(",") if k.strip()]
        if kinds != ["none"]:
            raise UsageError(
                f"--network {opts['network']}: not supported",
                "hpcrun has only --network none (a network namespace with loopback only)",
            )
        opts["net"] = True
    if opts["no_privs"] and opts["fakeroot"]:
        raise UsageError(
            "--no-privs with --fakeroot is not supported", "hpcrun cannot drop the capabilities of root in --fakeroot"
        )
    return opts


def parse_mounts(specs, cwd):
    """--mount values (Docker style, one CSV record per line, as Apptainer's
    ParseMountString) -> [(src, dst, readonly, nested)]; nested: the destination is
    passed on in $APPTAINER_BIND (the `nonested` key keeps it out)."""
    import csv
    import os

    from hpcrun.errors import UsageError

    out = []
    for spec in specs:
        try:
            records = list(csv.reader(spec.splitlines()))
        except csv.Error as e:
            raise UsageError(f"--mount {spec!r}: {e}", "use type=bind,src=SRC,dst=DST[,ro]") from None
        for rec in records:
            src = dst = None
            ro, nested = False, True
            for field in rec:
                key, _, val = field.partition("=")
                if key == "type":
                    if val != "bind":
                        raise UsageError(f"--mount {spec!r}: type {val!r} is not supported", "only type=bind is")
                elif key in ("source", "src"):
                    src = val
                elif key in ("destination", "dst", "target"):
                    dst = val
                elif key in ("ro", "readonly"):
                    ro = val.lower() not in ("false", "0")
                elif key == "nonested":
                    nested = False
                elif key in ("image-src", "id"):
                    raise UsageError(
                        f"--mount {spec!r}: {key} (a directory of an image file) is not supported",
                        "bind a host directory, or extract the image first",
                    )
                elif key == "bind-propagation":
                    raise UsageError(
                        f"--mount {spec!r}: bind-propagation is not supported for single mounts", "remove it"
                    )
                else:
                    raise UsageError(
                        f"--mount {spec!r}: unknown key {key!r}",
                        "use type, src/source, dst/target/destination, ro/readonly, nonested",
                    )
            if not src or not dst:
                raise UsageError(
                    f"--mount {spec!r}: needs a source and a destination", "e.g. --mount type=bind,src=/data,dst=/data"
                )
            if not dst.startswith("/"):
                raise UsageError(
                    f"--mount {spec!r}: destination {dst!r} is relative",
                    "bind destinations are absolute paths inside the container",
                )
            out.append((os.path.normpath(os.path.join(cwd, src)), os.path.normpath(dst), ro, nested))
    return out


# --- build, pull, inspect: every Apptainer name, as above. Entries whose dest is a
# parameter of the click command (clickapp.py) are implemented there; the others are
# added to it from here (clickapp.apptainer_flags). ---------------------------------

_TABLES = {}


def tables():
    """{build|pull|inspect: table}; made on first use (only click needs them: not on the
    exec path)."""
    if not _TABLES:
        _TABLES.update(_make_tables())
    return _TABLES


def _make_tables():
    _ARCH = "refused:hpcrun pulls the host's architecture only"
    _LIBRARY = "refused:library:// (Sylabs Cloud) is not supported; use docker:// or oras://"
    _KEEP = "noop:hpcrun always removes its temporary files"
    _HTTPS = _o(
        "--no-https --nohttps",
        "no_https",
        help_="No-op: registries on loopback addresses are spoken to over HTTP already.",
        env="NOHTTPS NO_HTTPS",
        status=_NOHTTPS,
    )
    _REGISTRY = [
        _HTTPS,
        *_credential_options("Registry credentials file (as $REGISTRY_AUTH_FILE)."),
        _o("--library", "library", "value", "URL", "Refused: no library://.", "LIBRARY", _LIBRARY),
        _o(
            "--no-cleanup",
            "no_cleanup",
            help_="No-op: temporary files are always removed.",
            env="NO_CLEANUP",
            status=_KEEP,
        ),
        _o(
            "--disable-cache",
            "disable_cache",
            help_="Do not use the registry cache (blobs are fetched into the build's private directory).",
            env="DISABLE_CACHE",
        ),
        _o("-F --force", "force", help_="Overwrite OUT if it exists.", env="FORCE"),
        _o(
            "--reproducible",
            "reproducible",
            help_="Same inputs, same bytes: fixed times, zero UUID.",
            env="REPRODUCIBLE",
        ),
    ]

    def _for(cmd, table):
        return [o[:7] + ((cmd,),) for o in table]

    def _arch(prefix):
        return [
            _o("--arch", "arch", "value", "ARCH", "Refused: the host's architecture only.", prefix + "ARCH", _ARCH),
            _o(
                "--arch-variant",
                "arch_variant",
                "value",
                "VARIANT",
                "Refused: the host's architecture only.",
                prefix + "ARCH_VARIANT",
                _ARCH,
            ),
        ]

    BUILD = _for("build", _REGISTRY + _arch("BUILD_")) + _for(
        "build",
        [
            _o("-T --notest", "notest", help_="Skip a definition file's %test.", env="NOTEST"),
            _o("-s --sandbox", "sandbox", help_="Write OUT as a sandbox directory.", env="SANDBOX"),
            _o("-f --fakeroot", "fakeroot", help_="Build as root of your subuid range.", env="FAKEROOT"),
            _o("--build-arg", "build_args", "multi", "NAME=VALUE", "Value for {{ NAME }} (repeatable)."),
            _o("--build-arg-file", "build_arg_file", "multi", "FILE", "NAME=VALUE lines for {{ NAME }}."),
            _o(
                "--warn-unused-build-args",
                "warn_unused_build_args",
                help_="Warn, not fail, when a --build-arg names no {{ NAME }} in the definition.",
            ),
            _o(
                "--tmpdir",
                "tmpdir",
                "value",
                "DIR",
                "No-op: the work directory is made next to OUT.",
                "TMPDIR",
                "noop:the build's work directory is made next to OUT (on its file system)",
            ),
            _o(
                "--userns",
                "userns",
                help_="No-op: builds always run in a user namespace.",
                env="USERNS",
                status="noop:hpcrun always builds in an unprivileged user namespace",
            ),
            _o(
                "--ignore-userns",
                "ignore_userns",
                help_="Refused.",
                env="IGNORE_USERNS",
                status="refused:hpcrun always needs unprivileged user namespaces",
            ),
            _o(
                "--ignore-subuid",
                "ignore_subuid",
                help_="Refused.",
                env="IGNORE_SUBUID",
                status="refused:not supported (without an /etc/subuid range root only is mapped)",
            ),
            _o(
                "--ignore-fakeroot-command",
                "ignore_fakeroot_command",
                help_="No-op.",
                env="IGNORE_FAKEROOT_COMMAND",
                status="noop:hpcrun never uses the fakeroot command",
            ),
            _o(
                "--ignore-proot",
                "ignore_proot",
                help_="No-op.",
                env="IGNORE_PROOT",
                status="noop:hpcrun never uses proot",
            ),
            _o(
                "--fix-perms",
                "fix_perms",
                help_="Give the owner rwX on every file and directory of the unpacked source.",
                env="FIXPERMS",
            ),
            _o(
                "--json",
                "json",
                help_="No-op, as in Apptainer: definition files are read as definition files.",
                env="JSON",
                status="noop:Apptainer declares --json but never reads it; so does hpcrun",
            ),
            _o(
                "--section",
                "section",
                "multi",
                "NAME[,NAME]",
                "Run only these sections: setup, files, post, environment, runscript, startscript, help, "
                "labels, test, all (default) or none.",
                "SECTION",
            ),
            _o(
                "-u --update",
                "update",
                help_="Run the definition over the existing sandbox OUT (needs --sandbox; skips the bootstrap).",
                env="UPDATE",
            ),
            _o("--data", "data", "multi", "SPEC", "Refused.", "DATA", "refused:data containers are not supported"),
            _o("-e --encrypt", "encrypt", help_="Refused: no encrypted images.", status=_CRYPT),
            _o("--passphrase", "passphrase", help_="Refused: no encrypted images.", status=_CRYPT),
            _o("--pem-path", "pem_path", "value", "FILE", "Refused: no encrypted images.", status=_CRYPT),
            _o(
                "--mksquashfs-args",
                "mksquashfs_args",
                "value",
                "ARGS",
                "Extra mksquashfs arguments (-comp here replaces --compress).",
                "MKSQUASHFS_ARGS",
            ),
            _o(
                "--remote",
                "remote",
                help_="Refused: no remote builds.",
                status="refused:remote builds are not supported",
            ),
            _o(
                "--buildkit-host",
                "buildkit_host",
                "value",
                "HOST",
                "Refused: no BuildKit.",
                "BUILDKIT_HOST",
                "refused:Dockerfile builds with BuildKit are not supported",
            ),
            _o(
                "-B --bind",
                "bind",
                "multi",
                "SPEC",
                "Refused: no binds in %post.",
                status="refused:binds during %post are not supported",
            ),
            _o(
                "--mount",
                "mount",
                "multi",
                "SPEC",
                "Refused: no binds in %post.",
                "MOUNT",
                "refused:binds during %post are not supported",
            ),
            _o(
                "--writable-tmpfs",
                "writable_tmpfs",
                help_="Refused.",
                env="WRITABLE_TMPFS",
                status="refused:not supported for %test",
            ),
            _o("--nv", "nv", help_="Refused: no GPU support yet.", status=_GPU),
            _o("--nvccli", "nvccli", help_="Refused: no GPU support yet.", env="NVCCLI", status=_GPU),
            _o("--rocm", "rocm", help_="Refused: no GPU support yet.", status=_GPU),
            _o("--compat32", "compat32", help_="Refused: no GPU support yet.", status=_GPU),
        ],
    )

    PULL = _for("pull", _REGISTRY + _arch("PULL_")) + _for(
        "pull",
        [
            _o("--name", "name", "value", "OUT", "The file to write (as the OUT argument).", "PULL_NAME"),
            _o("--dir", "dir", "value", "DIR", "The directory to write it in.", "PULLDIR PULLFOLDER"),
            _o(
                "--tmpdir",
                "tmpdir",
                "value",
                "DIR",
                "No-op: the work directory is made next to OUT.",
                "TMPDIR",
                "noop:the pull's work directory is made next to OUT (on its file system)",
            ),
            _o(
                "-U --allow-unsigned",
                "allow_unsigned",
                help_="No-op: no signatures are checked.",
                env="ALLOW_UNSIGNED",
                status="noop:hpcrun checks no signatures (blobs are checked by digest)",
            ),
            _o(
                "--allow-unauthenticated",
                "allow_unauthenticated",
                help_="No-op: no signatures are checked.",
                env="ALLOW_UNAUTHENTICATED",
                status="noop:hpcrun checks no signatures (blobs are checked by digest)",
            ),
            _o("--sandbox", "sandbox", help_="Pull as a sandbox directory.", env="SANDBOX"),
        ],
    )

    INSPECT = [
        o[:7] + (("inspect",),)
        for o in [
            _o("-j --json", "as_json", help_="Apptainer-style JSON."),
            _o("--app", "app", "value", "NAME", "The metadata of the SCIF app NAME."),
            _o("--list-apps", "list_apps", help_="List the SCIF apps."),
        ]
    ]
    return {"build": BUILD, "pull": PULL, "inspect": INSPECT}


def markdown():
    """The tables as Markdown (`python -m hpcrun.options`): the documentation of every
    Apptainer name, from the same data as --help."""
    rows = ["| command | option | status | environment |", "|---|---|---|---|"]
    groups = [("global", GLOBAL), ("exec/run/shell/instance start", OPTIONS)] + sorted(tables().items())
    for cmd, table in groups:
        for o in table:
            kind, _, why = o[6].partition(":")
            status = {"": "implemented", "noop": "no-op", "refused": "refused"}[kind] + (f": {why}" if why else "")
            env = ", ".join(f"`APPTAINER_{k}`" for k in o[5])
            where = cmd if cmd != "exec/run/shell/instance start" or o[7] == _ALL else "/".join(o[7])
            rows.append(f"| {where} | {', '.join(f'`{f}`' for f in o[0])} | {status} | {env} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
