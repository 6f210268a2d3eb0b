"""Write Apptainer-compatible /.singularity.d metadata into a root file system, so that
`run`, `inspect` and the image environment behave as they do for Apptainer-built images."""
import json
import os

from hpcrun.envvars import quote, valid_name


def write(rootfs, config=None):
    meta = os.path.join(rootfs, ".singularity.d")
    os.makedirs(os.path.join(meta, "env"), exist_ok=True)
    for d in ("proc", "sys", "dev", "tmp", "home"):   # mount points Apptainer images have
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    if not config:
        return
    cfg = config.get("config") or {}
    env = [e.partition("=") for e in cfg.get("Env") or []]
    lines = [f"export {k}={quote(v)}" for k, _, v in env if valid_name(k)]
    with open(os.path.join(meta, "env", "10-docker2singularity.sh"), "w") as f:
        f.write("#!/bin/sh\n" + "\n".join(lines) + "\n")
    entry = [quote(a) for a in cfg.get("Entrypoint") or []]
    cmd = [quote(a) for a in cfg.get("Cmd") or []]
    # Arguments replace CMD and follow ENTRYPOINT, as `docker run IMAGE ARGS` does.
    script = ["#!/bin/sh",
              f'if [ $# -gt 0 ]; then set -- {" ".join(entry)} "$@"; else set -- {" ".join(entry + cmd)}; fi',
              '[ $# -gt 0 ] || set -- /bin/sh',
              'exec "$@"']
    path = os.path.join(meta, "runscript")
    with open(path, "w") as f:
        f.write("\n".join(script) + "\n")
    os.chmod(path, 0o755)
    labels = cfg.get("Labels") or {}
    with open(os.path.join(meta, "labels.json"), "w") as f:
        json.dump(labels, f, indent=2, sort_keys=True)
