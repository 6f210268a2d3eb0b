"""Turn a request (command line + config + host facts) into a container plan.

Pure code: no system calls, so every decision here is unit-tested and printable with
--dry-run. Plain classes, not dataclasses: importing dataclasses costs ~10 ms of start-up.
"""

import os

from hpcrun import binds as bindspec
from hpcrun import envvars, options
from hpcrun.errors import BindError, UsageError

# Apptainer's default mounts as data: (name, host path, needs nodev). The home,
# working directory and scratch entries are added from the request.
SYSTEM_MOUNTS = [
    ("proc", "/proc", True),
    ("sys", "/sys", True),
    ("dev", "/dev", False),  # device nodes must work: nosuid only
    ("hosts", "/etc/hosts", True),
    ("localtime", "/etc/localtime", True),
    ("resolv", "/etc/resolv.conf", True),
    ("tmp", "/tmp", True),
    ("tmp", "/var/tmp", True),
]
MOUNT_NAMES = {"home", "tmp", "cwd", "proc", "sys", "dev", "devpts", "hosts", "localtime", "resolv", "scratch"}
# The working directory is not bound when it is (inside) one of these.
SYSTEM_DIRS = (
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
)


class Mount:
    """kind: bind | tmpfs | proc. optional: skip quietly when the source is missing.
    if_missing: skip when the destination already exists in the image."""

    __slots__ = ("name", "kind", "src", "dst", "readonly", "nodev", "optional", "if_missing")

    def __init__(self, name, kind, src, dst, readonly=False, nodev=True, optional=False, if_missing=False):
        self.name, self.kind, self.src, self.dst = name, kind, src, dst
        self.readonly, self.nodev, self.optional, self.if_missing = readonly, nodev, optional, if_missing

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


class Host:
    """Facts about the caller, gathered once by hpcrun.host.gather()."""

    def __init__(
        self,
        uid,
        gid,
        user,
        group,
        home,
        cwd,
        gecos="",
        shell="/bin/sh",
        env=None,
        subuid=None,
        subgid=None,
        existing=None,
    ):
        self.uid, self.gid, self.user, self.group = uid, gid, user, group
        self.home, self.cwd, self.gecos, self.shell = home, cwd, gecos, shell
        self.env = env if env is not None else {}
        self.subuid, self.subgid = subuid, subgid
        # existing(path) -> bool: does the host path exist (injected, for purity)
        self.existing = existing or (lambda path: False)


class Plan:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def to_dict(self):
        d = dict(self.__dict__)
        d["mounts"] = [m.to_dict() for m in self.mounts]
        return d


def expand_scratch(entries, env):
    """`$VAR` or `${VAR}`, optionally followed by a path (`$VAR/..`: its parent); an unset
    or empty variable drops the entry."""
    out = []
    for e in entries:
        if e.startswith("$"):
            braced = e.startswith("${")
            i = 2 if braced else 1
            j = i
            while j < len(e) and (e[j].isalnum() or e[j] == "_"):
                j += 1
            value = env.get(e[i:j])
            if not value or braced and e[j : j + 1] != "}":
                continue
            e = value + e[j + 1 if braced else j :]
        e = os.path.normpath(e)
        if e.startswith("/") and e not in out:
            out.append(e)
    return out


NAME_MAX, PATH_MAX = 255, 4096


def check_destination(m):
    """A destination the kernel cannot name fails here with one line, not deep in the
    mount sequence (ENAMETOOLONG). Lengths are in bytes, as the kernel counts them."""
    raw = os.fsencode(m.dst)
    short = m.dst if len(raw) <= 60 else m.dst[:40] + "..."
    if len(raw) >= PATH_MAX:
        raise BindError(f"bind destination {short}: longer than {PATH_MAX - 1} bytes", "choose a shorter destination")
    if any(len(c) > NAME_MAX for c in raw.split(b"/")):
        raise BindError(
            f"bind destination {short}: a name in it is longer than {NAME_MAX} bytes", "choose a shorter destination"
        )


def _field_ok(text):
    """No ':' (the field separator) and no control character (a newline would start a
    line of its own) in a passwd/group field."""
    return all(" " <= c != "\x7f" and c != ":" for c in text)


def _name_ok(name):
    # ',' separates group members; a leading '+'/'-' is NIS syntax to nsswitch's compat mode
    return bool(name) and _field_ok(name) and "," not in name and name[0] not in "+-"


