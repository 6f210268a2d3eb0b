"""Write Apptainer-compatible /.singularity.d metadata into a root file system, so that
`run`, `inspect` and the image environment behave as they do for Apptainer-built images.
Everything goes through inroot.Root: the image may have planted links at these names."""

import json
import os

from hpcrun.envvars import quote, valid_name

MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "home")  # the ones Apptainer images have


def write(root, config=None):
    """root: an inroot.Root. config: the OCI image config, if the source had one."""
    os.close(root.makedirs(".singularity.d/env"))
    for d in MOUNT_POINTS:
        os.close(root.makedirs(d))
    if not config:
        return
    cfg = config.get("config") or {}
    env = [str(e).partition("=") for e in cfg.get("Env") or []]
    lines = [f"export {k}={quote(v)}" for k, _, v in env if valid_name(k)]
    root.write(".singularity.d/env/10-docker2singularity.sh", "#!/bin/sh\n" + "\n".join(lines) + "\n")
    entry = [quote(str(a)) for a in cfg.get("Entrypoint") or []]
    cmd = [quote(str(a)) for a in cfg.get("Cmd") or []]
    # Arguments replace CMD and follow ENTRYPOINT, as `docker run IMAGE ARGS` does.
    script = [
        "#!/bin/sh",
        f'if [ $# -gt 0 ]; then set -- {" ".join(entry)} "$@"; else set -- {" ".join(entry + cmd)}; fi',
        "[ $# -gt 0 ] || set -- /bin/sh",
        'exec "$@"',
    ]
    root.write(".singularity.d/runscript", "\n".join(script) + "\n", 0o755)
    labels = cfg.get("Labels") or {}
    root.write(".singularity.d/labels.json", json.dumps(labels, indent=2, sort_keys=True))
