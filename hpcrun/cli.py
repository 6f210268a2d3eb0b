"""Command line. `exec`, `run` and `shell` take a fast path that never imports click
(see options.py); every other command, --help and every usage error go through click.
`report` is the one place where an error becomes a line on stderr and an exit code."""
import sys

from hpcrun import errors
from hpcrun.errors import HpcrunError

CONTAINER_COMMANDS = ("exec", "run", "shell")
GLOBAL_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose",
                "--debug": "debug"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    gflags = {"quiet": False, "verbose": False, "debug": False}
    i = 0
    while i < len(argv) and argv[i] in GLOBAL_FLAGS:
        gflags[GLOBAL_FLAGS[argv[i]]] = True
        i += 1
    if i < len(argv) and argv[i] in CONTAINER_COMMANDS:
        from hpcrun.options import NeedClick, fast_parse
        try:
            opts, image, args = fast_parse(argv[i + 1:])
        except NeedClick:
            return click_main(argv)
        for k, v in gflags.items():
            opts[k] = opts[k] or v
        from hpcrun.start import Request, run_container
        return report(lambda: run_container(Request(argv[i], opts, image, args)), opts["debug"])
    return click_main(argv)


def click_main(argv):
    def run():
        from hpcrun.clickapp import app
        rv = app.main(args=argv, prog_name="hpcrun", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    return report(run, "--debug" in argv)


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
        _traceback(debug)   # a bug: one line, the traceback only on request
        sys.stderr.write(f"hpcrun: internal error: {type(e).__name__}: {e} (run with --debug for details)\n")
        return errors.INTERNAL


def _traceback(debug):
    if debug:
        import traceback
        traceback.print_exc()