def identity_lines(user, uid, gid, group, gecos, home, shell):
    """The caller's /etc/passwd and /etc/group lines, each None when a field would break
    the file's format: names, home and shell can come from the environment ($USER when
    the uid has no passwd entry, $HOME always), so a newline in them must not add an
    entry. Such a line is dropped rather than patched (a changed name or home would be
    wrong); the free-text gecos only loses the offending characters."""
    gecos = "".join(c if _field_ok(c) else " " for c in gecos)
    user_ok = _name_ok(user)
    passwd = (
        f"{user}:x:{uid}:{gid}:{gecos}:{home}:{shell}" if user_ok and _field_ok(home) and _field_ok(shell) else None
    )
    group_line = f"{group}:x:{gid}:{user if user_ok else ''}" if _name_ok(group) else None
    return passwd, group_line


def under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def container_vars(action, image_path, bind_dsts, cwd, no_eval):
    """What Apptainer tells the command about its container (set under --cleanenv too):
    the image as an absolute path and its name, under both prefixes; the action; the
    bind destinations (for nested containers; unset when there are none, as Apptainer's
    action script drops empty ones); PWD, the working directory inside."""
    path = os.path.normpath(image_path)
    name = os.path.basename(path)
    out = {
        "HPCRUN_CONTAINER": path,
        "HPCRUN_NAME": name,
        "APPTAINER_COMMAND": action,
        "PWD": cwd,
        "APPTAINER_ENVIRONMENT": "/.singularity.d/env/91-environment.sh",
        "SINGULARITY_ENVIRONMENT": "/.singularity.d/env/91-environment.sh",
    }
    for prefix in ("APPTAINER_", "SINGULARITY_"):
        out[prefix + "CONTAINER"], out[prefix + "NAME"] = path, name
        if bind_dsts:
            out[prefix + "BIND"] = ",".join(bind_dsts)
        if no_eval:
            out[prefix + "NO_EVAL"] = "1"
    return out


def scif_app(name):
    """--app NAME: a name under /scif/apps (the launcher checks the image has it)."""
    if not name:
        return None
    if name.startswith(".") or "/" in name or not all(c.isalnum() or c in "_.+-" for c in name):
        raise UsageError(f"--app {name!r}: not an app name", "list the image's apps: hpcrun inspect --list-apps IMAGE")
    return name


def gpu_mounts(gpu):
    """The mounts of a hpcrun.gpu.Setup: libraries, programs, device nodes (which must
    work inside: no nodev), CDI mounts."""
    out = [Mount("gpu", "bind", src, dst, readonly=ro, nodev=not dev) for src, dst, ro, dev in gpu.binds]
    return out + [Mount("gpu", "tmpfs", None, d) for d in gpu.tmpfs]


def minimal_dev(devpts, mqueue):
    """Apptainer's minimal /dev (--contain, `mount dev = minimal`): a tmpfs with a few
    host devices bound in (launcher.minimal_dev). src lists what it holds beyond the
    fixed set: "devpts" (a new instance), "mqueue" (needs our own IPC namespace), then
    (src, dst) of user binds under /dev (their mount points are made there)."""
    held = (["devpts"] if devpts else []) + (["mqueue"] if mqueue else [])
    return Mount("dev", "tmpfs", tuple(held), "/dev", nodev=False)


def in_workdir(name, dst, workdir, rel, mode, made):
    """An empty directory at dst: in memory, or with -W DIR the directory DIR/rel, which
    the launcher makes (made: [(rel, mode, dst)]) as Apptainer lays them out."""
    if not workdir:
        return Mount(name, "tmpfs", None, dst)
    made.append((rel, mode, dst))  # optional: the source is made at launch, not checked before
    return Mount(name, "bind", f"{workdir}/{rel}", dst, optional=True)


def contained_tmp(asked, workdir, made):
    """--contain's /tmp and /var/tmp (DIR/tmp and DIR/var_tmp with -W DIR); none with
    --no-mount tmp: the image's own stay, as in Apptainer."""
    if "tmp" in asked:
        return []
    pairs = (("/tmp", "tmp"), ("/var/tmp", "var_tmp"))
    return [in_workdir("tmp", d, workdir, rel, 0o1777, made) for d, rel in pairs if d not in asked]


