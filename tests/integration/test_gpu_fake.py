"""--nv, --nvccli, --rocm and CDI --device against a fake driver installation built here
(no GPU in CI): tiny libcuda.so.1/libnvidia-ml.so.1 compiled with gcc, a fake nvidia-smi,
device nodes made by root in a test directory (gpu_dev_dir points there), a private
ld.so cache (ldconfig -C), and a SIF image with a program that dlopens the driver."""

import json
import os
import shutil
import subprocess

import pytest

from hpcrun_testlib import WORK, hpcrun, make_rootfs

FAKE = os.path.join(WORK, "fakegpu")

CUDA_C = r"""
int cuInit(unsigned flags) { return flags == 0 ? 0 : 1; }
int cuDeviceGetCount(int *n) { *n = COUNT; return 0; }
int cuDriverGetVersion(int *v) { *v = 12020; return 0; }
"""
NVML_C = r"""
int nvmlInit_v2(void) { return 0; }
int nvmlDeviceGetCount_v2(unsigned *n) { *n = 2; return 0; }
"""
PROBE_C = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(void) {
    void *cu = dlopen("libcuda.so.1", RTLD_NOW), *ml = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!cu || !ml) { printf("dlopen failed: %s\n", dlerror()); return 3; }
    int (*init)(unsigned) = dlsym(cu, "cuInit");
    int (*count)(int *) = dlsym(cu, "cuDeviceGetCount");
    int (*ver)(int *) = dlsym(cu, "cuDriverGetVersion");
    int (*nvml)(void) = dlsym(ml, "nvmlInit_v2");
    int n = -1, v = -1, r = init(0);
    count(&n); ver(&v);
    printf("cuInit=%d count=%d version=%d nvml=%d\n", r, n, v, nvml());
    return 0;
}
"""


def _gcc(src, out, *flags):
    c = out + ".c"
    with open(c, "w") as f:
        f.write(src)
    subprocess.run(["gcc", "-O1", "-o", out, c, *flags], check=True)
    os.unlink(c)


def _lib(src, d, soname, real, count=2):
    _gcc(src.replace("COUNT", str(count)), os.path.join(d, real), "-shared", "-fPIC", f"-Wl,-soname,{soname}")
    os.symlink(real, os.path.join(d, soname))


@pytest.fixture(scope="module")
def fake(images):
    """{'config': HPCRUN_CONFIG for the fake driver, 'path': PATH with nvidia-smi, 'sif': image}"""
    from hpcrun.images.sif import write_sif

    shutil.rmtree(FAKE, ignore_errors=True)
    lib, bin_, dev = (os.path.join(FAKE, d) for d in ("lib", "bin", "dev"))
    for d in (lib, bin_, dev, os.path.join(dev, "nvidia-caps"), os.path.join(dev, "dri")):
        os.makedirs(d)
    _lib(CUDA_C, lib, "libcuda.so.1", "libcuda.so.525.60")
    _lib(NVML_C, lib, "libnvidia-ml.so.1", "libnvidia-ml.so.525.60")
    with open(os.path.join(bin_, "nvidia-smi"), "w") as f:
        f.write("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-fake-0)'\n")
    os.chmod(os.path.join(bin_, "nvidia-smi"), 0o755)
    with open(os.path.join(bin_, "rocm-smi"), "w") as f:
        f.write("#!/bin/sh\necho 'GPU[0] : Fake AMD'\n")
    os.chmod(os.path.join(bin_, "rocm-smi"), 0o755)
    # like /dev/null (1,3): readable and writable, so a nodev mount would show
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-caps/nvidia-cap1", "kfd", "dri/renderD128"):
        os.mknod(os.path.join(dev, name), 0o666 | 0o020000, os.makedev(1, 3))
        os.chmod(os.path.join(dev, name), 0o666)
    with open(os.path.join(FAKE, "ld.so.conf"), "w") as f:
        f.write(lib + "\n")
    cache = os.path.join(FAKE, "ld.so.cache")
    subprocess.run(["/sbin/ldconfig", "-f", os.path.join(FAKE, "ld.so.conf"), "-C", cache], check=True)
    config = os.path.join(FAKE, "config.yaml")
    with open(config, "w") as f:
        f.write(f"share_idle_timeout: 1\nldconfig: [/sbin/ldconfig, -C, {cache}, -p]\ngpu_dev_dir: {dev}\n")
    # the image: busybox + glibc + the probe, and its own "toolkit" libcuda (count 7)
    root = os.path.join(FAKE, "rootfs")
    make_rootfs(root)
    for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6"):
        os.makedirs(root + os.path.dirname(p), exist_ok=True)
        shutil.copy(p, root + p)
    _gcc(PROBE_C, os.path.join(root, "usr/bin/cudaprobe"))
    compat = os.path.join(root, "usr/local/cuda/compat")
    os.makedirs(compat)
    _lib(CUDA_C, compat, "libcuda.so.1", "libcuda.so.999", count=7)
    sqfs = os.path.join(FAKE, "gpu.sqfs")
    subprocess.run(
        ["mksquashfs", root, sqfs, "-quiet", "-all-root", "-no-progress"], check=True, stdout=subprocess.DEVNULL
    )
    sif = os.path.join(FAKE, "gpu.sif")
    write_sif(sif, sqfs)
    # a sandbox whose CUDA toolkit (12.4) is newer than the fake driver's (12.2)
    newer = os.path.join(FAKE, "cuda124")
    shutil.copytree(root, newer, symlinks=True)
    os.mkfifo(os.path.join(newer, "usr/local/cuda/version.json"))  # hostile: must not block
    with open(os.path.join(newer, "usr/local/cuda/version.txt"), "w") as f:
        f.write("CUDA Version 12.4.99\n")
    subprocess.run(["chmod", "-R", "a+rX", FAKE], check=True)
    return {
        "config": config,
        "path": f"{bin_}:/usr/local/bin:/usr/bin:/bin",
        "sif": sif,
        "dev": dev,
        "lib": lib,
        "newer": newer,
    }


def run(fake, *args, env=None):
    return hpcrun(*args, env={"HPCRUN_CONFIG": fake["config"], "PATH": fake["path"], **(env or {})})


PROBE_OK = "cuInit=0 count=2 version=12020 nvml=0"


def test_nv_binds_driver_tools_and_devices_into_a_sif(fake):
    script = (
        "cudaprobe; nvidia-smi -L; echo LD=$LD_LIBRARY_PATH; ls /.singularity.d/libs;"
        " test -c /dev/nvidia0 && test -c /dev/nvidia-caps/nvidia-cap1 && echo x > /dev/nvidia0 && echo dev-ok"
    )
    r = run(fake, "exec", "--nv", "--no-mount", "dev", fake["sif"], "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == PROBE_OK
    assert out[1] == "GPU 0: Fake GPU (UUID: GPU-fake-0)"
    assert out[2] == "LD=/.singularity.d/libs"
    assert {"libcuda.so.1", "libnvidia-ml.so.1"} <= set(out[3:-1])
    assert out[-1] == "dev-ok"
    assert "warning" not in r.stderr


def test_without_nv_no_driver_and_libs_dir_still_on_path(fake):
    r = run(
        fake,
        "exec",
        fake["sif"],
        "sh",
        "-c",
        "cudaprobe; echo LD=$LD_LIBRARY_PATH; test -e /dev/nvidia0 || echo no-dev",
    )
    assert r.stdout.splitlines()[0].startswith("dlopen failed"), r.stdout + r.stderr
    assert "LD=/.singularity.d/libs" in r.stdout and "no-dev" in r.stdout


def test_image_toolkit_libraries_come_first(fake):
    """The driver's directory is appended: the image's own libcuda (count 7) wins."""
    r = run(
        fake,
        "exec",
        "--nv",
        "--no-mount",
        "dev",
        "--env",
        "LD_LIBRARY_PATH=/usr/local/cuda/compat",
        fake["sif"],
        "sh",
        "-c",
        "cudaprobe; echo LD=$LD_LIBRARY_PATH",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "cuInit=0 count=7 version=12020 nvml=0",
        "LD=/usr/local/cuda/compat:/.singularity.d/libs",
    ]


def test_containall_still_brings_gpus_and_slurm_allocation(fake):
    env = {"CUDA_VISIBLE_DEVICES": "1", "SLURM_STEP_GPUS": "1", "GPU_DEVICE_ORDINAL": "1", "OTHER": "x"}
    script = (
        "cudaprobe; echo $CUDA_VISIBLE_DEVICES,$SLURM_STEP_GPUS,$GPU_DEVICE_ORDINAL,${OTHER:-unset};"
        " test -c /dev/nvidia0 && echo dev-ok"
    )
    r = run(fake, "exec", "--containall", "--nv", "--no-mount", "dev", fake["sif"], "sh", "-c", script, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [PROBE_OK, "1,1,1,unset", "dev-ok"]


def test_nv_without_driver_warns_and_runs(fake, utmp):
    cfg = os.path.join(utmp, "empty.yaml")
    with open(cfg, "w") as f:
        f.write(f"ldconfig: [/bin/true]\ngpu_dev_dir: {utmp}\n")
    r = run(fake, "exec", "--nv", fake["sif"], "true", env={"HPCRUN_CONFIG": cfg, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any("no NVIDIA driver library" in ln for ln in lines) and any("no NVIDIA device nodes" in ln for ln in lines)


def test_nvccli_binds_what_nvidia_container_cli_lists(fake, utmp):
    os.chmod(utmp, 0o777)
    bindir = os.path.join(utmp, "bin")
    os.makedirs(bindir)
    argv_file = os.path.join(utmp, "argv")
    listing = "\n".join(
        [f"{fake['dev']}/nvidia0", f"{fake['dev']}/nvidiactl", f"{FAKE}/bin/nvidia-smi"]
        + [f"{fake['lib']}/libcuda.so.525.60", f"{fake['lib']}/libnvidia-ml.so.525.60"]
    )
    cli = os.path.join(bindir, "nvidia-container-cli")
    with open(cli, "w") as f:
        f.write(f'#!/bin/sh\necho "$@" > {argv_file}\ncat <<EOF\n{listing}\nEOF\n')
    os.chmod(cli, 0o755)
    os.chmod(bindir, 0o755)
    r = run(
        fake,
        "exec",
        "--nvccli",
        "--no-mount",
        "dev",
        fake["sif"],
        "sh",
        "-c",
        "cudaprobe; nvidia-smi -L; test -c /dev/nvidia0 && echo dev-ok",
        env={"PATH": f"{bindir}:/usr/bin:/bin", "NVIDIA_VISIBLE_DEVICES": "0"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [PROBE_OK, "GPU 0: Fake GPU (UUID: GPU-fake-0)", "dev-ok"]
    with open(argv_file) as f:
        assert f.read().split() == [
            "--user",
            "list",
            "--device=0",
            "--libraries",
            "--binaries",
            "--ipcs",
            "--firmwares",
        ]


def test_nvccli_missing_is_one_line(fake):
    r = run(fake, "exec", "--nvccli", fake["sif"], "true", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 254 and r.stderr.count("\n") == 1 and "nvidia-container-cli" in r.stderr, r.stderr


def _cdi_dir(fake, utmp):
    d = os.path.join(utmp, "cdi")
    os.makedirs(d)
    with open(os.path.join(d, "example.yaml"), "w") as f:
        f.write(
            f"""cdiVersion: "0.6.0"
