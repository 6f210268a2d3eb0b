"""--nv and --nvccli: the host's NVIDIA driver, as Apptainer binds it."""

import os

from hpcrun.gpu import LIBS_DIR, Setup, device_setup, find_devices, from_list, lib_setup

# /dev/nvidia0.., nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-modeset, nvidia-caps/
DEVICES = ("nvidia*",)
# Sockets and directories the driver's daemons talk through (bound when present).
IPC = ("/run/nvidia-persistenced/socket", "/run/nvidia-fabricmanager/socket", "/tmp/nvidia-mps")


def discover(cfg, env):
    s = from_list("nvliblist.conf", cfg, env, "--nv")
    if not any(dst.startswith(LIBS_DIR + "/libcuda.so") for _, dst, _, _ in s.binds):
        s.notes.append("--nv: no NVIDIA driver library (libcuda.so) for this host in the ld.so cache: no CUDA inside")
    devices = find_devices(cfg["gpu_dev_dir"], DEVICES)
    if not devices:
        s.notes.append(f"--nv: no NVIDIA device nodes ({cfg['gpu_dev_dir']}/nvidia*): no GPU inside")
    s.merge(device_setup(devices, cfg["gpu_dev_dir"]))
    s.merge(lib_setup([], [], [p for p in IPC + tuple(env_ipc(env)) if os.path.exists(p)]))
    cuda = [src for src, dst, _, _ in s.binds if dst == LIBS_DIR + "/libcuda.so.1"]
    if cuda:
        from hpcrun.gpu import lib_version

        s.cuda = (driver_cuda(cuda[0]), lib_version(cuda[0]))
    return s


def env_ipc(env):
    d = env.get("CUDA_MPS_PIPE_DIRECTORY")
    return [d] if d and d.startswith("/") else []


def nvccli_argv(cli, env):
    """`nvidia-container-cli list`: the driver's files for the visible devices, read-only
    (its `configure` writes into the image as root; hpcrun binds what `list` names)."""
    devices = env.get("NVIDIA_VISIBLE_DEVICES") or "all"
    return [cli, "--user", "list", f"--device={devices}", "--libraries", "--binaries", "--ipcs", "--firmwares"]


def classify_listing(text, dev_dir, links):
    """`list` output (one absolute path a line) -> Setup. links(path): the names of the
    host's symlinks to a library in its directory (libcuda.so.1 -> libcuda.so.535...),
    which are bound as well: programs dlopen the soname."""
    s, devices, libs, bins, files = Setup(), [], [], [], []
    for line in text.splitlines():
        p = line.strip()
        if not p.startswith("/"):
            continue
        base = os.path.basename(p)
        if p.startswith(dev_dir.rstrip("/") + "/"):
            devices.append(p)
        elif ".so" in base:
            real = os.path.realpath(p)
            libs += [(base, real)] + [(name, real) for name in links(p)]
        elif "/bin/" in p:
            bins.append(p)
        else:
            files.append(p)
    s.merge(lib_setup(libs, bins, files))
    return s.merge(device_setup(devices, dev_dir))


def so_links(path):
    d, base = os.path.split(path)
    stem = base.split(".so", 1)[0] + ".so"
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(
        n
        for n in names
        if n.startswith(stem)
        and n != base
        and os.path.islink(os.path.join(d, n))
        and os.path.realpath(os.path.join(d, n)) == os.path.realpath(path)
    )


def nvccli(cfg, env):
    import shutil
    import subprocess

    from hpcrun.errors import RuntimeSetupError

    cli = shutil.which("nvidia-container-cli", path=env.get("PATH", os.defpath))
    if cli is None:
        raise RuntimeSetupError(
            "--nvccli: nvidia-container-cli is not on PATH", "use --nv, or install libnvidia-container"
        )
    argv = nvccli_argv(cli, env)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeSetupError(f"--nvccli: {cli}: {getattr(e, 'strerror', None) or e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]
        raise RuntimeSetupError(f"--nvccli: nvidia-container-cli list failed: {last}", "try --nv")
    s = classify_listing(r.stdout, cfg["gpu_dev_dir"], so_links)
    if not any(d for *_, d in s.binds):
        s.notes.append("--nvccli: nvidia-container-cli listed no device nodes: no GPU inside")
    return s


def driver_cuda(libcuda):
    """The CUDA version the host driver supports ("12.2"), from cuDriverGetVersion
    (it needs no GPU and no cuInit); None if it cannot be asked."""
    import ctypes

    try:
        lib = ctypes.CDLL(libcuda)
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


# The image's CUDA toolkit version, as the NVIDIA images record it.
CUDA_FILES = ("/usr/local/cuda/version.json", "/usr/local/cuda/version.txt")


def image_cuda(text):
    """'12.4' from version.json ("cuda": {..."version": "12.4.1"}) or version.txt
    ("CUDA Version 11.0.228"); None if neither form is there. No json import: this runs
    in the launcher, after the host's library directories are out of reach."""
    i = text.find('"cuda"')
    if i >= 0:
        j = text.find('"version"', i)
        rest = text[j + len('"version"') :].lstrip(" \t\n:") if j >= 0 else ""
        value = rest[1:].split('"', 1)[0] if rest.startswith('"') else ""
    else:
        value = text.partition("CUDA Version ")[2].split()[0] if "CUDA Version " in text else ""
    parts = value.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() else None


def mismatch(image_version, driver_version, driver):
    """One line when the image's CUDA is newer than what the host driver supports."""
    try:
        newer = tuple(map(int, image_version.split("."))) > tuple(map(int, driver_version.split(".")))
    except ValueError:
        return None
    if not newer:
        return None
    return (
        f"the image's CUDA {image_version} is newer than the host driver's CUDA {driver_version}"
        f" (driver {driver or '?'}): CUDA calls may fail (CUDA_ERROR_SYSTEM_DRIVER_MISMATCH); use an image"
        f" for CUDA <= {driver_version} or one with cuda-compat libraries, or a newer driver"
    )
