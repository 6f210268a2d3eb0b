"""Command line. `exec`, `run` and `shell` take a fast path that never imports click
(see options.py); every other command, --help and every usage error go through click."""
import os
import sys
import time

IMPORTED_AT = time.perf_counter()
from hpcrun import errors  # noqa: E402
from hpcrun.errors import HpcrunError

CONTAINER_COMMANDS = ("exec", "run", "shell")
GLOBAL_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose",
                "--debug": "debug"}


class Timer:
    """--debug: time per start-up phase, printed when the command is forked."""

    def __init__(self, on):
        self.on, self.t0, self.marks = on, time.perf_counter(), []
        self.last = self.t0

    def __call__(self, phase):
        if self.on:
            now = time.perf_counter()
            self.marks.append((phase, now - self.last))
            self.last = now
            if phase == "fork":
                phases = ", ".join(f"{p} {d * 1000:.1f} ms" for p, d in self.marks)
                sys.stderr.write(f"hpcrun: timings: {phases}; total {(now - self.t0) * 1000:.1f} ms"
                                 f" (+ {(self.t0 - IMPORTED_AT) * 1000:.1f} ms imports before)\n")


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
        return guarded(lambda: run_container(argv[i], opts, image, args), opts["debug"])
    return click_main(argv)


def guarded(fn, debug):
    if debug:
        import traceback  # noqa: F401  (now: after pivot_root our package is out of reach)
    try:
        return fn()
    except HpcrunError as e:
        if debug:
            import traceback
            traceback.print_exc()
        sys.stderr.write(e.line() + "\n")
        return e.code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: one line, the traceback only on request
        if debug:
            import traceback
            traceback.print_exc()
        sys.stderr.write(f"hpcrun: internal error: {type(e).__name__}: {e} (run with --debug for details)\n")
        return errors.INTERNAL


def run_container(action, opts, image_path, args):
    from hpcrun import config, envvars, host as hostmod
    from hpcrun.images.detect import open_image
    from hpcrun.plan import build_plan

    timer = Timer(opts["debug"])
    if action == "exec" and not args:
        raise errors.UsageError("exec needs a command after the image", "e.g. hpcrun exec IMAGE ls -l")
    cfg = config.load()
    host = hostmod.gather()
    env_files = []
    for path in opts["env_file"]:
        try:
            with open(path, encoding="utf-8") as f:
                env_files.append(envvars.parse_env_file(path, f.read()))
        except OSError as e:
            raise errors.UsageError(f"--env-file {path}: {e.strerror}", "check the path") from None
    timer("config")
    image = open_image(image_path)
    if image.warning and not opts["quiet"]:
        sys.stderr.write(f"hpcrun: warning: {image.warning}\n")
    try:
        plan = build_plan(opts, action, image.path, image.kind, args, cfg, host, env_files)
        if opts["dry_run"]:
            import json
            print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
            return 0
        for m in plan.mounts:   # sources are checked before anything is mounted
            if m.kind == "bind" and not m.optional and not m.if_missing and not os.path.exists(m.src):
                raise errors.BindError(f"bind source {m.src} does not exist",
                                       "create it or fix the --bind argument")
        if plan.idmap["mode"] == "root" and not opts["quiet"]:
            sys.stderr.write(f"hpcrun: note: no range for {host.user} in /etc/subuid and /etc/subgid: "
                             "--fakeroot maps only root (to you); chown to other ids will fail\n")
        timer("plan")
        return _start(plan, image, cfg, opts, timer)
    finally:
        image.close()


def _start(plan, image, cfg, opts, timer):
    from hpcrun.runtime import fuse, launcher
    devfd = daemon = None
    reason = None
    if image.kind != "sandbox":
        if plan.unsquash:
            reason = "--unsquash given" if opts["unsquash"] else "config fuse: never"
        else:
            devfd = fuse.open_device()   # a probe: the mount needs one opened in the namespace
            daemon = fuse.which(cfg["squashfuse"])
            if devfd is None:
                reason = "/dev/fuse is not usable"
            elif daemon is None:
                reason = f"no squashfuse binary ({', '.join(cfg['squashfuse'])})"
    if devfd is not None:
        os.close(devfd)
    if reason is None:
        if plan.share:
            from hpcrun.runtime import share
            return share.run(plan, image, daemon, timer, opts["verbose"], opts["quiet"])
        return launcher.launch(plan, image, timer, opts["verbose"], daemon)
    from hpcrun.runtime import unsquash   # subprocess, shutil, tempfile: slow imports
    top, root = unsquash.extract(image, reason, quiet=opts["quiet"])
    remover, pipe = unsquash.start_remover(top)
    try:
        return launcher.launch(plan, image, timer, opts["verbose"], sandbox=root)
    finally:
        os.close(pipe)
        os.waitpid(remover, 0)


def click_main(argv):
    from hpcrun.clickapp import app
    try:
        rv = app.main(args=argv, prog_name="hpcrun", standalone_mode=False)
    except HpcrunError as e:
        sys.stderr.write(e.line() + "\n")
        return e.code
    except Exception as e:
        import click
        if isinstance(e, click.exceptions.Abort):
            return 130
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        if "--debug" in argv:
            raise
        sys.stderr.write(f"hpcrun: internal error: {type(e).__name__}: {e} (run with --debug for details)\n")
        return errors.INTERNAL
    return rv if isinstance(rv, int) else 0