def build_plan(opts, action, image_path, image_kind, args, cfg, host, env_files=(), gpu=None):
    """opts: parsed options (options.defaults() shape); gpu: a hpcrun.gpu.Setup when
    --nv/--rocm/--device asked for one. Returns a Plan."""
    contain = opts["contain"] or opts["containall"]
    skip = set()
    for item in opts["no_mount"]:
        for name in item.split(","):
            name = name.strip()
            if name and name not in MOUNT_NAMES and not name.startswith("/"):
                raise UsageError(
                    f"--no-mount {name!r}: unknown mount", f"use a path or one of {', '.join(sorted(MOUNT_NAMES))}"
                )
            skip.add(name.rstrip("/") or "/")
    skip |= {k for k, on in cfg["mounts"].items() if not on}
    asked = set(skip)  # skipped by the user or the site, not by --contain
    if contain:
        skip |= {"home", "tmp", "cwd"}
    workdir = os.path.normpath(os.path.join(host.cwd, opts["workdir"])) if opts.get("workdir") else None

    if opts["writable"] and image_kind != "sandbox":
        raise UsageError(
            f"--writable: {image_path} is not a sandbox directory", "use --writable-tmpfs for SIF and squashfs images"
        )
    fakeroot = opts["fakeroot"]
    if fakeroot:
        uid = gid = 0
        user, group, home = "root", "root", "/root"
    else:
        uid, gid, user, group, home = host.uid, host.gid, host.user, host.group, host.home

    def wanted(name, dst):
        return name not in skip and dst not in skip

    mounts, made = [], []  # made: the directories -W DIR needs (in_workdir)
    dev = None
    for name, src, nodev in SYSTEM_MOUNTS:
        if wanted(name, src):
            if name == "dev" and contain:
                dev = minimal_dev("devpts" not in asked, opts["ipc"] or opts["containall"])
                mounts.append(dev)
            else:
                mounts.append(Mount(name, "bind", src, src, nodev=nodev, optional=True))
    if contain:
        mounts += contained_tmp(asked, workdir, made)

    # Home: -H SRC[:DST] or $HOME at its own path ( /root under --fakeroot ).
    home_src = host.home
    if opts["home"]:
        src, _, dst = opts["home"].partition(":")
        home_src = os.path.normpath(os.path.join(host.cwd, src))
        home = os.path.normpath(dst) if dst else home_src
        if not home.startswith("/"):
            raise UsageError(f"--home {opts['home']!r}: destination is relative", "use an absolute path")
    if opts["no_home"] or "home" in skip and not opts["home"]:
        if contain and not opts["no_home"] and "home" not in asked and home not in asked:
            mounts.append(in_workdir("home", home, workdir, "home", 0o700, made))
    else:
        mounts.append(Mount("home", "bind", home_src, home))

    cwd = opts["pwd"] or (
        host.cwd if not fakeroot or not under(host.cwd, host.home) else home + host.cwd[len(host.home) :]
    )

    def covered(path):  # already visible through a bind at the same path
        return any(under(path, m.src) and m.src == m.dst for m in mounts if m.kind == "bind")

    in_system = host.cwd == "/" or any(under(host.cwd, d) for d in SYSTEM_DIRS[1:])
    # Not in the home's destination either: `--home SRC:$HOME` run from $HOME shows SRC there
    in_home = any(m.name == "home" and under(host.cwd, m.dst) for m in mounts)
    if wanted("cwd", host.cwd) and not opts["pwd"] and not in_system and not covered(host.cwd) and not in_home:
        mounts.append(Mount("cwd", "bind", host.cwd, host.cwd, if_missing=True))

    if wanted("scratch", "scratch"):
        for path in expand_scratch(cfg["scratch"], host.env):
            if path not in skip and host.existing(path) and not covered(path):
                mounts.append(Mount("scratch", "bind", path, path, optional=True))

    for d in (d.strip() for item in opts.get("scratch", ()) for d in item.split(",")):  # -S/--scratch
        if d and not d.startswith("/"):
            raise UsageError(f"--scratch {d!r}: relative", "give an absolute path inside the container")
        if d:
            d = os.path.normpath(d)
            mounts.append(in_workdir("scratchdir", d, workdir, "scratch" + d, 0o750, made))

    # APPTAINER_BIND/BINDPATH (and SINGULARITY_) are in opts["bind"] already (options.apply_env)
    binds = opts["bind"] + ([host.env["HPCRUN_BIND"]] if host.env.get("HPCRUN_BIND") else [])
    user_binds = bindspec.parse(binds, host.cwd)
    user_mounts = [Mount("user", "bind", b.src, b.dst, readonly=b.readonly) for b in user_binds]
    nested = [b.dst for b in user_binds]  # $APPTAINER_BIND, for containers started inside
    for src, dst, ro, passed in options.parse_mounts(opts["mount"], host.cwd) if opts.get("mount") else ():
        user_mounts.append(Mount("user", "bind", src, dst, readonly=ro))
        if passed:
            nested.append(dst)
    # After the scratch directories, shallowest destination first (Apptainer's mount
    # order): a bind inside another lands on it, not under it.
    mounts += sorted(user_mounts, key=lambda m: m.dst.count("/") - (m.dst == "/"))

    if gpu is not None:  # after the default mounts: a device node binds over /dev's
        mounts += gpu_mounts(gpu)

    if dev is not None:  # -B /dev/X adds a working device to the minimal /dev (addUserbindsMount)
        devices = [m for m in mounts if m.name == "user" and m.dst.startswith("/dev/")]
        dev.src += tuple((m.src, m.dst) for m in devices)
        for m in devices:
            m.nodev = m.nodev and m.src != m.dst
    for m in mounts:
        check_destination(m)

    extra = container_vars(action, os.path.join(host.cwd, image_path), nested, cwd, bool(opts.get("no_eval")))
    if action == "shell":
        extra["PS1"] = "hpcrun> "
    if fakeroot:
        extra.update(USER="root", LOGNAME="root")
    lib_dirs = [envvars.LIBS_DIR] + [d for d in (gpu.ld_dirs if gpu else ()) if d != envvars.LIBS_DIR]
    if gpu is not None:
        extra.update(gpu.env)
    no_env = {n.strip() for item in opts.get("no_env", ()) for n in item.split(",")}  # --no-env
    host_env = {k: v for k, v in host.env.items() if k not in no_env} if no_env else host.env
    env, forced = envvars.build(
        host_env,
        cleanenv=opts["cleanenv"] or opts["containall"],
        keep=set(cfg["cleanenv_keep"]),
        env_files=list(env_files),
        env_opts=envvars.parse_env_opts(opts["env"]),
        home=home,
        default_path=cfg["default_path"],
        extra=extra,
        no_eval=bool(opts.get("no_eval")),
        lib_dirs=lib_dirs,
    )

    if fakeroot:
        idmap = {
            "mode": "subid" if host.subuid and host.subgid else "root",
            "uid": host.uid,
            "gid": host.gid,
            "subuid": host.subuid,
            "subgid": host.subgid,
        }
    else:
        idmap = {"mode": "self", "uid": host.uid, "gid": host.gid, "subuid": None, "subgid": None}

    lines = (None, None) if fakeroot else identity_lines(user, uid, gid, group, host.gecos, home, host.shell)
    pid = (opts["pid"] or opts["containall"]) and not opts.get("no_pid")
    unsquash = opts["unsquash"] or cfg["fuse"] == "never"
    if opts["no_sharens"] or unsquash:  # an extracted tree lives with its own process
        share = False
    else:
        mode = cfg["share"]
        share = opts["sharens"] or mode == "always" or (mode == "auto" and "SLURM_STEP_ID" in host.env)
    return Plan(
        action=action,
        args=list(args),
        image=image_path,
        image_kind=image_kind,
        namespaces={
            "pid": pid,
            "ipc": opts["ipc"] or opts["containall"],
            "uts": opts["uts"] or bool(opts["hostname"]),
            "net": opts["net"],
        },
        hostname=opts["hostname"],
        idmap=idmap,
        uid=uid,
        gid=gid,
        user=user,
        group=group,
        home=home,
        gecos=host.gecos,
        shell=host.shell,
        passwd_line=lines[0],
        group_line=lines[1],
        mounts=mounts,
        workdir=(workdir, tuple(made)) if made else None,
        writable=opts["writable_tmpfs"] or opts["writable"],
        in_place=opts["writable"],
        cwd=cwd,
        pwd_given=bool(opts["pwd"]),
        env=env,
        forced=forced,
        lib_dirs=lib_dirs,
        cuda_driver=gpu.cuda if gpu is not None and gpu.cuda and gpu.cuda[0] else None,
        no_eval=bool(opts.get("no_eval")),
        app=scif_app(opts.get("app")),
        unsquash=unsquash,
        tmpfs_size=cfg["tmpfs_size"],
        new_proc=pid and "proc" not in skip,
        no_init=bool(pid and opts.get("no_init")),
        share=share,
        share_idle=cfg["share_idle_timeout"],
    )


# What a task may differ in and still join another's container: its command, its
# environment, its working directory and its own PID namespace. Everything else
# shapes the container and must be equal.
PER_TASK = (
    "action",
    "args",
    "env",
    "forced",
    "lib_dirs",
    "no_eval",
    "app",
    "cwd",
    "pwd_given",
    "new_proc",
    "no_init",
    "share",
    "share_idle",
)


def share_key(plan, image_id):
    """A stable text naming the container a plan describes (hashed by the caller).
    repr of sorted items, not json: importing json costs ~6 ms per start."""
    d = {k: v for k, v in plan.to_dict().items() if k not in PER_TASK}
    d["namespaces"] = sorted((k, v) for k, v in plan.namespaces.items() if k != "pid")
    d["mounts"] = [sorted(m.items()) for m in d["mounts"]]
    d["image_id"] = list(image_id)
    return repr(sorted(d.items()))
