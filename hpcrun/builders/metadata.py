"""Write Apptainer-compatible /.singularity.d metadata into a root file system, so that
`run`, `inspect` and the image environment behave as they do for Apptainer-built images.
Everything goes through inroot.Root: the image may have planted links at these names."""

import json
import os

from hpcrun.envvars import quote, valid_name

MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "home")  # the ones Apptainer images have


def oci_runscript(entrypoint, cmd):
    """The runscript of an image from an OCI config. Arguments replace CMD and follow
    ENTRYPOINT, as `docker run IMAGE ARGS` does. As in Apptainer's images, the shell
    evaluates the result first ($VAR in an argument expands, words split again), unless
    the container runs with --no-eval ($APPTAINER_NO_EVAL): then the words are exec'd
    as they are (Docker's behaviour). e2e/docker testDockerCMD/ENTRYPOINT are the spec."""
    entry = " ".join(quote(str(a)) for a in entrypoint or [])
    cmd = " ".join(quote(str(a)) for a in cmd or [])
    script = [
        "#!/bin/sh",
        'if [ -n "${APPTAINER_NO_EVAL:-$SINGULARITY_NO_EVAL}" ]; then',
        f'    if [ $# -gt 0 ]; then set -- {entry} "$@"; else set -- {entry} {cmd}; fi',
        "else",
        "    __args=",  # each argument in double quotes: evaluated once more, as Apptainer's
        '    for __a in "$@"; do __args="$__args \\"$__a\\""; done',
        f'    if [ $# -gt 0 ]; then __run={quote(entry)}"$__args"; else __run={quote(entry + " " + cmd)}; fi',
        '    eval "set -- $__run"',
        "    unset __a __args __run",
        "fi",
        "[ $# -gt 0 ] || set -- /bin/sh",
        'exec "$@"',
    ]
    return "\n".join(script) + "\n"


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
    root.write(".singularity.d/runscript", oci_runscript(cfg.get("Entrypoint"), cfg.get("Cmd")), 0o755)
    labels = cfg.get("Labels") or {}
    root.write(".singularity.d/labels.json", json.dumps(labels, indent=2, sort_keys=True))
