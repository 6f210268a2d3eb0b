"""Container start-up: a Request (what the command line asked for) -> config, host facts,
the image -> plan.build_plan (pure) -> the launcher (or a shared container, or an
extracted sandbox when FUSE is unusable). Used by the fast path in cli.py and by the
click commands alike; errors are raised, cli.report turns them into a line."""

import os
import sys
import time

from hpcrun import errors

IMPORTED_AT = time.perf_counter()


class Request:
    """action: exec | run | shell; opts: options.defaults() shape; image: the path; args:
    the command (exec) or its arguments."""

    __slots__ = ("action", "opts", "image", "args")

    def __init__(self, action, opts, image, args):
        self.action, self.opts, self.image, self.args = action, opts, image, list(args)


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
                sys.stderr.write(
                    f"{errors.PROG}: timings: {phases}; total {(now - self.t0) * 1000:.1f} ms"
                    f" (+ {(self.t0 - IMPORTED_AT) * 1000:.1f} ms imports before)\n"
                )


def run_container(req):
    """Plan and start the container a Request asks for; returns the exit status."""
    if req.image.startswith("instance://"):  # join a running instance: its image, its options
        from hpcrun.runtime import instances

        req = instances.for_join(req)
    from hpcrun import config, envvars, host as hostmod
    from hpcrun.images.detect import open_image
    from hpcrun.plan import build_plan

    from hpcrun.options import settle, stderr_note

    action, opts, image_path, args = req.action, req.opts, req.image, req.args
    settle(action, opts, os.environ, stderr_note(opts))  # APPTAINER_* keys, refusals
    if action == "shell" and opts["shell"]:  # -s/--shell PATH: that program, as Apptainer
        action, args = "exec", [opts["shell"]] + args
    if opts["no_umask"]:  # inherited by the command (Apptainer's default: the caller's)
        os.umask(0o022)
    timer = Timer(opts["debug"])
    if action == "exec" and not args:
        raise errors.UsageError("exec needs a command after the image", "e.g. hpcrun exec IMAGE ls -l")
    cfg = config.load()
    host = hostmod.gather()
    if opts["authfile"]:  # --authfile: for docker:// images (the registry code reads this)
        os.environ["REGISTRY_AUTH_FILE"] = os.path.abspath(opts["authfile"])
    env_files = []
    for path in opts["env_file"]:
        try:
            with open(path, encoding="utf-8") as f:
                env_files.append(envvars.parse_env_file(path, f.read(), host.env))
        except OSError as e:
            raise errors.UsageError(f"--env-file {path}: {e.strerror}", "check the path") from None
    timer("config")
    if "://" in image_path:  # docker://, oras://: from the SIF cache (pulled when missing)
        from hpcrun.images import refcache

        image_path = refcache.resolve(image_path, quiet=opts["quiet"])
    image = open_image(image_path)
    if image.warning and not opts["quiet"]:
        sys.stderr.write(f"{errors.PROG}: warning: {image.warning}\n")
    try:
        gpu = _gpu(opts, cfg, host.env)
        plan = build_plan(opts, action, image.path, image.kind, args, cfg, host, env_files, gpu)
        _resolve_sources(plan)
        if opts["dry_run"]:
            import json

            print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
            return 0
        if plan.in_place:
            _check_writable(image.path, plan.idmap)
        for m in plan.mounts:  # sources are checked before anything is mounted
            if m.kind == "bind" and not m.optional and not m.if_missing and not os.path.exists(m.src):
                raise errors.BindError(f"bind source {m.src} does not exist", "create it or fix the --bind argument")
        if plan.idmap["mode"] == "root" and not opts["quiet"]:
            sys.stderr.write(
                f"{errors.PROG}: note: no range for {host.user} in /etc/subuid and /etc/subgid: "
                "--fakeroot maps only root (to you); chown to other ids will fail\n"
            )
        timer("plan")
        return _start(plan, image, cfg, opts, timer)
    finally:
        image.close()


def _resolve_sources(plan):
    """Bind sources as the host names them, symlinks followed here, before anything
    moves: the launcher finds them under the old root after pivot_root, where an
    absolute link (Debian's /etc/localtime, a symlinked /home) would resolve against
    the staging root instead (bubblewrap's resolve_symlinks_in_ops). Destinations stay
    as given: they are resolved inside the image."""
    for m in plan.mounts:
        if m.kind == "bind":
            m.src = os.path.realpath(m.src)


def _gpu(opts, cfg, env):
    """--nv/--rocm/--nvccli/--device: what to bind (hpcrun.gpu, imported only then)."""
    if not (opts.get("nv") or opts.get("nvccli") or opts.get("rocm") or opts.get("device")):
        return None
    from hpcrun import gpu

    setup = gpu.discover(opts, cfg, env)
    if not opts["quiet"]:
        for note in setup.notes:
            sys.stderr.write(f"{errors.PROG}: warning: {note}\n")
    return setup


def _check_writable(path, idmap):
    """--writable makes the sandbox itself the writable root: refuse, before anything is
    mounted, one we cannot write. Where both owner ids are mapped into our
    user namespace, its root capabilities let setup write even without a write bit."""
    if os.access(path, os.W_OK):
        return
    st = os.stat(path)
    sub = idmap["mode"] == "subid"  # else only our own ids are mapped
    if _mapped(st.st_uid, idmap["uid"], idmap["subuid"] if sub else None) and _mapped(
        st.st_gid, idmap["gid"], idmap["subgid"] if sub else None
    ):
        return
    raise errors.UsageError(
        f"--writable: {path} is not writable by you (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o})",
        f"write a copy of your own: hpcrun build --sandbox COPY {path}",
    )


def _mapped(id_, own, subids):
    return id_ == own or subids is not None and subids[0] <= id_ < subids[0] + subids[1]


def _start(plan, image, cfg, opts, timer):
    from hpcrun.runtime import fuse, launcher

    devfd = daemon = None
    reason = None
    if image.kind != "sandbox":
        if plan.unsquash:
            reason = "--unsquash given" if opts["unsquash"] else "config fuse: never"
        else:
            devfd = fuse.open_device()  # a probe: the mount needs one opened in the namespace
            daemon = fuse.which(cfg["squashfuse"])
            if devfd is None:
                reason = "/dev/fuse is not usable"
            elif daemon is None:
                reason = f"no squashfuse binary ({', '.join(cfg['squashfuse'])})"
    if devfd is not None:
        os.close(devfd)
    if opts.get("instance"):  # start or join a named instance (runtime/instances.py)
        from hpcrun.runtime import instances

        return instances.launch(plan, image, daemon, reason, opts, timer)
    if reason is None:
        if plan.share:
            from hpcrun.runtime import share

            return share.run(plan, image, daemon, timer, opts["verbose"], opts["quiet"])
        return launcher.launch(plan, image, timer, opts["verbose"], daemon)
    from hpcrun.runtime import unsquash  # subprocess, shutil, tempfile: slow imports

    if opts["tmpdir"]:  # --tmpdir/APPTAINER_TMPDIR: where to extract (the plan's env is made)
        os.environ["TMPDIR"] = opts["tmpdir"]
    remover = unsquash.start_remover()  # it makes the tree: nothing is left unowned
    try:
        root = unsquash.extract(image, remover.top, reason, quiet=opts["quiet"])
        return launcher.launch(plan, image, timer, opts["verbose"], sandbox=root)
    finally:
        remover.stop()