kind: example.com/gpu
containerEdits:
  env: [FAKE_SPEC=1]
  hooks:
    - hookName: createContainer
      path: /usr/bin/nvidia-ctk
      args: [nvidia-ctk, hook, update-ldcache, --folder, /opt/drv]
    - hookName: createContainer
      path: /usr/bin/nvidia-ctk
      args: [nvidia-ctk, hook, create-symlinks, --link, a::b]
devices:
  - name: gpu0
    containerEdits:
      env: [FAKE_GPU=0]
      deviceNodes:
        - path: /dev/fake0
          hostPath: {fake["dev"]}/nvidia0
      mounts:
        - hostPath: {fake["lib"]}
          containerPath: /opt/drv
          options: [ro, nosuid, nodev, bind]
  - name: gpu1
    containerEdits:
      deviceNodes: [{{path: /dev/fake1, hostPath: {fake["dev"]}/nvidiactl}}]
"""
        )
    with open(os.path.join(d, "other.json"), "w") as f:
        json.dump(
            {
                "cdiVersion": "0.3.0",
                "kind": "other.com/acc",
                "devices": [{"name": "a", "containerEdits": {"env": ["ACC=a"]}}],
            },
            f,
        )
    with open(os.path.join(d, "future.json"), "w") as f:
        json.dump({"cdiVersion": "9.0.0", "kind": "x.com/y", "devices": []}, f)
    return d


def test_cdi_devices_applied_inside(fake, utmp):
    d = _cdi_dir(fake, utmp)
    script = (
        "cudaprobe; echo $FAKE_SPEC,$FAKE_GPU,${ACC:-none}; echo LD=$LD_LIBRARY_PATH;"
        " test -c /dev/fake0 && test -c /dev/fake1 && echo x > /dev/fake0 && echo dev-ok;"
        " touch /opt/drv/x 2>/dev/null || echo ro"
    )
    r = run(
        fake,
        "exec",
        "--device",
        "example.com/gpu=all",
        "--cdi-dirs",
        d,
        "--no-mount",
        "dev",
        fake["sif"],
        "sh",
        "-c",
        script,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [PROBE_OK, "1,0,none", "LD=/.singularity.d/libs:/opt/drv", "dev-ok", "ro"]
    notes = r.stderr.splitlines()
    assert any("future.json" in n and "cdiVersion" in n for n in notes), notes
    assert any("not applied" in n and "create-symlinks" in n for n in notes), notes
    r = run(
        fake,
        "exec",
        "--device",
        "other.com/acc=a,example.com/gpu=gpu1",
        "--cdi-dirs",
        d,
        "--no-mount",
        "dev",
        fake["sif"],
        "sh",
        "-c",
        "echo $ACC; test -e /dev/fake0 || echo no-fake0",
    )
    assert r.returncode == 0 and r.stdout.split() == ["a", "no-fake0"], r.stderr


def test_cdi_unknown_device_is_one_line(fake, utmp):
    d = _cdi_dir(fake, utmp)
    for dev in ("example.com/gpu=gpu9", "nonsense"):
        r = run(fake, "exec", "--device", dev, "--cdi-dirs", d, fake["sif"], "true")
        assert r.returncode == 2, r.stderr
        err = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert len(err) == 1 and dev in err[0], r.stderr


def test_image_cuda_newer_than_driver_is_one_line(fake):
    r = run(fake, "exec", "--nv", "--no-mount", "dev", fake["newer"], "cudaprobe")
    assert r.returncode == 0 and r.stdout.strip() == PROBE_OK, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "CUDA" in ln]
    assert len(lines) == 1 and "CUDA 12.4" in lines[0] and "CUDA 12.2" in lines[0] and "525.60" in lines[0], r.stderr
    r = run(fake, "exec", "--nv", "--no-mount", "dev", fake["sif"], "cudaprobe")  # no toolkit file: no line
    assert r.returncode == 0 and "CUDA" not in r.stderr, r.stderr


def test_check_reports_the_fake_gpu(fake):
    r = run(fake, "check")
    line = [ln for ln in r.stdout.splitlines() if "NVIDIA" in ln]
    assert len(line) == 1 and "ok" in line[0] and f"{fake['dev']}/nvidia0" in line[0] and "525.60" in line[0], r.stdout


def test_rocm_binds_kfd_dri_and_tools(fake):
    script = "rocm-smi; test -c /dev/kfd && test -c /dev/dri/renderD128 && echo x > /dev/kfd && echo dev-ok"
    r = run(fake, "exec", "--rocm", "--no-mount", "dev", fake["sif"], "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["GPU[0] : Fake AMD", "dev-ok"]
    assert "kfd" not in r.stderr, r.stderr
