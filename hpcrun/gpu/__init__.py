"""GPU support (--nv, --rocm, --nvccli, CDI --device): host facts -> plan additions.

Discovery (the ld.so cache, PATH, device nodes, CDI spec files) is impure and runs only
when one of these options is given (`discover`); what to bind where and which
environment to set are pure functions of what it found, unit-tested without a driver.
The plan turns a `Setup` into mounts: libraries into LIBS_DIR (on LD_LIBRARY_PATH,
appended, so that an image's own CUDA toolkit libraries come first), programs into
/usr/bin, device nodes bound (never made: an unprivileged user cannot mknod).
"""

import os

from hpcrun.envvars import LIBS_DIR

# What a batch system tells a task about its GPUs: passed in also under --cleanenv.
GPU_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
    "SLURM_STEP_GPUS",
    "SLURM_JOB_GPUS",
)


class Setup:
    """binds: (host path, container path, readonly, is a device); tmpfs: container
    paths; env: set in the container; ld_dirs: appended to LD_LIBRARY_PATH; notes: one
    line each for what was asked and cannot be given."""

    def __init__(self):
        self.binds, self.tmpfs, self.env, self.ld_dirs, self.notes = [], [], {}, [], []
        self.cuda = None  # (CUDA version the driver supports, driver version): --nv

    def bind(self, src, dst, readonly=True, device=False):
        if all(b[1] != dst for b in self.binds):  # the first source for a destination wins
            self.binds.append((src, dst, readonly, device))

    def merge(self, other):
        for b in other.binds:
            self.bind(*b)
        self.tmpfs += [t for t in other.tmpfs if t not in self.tmpfs]
        self.env.update(other.env)
        self.ld_dirs += [d for d in other.ld_dirs if d not in self.ld_dirs]
        self.notes += other.notes
        self.cuda = self.cuda or other.cuda
        return self


def pass_env(host_env):
    """The GPU variables of the host environment (Slurm's allocation among them)."""
    return {k: host_env[k] for k in GPU_ENV if k in host_env}


# --- lib lists (nvliblist.conf / rocmliblist.conf) -------------------------------------


def parse_list(text):
    """-> (libraries, programs, files): '.so' names, bare names, absolute paths."""
    libs, progs, files = [], [], []
    for line in text.splitlines():
        e = line.strip()
        if not e or e.startswith("#"):
            continue
        if e.startswith("/"):
            files.append(e)
        elif ".so" in e:
            libs.append(e)
        elif "/" not in e:
            progs.append(e)
    return libs, progs, files


def parse_ldcache(text):
    """`ldconfig -p` output -> {soname: [paths]} in the cache's order. A line reads
    '\\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1'."""
    out = {}
    for line in text.splitlines():
        name, sep, path = line.strip().partition(" => ")
        if not sep or not path.startswith("/"):
            continue
        out.setdefault(name.split(" (", 1)[0], []).append(path)
    return out


def select_libs(wanted_libs, cache, matches):
    """[(soname, host path)]: each cache name starting with a listed name, its first
    path that `matches` (built for this host's machine and word size)."""
    out = []
    for name, paths in cache.items():
        if "/" in name or not any(name.startswith(w) for w in wanted_libs):
            continue
        for p in paths:
            if matches(p):
                out.append((name, p))
                break
    return out


def lib_setup(libs, progs, files):
    """libs: [(soname, path)]; progs: host paths; files: host paths that exist."""
    s = Setup()
    for name, path in libs:
        s.bind(path, f"{LIBS_DIR}/{name}")
    for p in progs:
        s.bind(p, "/usr/bin/" + os.path.basename(p))
    for f in files:
        s.bind(f, f)
    if libs:
        s.ld_dirs.append(LIBS_DIR)
    return s


def device_setup(found, dev_dir):
    """found: host device paths under dev_dir -> bound at /dev/..., device nodes working."""
    s = Setup()
    for p in found:
        s.bind(p, "/dev" + p[len(dev_dir.rstrip("/")) :], readonly=False, device=True)
    return s


# --- facts (impure) -------------------------------------------------------------------


def elf_id(path):
    """(class, byte order, machine) of an ELF file, None if it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return head[4], head[5], int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def host_matches():
    """A predicate: is a library built for the machine and word size hpcrun runs on?"""
    import sys

    me = elf_id(os.path.realpath(sys.executable))
    return lambda path: me is not None and elf_id(path) == me


def ld_cache(cmd):
    """The ld.so cache as text (config `ldconfig`, e.g. [/sbin/ldconfig, -p]); (text, error)."""
    import subprocess

    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", f"{' '.join(cmd)}: {getattr(e, 'strerror', None) or e}"
    if r.returncode != 0:
        return "", f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[:200]}"
    return r.stdout, None


def conf_path(name):
    """A packaged list (conf/NAME), or the site's /etc/hpcrun/NAME when there is one."""
    from hpcrun import config

    site = os.path.join(os.path.dirname(config.SITE), name)
    if os.path.exists(site):
        return site
    return os.path.join(os.path.dirname(config.packaged_default()), name)


def from_list(list_name, cfg, env, what):
    """Discover the libraries, programs and files a lib list names -> Setup."""
    import shutil

    path = conf_path(list_name)
    try:
        with open(path, encoding="utf-8") as f:
            libs, progs, files = parse_list(f.read())
    except OSError as e:
        s = Setup()
        s.notes.append(f"{what}: cannot read {path}: {e.strerror}")
        return s
    text, err = ld_cache(cfg["ldconfig"])
    # sources resolved here: the launcher binds from under /oldroot, where an absolute
    # symlink (libcuda.so.1 -> /usr/lib/...) would point elsewhere
    found = [(n, os.path.realpath(p)) for n, p in select_libs(libs, parse_ldcache(text), host_matches())]
    bins = [b for b in (shutil.which(p, path=env.get("PATH", os.defpath)) for p in progs) if b]
    s = lib_setup(found, [os.path.realpath(b) for b in bins], [f for f in files if os.path.exists(f)])
    if err:
        s.notes.append(f"{what}: cannot read the ld.so cache ({err}): no driver libraries bound")
    return s


