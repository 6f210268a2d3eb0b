"""Command line. `exec`, `run` and `shell` take a fast path that never imports click
(see options.py); every other command, --help and every usage error go through click.
`report` is the one place where an error becomes a line on stderr and an exit code."""

import sys

from hpcrun import errors
from hpcrun.errors import HpcrunError

CONTAINER_COMMANDS = ("exec", "run", "shell")
NAMES = ("apptainer", "singularity")  # installed as the same program (hpcrun/scripts/)


def version_line():
    """What `--version` prints. As `apptainer`/`singularity`, Apptainer's own line (the
    clients parse it: Snakemake takes the last word with packaging, cwltool matches
    `(.+) version ([0-9.]+)` and wants flavour apptainer), hpcrun's version as a local
    version label that both accept."""
    from hpcrun import __version__
    from hpcrun.options import APPTAINER_VERSION

    if errors.PROG == "hpcrun":
        return f"hpcrun version {__version__}"
    return f"apptainer version {APPTAINER_VERSION}+hpcrun.{__version__}"


def main(argv=None):
    program = argv is None  # the hpcrun process itself, not a caller in Python (tests)
    if program:
        argv = sys.argv[1:]
        name = sys.argv[0].rpartition("/")[2]
        if name == "run-singularity":  # `./image.sif ARGS`: the first line of SIF images names it
            argv = ["run"] + argv
        elif name in NAMES:
            errors.PROG = name
    argv = list(argv)
    from hpcrun.options import NeedClick, fast_parse, global_options

    try:
        gflags, i = global_options(argv)
    except NeedClick:
        return click_main(argv)
    except HpcrunError as e:  # a refused global option (-c): the one line, from report
        err = e
        return report(lambda: _raise(err), False)
    if gflags.pop("version"):
        sys.stdout.write(version_line() + "\n")
        return 0
    if i < len(argv) and argv[i] in CONTAINER_COMMANDS:
        try:
            opts, image, args = fast_parse(argv[i + 1 :], argv[i])
        except NeedClick:
            return click_main(argv)
        for k, v in gflags.items():
            opts[k] = opts[k] or v
        from hpcrun.start import Request, run_container

        code = report(lambda: run_container(Request(argv[i], opts, image, args)), opts["debug"])
        return leave(code) if program else code
    return click_main(argv)


def leave(code):
    """Exit at once with code once the container's command is done: nothing of ours is
    left to clean up (the launcher waited for everything), and the interpreter's own
    teardown of every module and object would add ~5 ms to each start."""
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stdout: the command's exit code stands
        pass
    os._exit(code)


def _raise(e):
    raise e


def click_main(argv):
    def run():
        from hpcrun.clickapp import app

        rv = app.main(args=argv, prog_name=errors.PROG, standalone_mode=False)
        return rv if isinstance(rv, int) else 0

    return report(run, "--debug" in argv or "-d" in argv)


def report(fn, debug):
    """fn() -> its exit status; any error it raises -> one line on stderr and its code
    (a traceback too only with --debug)."""
    if debug:
        import traceback  # noqa: F401  (now: after pivot_root our package is out of reach)
    try:
        return fn()
    except HpcrunError as e:
        _traceback(debug)
        sys.stderr.write(e.line() + "\n")
        return e.code
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        click = sys.modules.get("click")
        if click is not None and isinstance(e, click.exceptions.Abort):
            return 130
        if click is not None and isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        _traceback(debug)  # a bug: one line, the traceback only on request
        sys.stderr.write(f"{errors.PROG}: internal error: {type(e).__name__}: {e} (run with --debug for details)\n")
        return errors.INTERNAL


def _traceback(debug):
    if debug:
        import traceback

        traceback.print_exc()
