"""--rocm: the host's AMD ROCm driver, as Apptainer binds it."""

from hpcrun.gpu import device_setup, find_devices, from_list

DEVICES = ("kfd", "dri")  # the compute device and every DRI render node (a directory)


def discover(cfg, env):
    s = from_list("rocmliblist.conf", cfg, env, "--rocm")
    devices = find_devices(cfg["gpu_dev_dir"], DEVICES)
    if not any(d.endswith("/kfd") for d in devices):
        s.notes.append(f"--rocm: no {cfg['gpu_dev_dir']}/kfd: no AMD GPU inside")
    return s.merge(device_setup(devices, cfg["gpu_dev_dir"]))