def find_devices(dev_dir, patterns):
    import glob

    out = []
    for pat in patterns:
        out += [p for p in sorted(glob.glob(os.path.join(dev_dir, pat))) if p not in out]
    return out


def discover(opts, cfg, env):
    """The Setup for the GPU options given (--nv, --nvccli, --rocm, --device)."""
    s = Setup()
    if opts.get("nvccli"):
        from hpcrun.gpu import nvidia

        s.merge(nvidia.nvccli(cfg, env))
    elif opts.get("nv"):
        from hpcrun.gpu import nvidia

        s.merge(nvidia.discover(cfg, env))
    if opts.get("rocm"):
        from hpcrun.gpu import rocm

        s.merge(rocm.discover(cfg, env))
    if opts.get("device"):
        from hpcrun.gpu import cdi

        dirs = [d for item in opts.get("cdi_dirs") or () for d in item.split(",") if d] or cfg["cdi_dirs"]
        s.merge(cdi.discover(opts["device"], dirs))
    s.env.update(pass_env(env))
    return s


# --- hpcrun check ---------------------------------------------------------------------


def lib_version(path):
    """The driver version in a library's file name: libcuda.so.535.104.05 -> 535.104.05."""
    tail = os.path.basename(os.path.realpath(path)).partition(".so.")[2]
    return tail if tail and tail[0].isdigit() and "." in tail else None


def nvidia_findings(libs, devices, access, module_version=None):
    """Pure: (ok, what, fix) lines about the NVIDIA driver. libs: [(soname, real path)];
    devices: host device paths; access(path): may the caller open it read-write."""
    out = []
    gpus = [d for d in devices if os.path.basename(d)[len("nvidia") :].isdigit()]
    cuda = [p for n, p in libs if n.startswith("libcuda.so")]
    versions = {}
    for n, p in libs:
        v = lib_version(p)
        if v and (n.startswith("libcuda.so") or n.startswith("libnvidia-ml.so")):
            versions.setdefault(v, n)
    if not cuda and not gpus:
        return [
            (False, "NVIDIA: no driver (no libcuda.so in the ld.so cache, no /dev/nvidiaN): --nv binds nothing", None)
        ]
    if not cuda:
        out.append(
            (False, "NVIDIA: device nodes but no libcuda.so in the ld.so cache", "install the driver's libraries")
        )
    if not gpus:
        out.append((False, "NVIDIA: driver libraries but no /dev/nvidiaN device nodes", "is the kernel module loaded?"))
    denied = [d for d in gpus if not access(d)]
    if gpus and len(denied) == len(gpus):
        out.append((False, f"NVIDIA: no access to {', '.join(denied)}", "run in a job that was given GPUs"))
    if module_version:
        versions.setdefault(module_version, "the kernel module")
    if len(versions) > 1:
        text = ", ".join(f"{who} {v}" for v, who in versions.items())
        out.append(
            (False, f"NVIDIA: driver library mismatch: {text}", "reinstall the driver (or reboot after an update)")
        )
    if not out or all(ok for ok, *_ in out):
        usable = [d for d in gpus if access(d)]
        ver = next(iter(versions), "?")
        out.append(
            (
                True,
                f"NVIDIA: --nv would expose {len(usable)} GPU(s) ({', '.join(usable)}), driver {ver}, "
                f"{len(libs)} libraries",
                None,
            )
        )
    return out


def check_findings(cfg, env):
    """What `hpcrun check` says about GPUs: [(ok, what, fix)] (impure: reads the host)."""
    from hpcrun.gpu import cdi, nvidia

    dev = cfg["gpu_dev_dir"]
    nv = nvidia.discover(cfg, env)
    libs = [(dst.rsplit("/", 1)[1], src) for src, dst, _, _ in nv.binds if dst.startswith(LIBS_DIR + "/")]
    devices = [src for src, _, _, is_dev in nv.binds if is_dev]
    module = None
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as f:
            words = f.readline().split()
        module = next((w for w in words if w[:1].isdigit() and w.count(".") >= 1), None)
    except OSError:
        pass
    out = nvidia_findings(libs, devices, lambda p: os.access(p, os.R_OK | os.W_OK), module if dev == "/dev" else None)
    kfd = os.path.join(dev, "kfd")
    if os.path.exists(kfd):
        ok = os.access(kfd, os.R_OK | os.W_OK)
        out.append(
            (ok, f"AMD: {kfd} {'usable: --rocm would expose it' if ok else 'exists but is not accessible'}", None)
        )
    specs, notes = [], []
    for d in cfg["cdi_dirs"]:
        for path, spec in cdi.load_dir(d):
            if isinstance(spec, str):
                notes.append(f"{path}: {spec}")
            else:
                specs.append((path, spec))
    devices, skipped = cdi.index(specs)
    names = sorted(devices)
    if names:
        more = f" and {len(names) - 6} more" if len(names) > 6 else ""
        out.append((True, f"CDI: {len(names)} device(s) for --device: {', '.join(names[:6])}{more}", None))
    else:
        out.append(
            (False, f"CDI: no devices in {', '.join(cfg['cdi_dirs'])}", "e.g. nvidia-ctk cdi generate (as root)")
        )
    out += [(False, f"CDI spec {n}", "fix or remove it") for n in notes + skipped]
    return out
