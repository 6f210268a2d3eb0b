"""The click application: --help, usage errors and the commands without a fast path."""

import click

from hpcrun import errors
from hpcrun.options import GLOBAL, defaults, tables, for_command, settle_table, stderr_note

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _params(table):
    """click options from an options.py table (help says no-op/refused where so)."""
    params = []
    for flags, dest, kind, metavar, help_, _env, _status, _cmds in table:
        decls = list(flags) + [dest]
        if kind == "flag":
            params.append(click.Option(decls, is_flag=True, help=help_))
        else:
            params.append(click.Option(decls, multiple=kind == "multi", metavar=metavar, help=help_))
    return params


def _app(**g):
    """hpcrun: run SIF, squashfs and sandbox images without privilege, as yourself.
    Also installed as `apptainer` and `singularity`, taking their options.

    \b
    Exit codes: the command's own status (128+N when killed by signal N);
    2 usage error, 251 configuration, 252 image, 253 bind, 254 namespaces/mounts,
    255 internal error, 126/127 command not executable/not found in the image.
    """
    import os

    settle_table(GLOBAL, "exec", g, os.environ, stderr_note(g))
    if g["version"]:
        from hpcrun.cli import version_line

        click.echo(version_line())
        raise SystemExit(0)
    click.get_current_context().obj = {"quiet": g["quiet"] or g["silent"], "verbose": g["verbose"], "debug": g["debug"]}


app = click.Group(
    "hpcrun",
    callback=_app,
    params=_params(GLOBAL),
    context_settings=CONTEXT,
    help=_app.__doc__,
    invoke_without_command=True,
    no_args_is_help=True,
)


def _global(name):
    ctx = click.get_current_context()
    return bool((ctx.find_root().obj or {}).get(name))


def container_command(name, summary, needs_args):
    def callback(image, args, **kw):
        from hpcrun.start import Request, run_container

        opts = defaults()
        opts.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()})
        for k in ("quiet", "verbose", "debug"):
            opts[k] = opts[k] or _global(k)
        return run_container(Request(name, opts, image, args))

    params = _params(for_command(name))
    params.append(click.Argument(["image"]))
    params.append(
        click.Argument(
            ["args"],
            nargs=-1,
            required=needs_args,
            type=click.UNPROCESSED,
            metavar="COMMAND [ARGS]..." if needs_args else "[ARGS]...",
        )
    )
    cmd = click.Command(
        name,
        callback=callback,
        params=params,
        help=summary,
        context_settings={**CONTEXT, "allow_interspersed_args": False, "ignore_unknown_options": False},
    )
    app.add_command(cmd)


container_command("exec", "Run COMMAND (ARGS) in IMAGE (a SIF, squashfs or sandbox directory).", True)
container_command("run", "Run IMAGE's runscript (/.singularity.d/runscript) with ARGS, else /bin/sh.", False)
container_command("shell", "Start an interactive shell (/bin/bash, else /bin/sh) in IMAGE.", False)
container_command("test", "Run IMAGE's test script (/.singularity.d/test) with ARGS.", False)


@app.command("run-help")
@click.option("--app", metavar="NAME", help="The help of the SCIF app NAME (%apphelp).")
@click.argument("image")
def run_help(image, app):
    """Show IMAGE's help text (%help of its definition file)."""
    from hpcrun.images import inspect as insp

    meta = insp.metadata(image, app)
    text = meta["apps"][app]["helpfile"] if app else meta["helpfile"]
    click.echo(text if text else "No help sections were defined for this image", nl=not text)
    return 0


@app.command("help")
@click.argument("command", nargs=-1)
@click.pass_context
def help_(ctx, command):
    """Show the help of COMMAND (e.g. `help exec`, `help instance start`)."""
    group, parent = app, ctx.parent
    for name in command:
        cmd = group.get_command(parent, name) if isinstance(group, click.Group) else None
        if cmd is None:
            raise click.UsageError(f"no such command: {' '.join(command)}")
        parent = click.Context(cmd, info_name=name, parent=parent)
        group = cmd
    click.echo((parent if command else ctx.parent).get_help())
    return 0


def apptainer_flags(cmd):
    """Give a click command the Apptainer names of `cmd` it does not declare itself
    (options.tables(): the no-op and refused ones, a few implemented ones its callback
    takes), and read APPTAINER_<KEY>/SINGULARITY_<KEY> for all of them."""
    table = tables()[cmd]

    def deco(command):
        own = {p.name for p in command.params}
        command.params[:0] = _params([o for o in table if o[1] not in own])
        if "debug" not in own:  # read by cli.click_main (tracebacks), as errors advise
            command.params.append(
                click.Option(["--debug", "debug"], is_flag=True, help="Print tracebacks of internal errors.")
            )
        drop = [o[1] for o in table if o[6] and o[1] not in own]  # no-op or refused: settled here
        inner = command.callback

        def callback(**kw):
            import os

            kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
            settle_table(table, cmd, kw, os.environ, stderr_note(kw))
            for dest in drop + ["debug"]:
                kw.pop(dest, None)
            return inner(**kw)

        command.callback = callback
        return command

    return deco


@app.command()
def version():
    """Print the version (as `apptainer`/`singularity`: the Apptainer release it stands for)."""
    from hpcrun import __version__
    from hpcrun.options import APPTAINER_VERSION

    click.echo(__version__ if errors.PROG == "hpcrun" else f"{APPTAINER_VERSION}+hpcrun.{__version__}")


@apptainer_flags("build")
@app.command()
@click.option("--force", "-F", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--build-arg",
    "build_args",
    multiple=True,
    metavar="NAME=VALUE",
    help="Value for {{ NAME }} in a definition file (repeatable).",
)
@click.option("-T", "--notest", is_flag=True, help="Skip a definition file's %test.")
@click.option(
    "--compress",
    type=click.Choice(["gzip", "zstd", "lz4", "xz"]),
    default="gzip",
    show_default=True,
    help="squashfs compression.",
)
@click.option("--reproducible", is_flag=True, help="Same inputs, same bytes: fixed times, zero UUID.")
@click.option(
    "-s",
    "--sandbox",
    is_flag=True,
    help="Write OUT as a sandbox directory (run it with exec [--writable]; all files are yours, so rm -rf removes it).",
)
@click.option(
    "-f",
    "--fakeroot",
    is_flag=True,
    help="Unpack, run %post and squash as root of your /etc/subuid and /etc/subgid range, so "
    "file owners are kept; fail (exit 251) if you have none. Without it the range is "
    "used when there is one, else root is mapped to you only.",
)
@click.option("--dry-run", is_flag=True, help="Print the build plan as JSON and build nothing.")
@click.argument("out")
@click.argument("source", type=click.Path())
def build(
    out,
    source,
    force,
    quiet,
    build_args,
    notest,
    compress,
    reproducible,
    sandbox,
    fakeroot,
    dry_run,
    build_arg_file,
    authfile,
    warn_unused_build_args=False,
    disable_cache=False,
    update=False,
    section=(),
    mksquashfs_args=None,
    fix_perms=False,
):
    """Build OUT (.sif, else squashfs; a directory with --sandbox) from SOURCE: a directory,
    a rootfs tarball, docker-archive:FILE, oci:DIR[:tag], oci-archive:FILE[:tag],
    docker://REF, oras://REF (registry credentials as for `hpcrun pull`) or a definition
    file (Bootstrap: localimage, docker, oras, docker-archive, oci, oci-archive,
    debootstrap, scratch)."""
    from hpcrun.build import build as run_build

    build_args = _arg_files(build_arg_file) + list(build_args)
    _authfile(authfile)
    _disable_cache(disable_cache)
    return run_build(
        out,
        source,
        force=force,
        quiet=quiet,
        build_args=build_args,
        notest=notest,
        compress=compress,
        reproducible=reproducible,
        sandbox=sandbox,
        fakeroot=fakeroot,
        dry_run=dry_run,
        warn_unused_build_args=warn_unused_build_args,
        update=update,
        sections=section,
        mksquashfs_args=mksquashfs_args,
        fix_perms=fix_perms,
    )


def _arg_files(paths):
    """--build-arg-file: NAME=VALUE lines (blank and # lines skipped), before --build-arg's."""
    from hpcrun.errors import UsageError

    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"--build-arg-file {path}: {getattr(e, 'strerror', None) or e}",
                "give a readable file of NAME=VALUE lines",
            ) from None
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return out


def _disable_cache(on):
    """--disable-cache: the registry code reads $APPTAINER_DISABLE_CACHE."""
    if on:
        import os

        os.environ["APPTAINER_DISABLE_CACHE"] = "1"


def _authfile(path):
    """--authfile FILE: the registry code reads $REGISTRY_AUTH_FILE."""
    if path:
        import os

        os.environ["REGISTRY_AUTH_FILE"] = os.path.abspath(path)


INSPECT_KEYS = ["labels", "environment", "runscript", "deffile", "helpfile", "startscript", "test"]


@apptainer_flags("inspect")
@app.command()
@click.option("-l", "--labels", is_flag=True, help="Labels (the default).")
@click.option("-e", "--environment", is_flag=True, help="Environment scripts.")
@click.option("-r", "--runscript", is_flag=True, help="The runscript.")
@click.option("-d", "--deffile", is_flag=True, help="The definition file.")
@click.option("-H", "--helpfile", is_flag=True, help="The help text.")
@click.option("-s", "--startscript", is_flag=True, help="The startscript.")
@click.option("-t", "--test", is_flag=True, help="The test script.")
@click.option("--all", "all_", is_flag=True, help="Everything.")
@click.argument("image")
def inspect(image, all_, as_json, app, list_apps, **which):
    """Show IMAGE's metadata without mounting or running it (the union of the selectors
    given; labels when none). --app NAME: that SCIF app's; --list-apps: the app names."""
    from hpcrun.images import inspect as insp

    if "://" in image:  # docker://, oras://: the cached SIF (env9, refcache)
        from hpcrun.images import refcache

        image = refcache.resolve(image, quiet=True)
    app = None if all_ else app  # as Apptainer: --all shows every app
    meta = insp.metadata(image, app, "all" if all_ else "list" if list_apps else None)
    # as Apptainer: labels with the others when asked for, alone when nothing else is; --all is JSON
    which = INSPECT_KEYS if all_ else [k for k in INSPECT_KEYS if which[k]] or ([] if list_apps else ["labels"])
    if as_json or all_:
        click.echo(insp.render_json(meta, which))
    else:
        names = "".join(f"{n}\n" for n in sorted(meta.get("apps", {}))) if list_apps else ""
        click.echo(names + insp.render(meta["apps"][app] if app else meta, which), nl=False)
    return 0


@app.group()
def sif():
    """Read SIF files as Apptainer's siftool does."""


def _sif_command(name, doc, text, data):
    @sif.command(name, help=doc)
    @click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON.")
    @click.argument("image")
    def command(image, as_json):
        from hpcrun.images import siftool
        from hpcrun.images.sif import SifFile

        f = SifFile(image)
        if as_json:
            import json

            click.echo(json.dumps(getattr(siftool, data)(f), indent=2))
        else:
            click.echo(siftool.to_bytes(getattr(siftool, text)(f)), nl=False)  # the image's bytes as they are
        return 0


_sif_command("list", "List the objects of a SIF file (as `siftool list`).", "list_text", "list_rows")
_sif_command("header", "Print the global header of a SIF file (as `siftool header`).", "header_text", "header_dict")


@sif.command("info")
@click.argument("object_id", metavar="ID")
@click.argument("image")
def sif_info(object_id, image):
    """Print what the descriptor of object ID says (as `siftool info ID IMAGE`)."""
    from hpcrun.images import siftool
    from hpcrun.images.sif import SifFile

    oid = siftool.parse_id(object_id)
    click.echo(siftool.to_bytes(siftool.info_text(SifFile(image), oid)), nl=False)
    return 0


@sif.command("dump")
@click.argument("object_id", metavar="ID")
@click.argument("image")
def sif_dump(object_id, image):
    """Write object ID's data to stdout (as `siftool dump ID IMAGE`)."""
    from hpcrun.images import siftool

    return siftool.dump(image, siftool.parse_id(object_id))


@apptainer_flags("pull")
@app.command()
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.argument("args", nargs=-1, required=True, metavar="[OUT] REF")
def pull(args, force, quiet, name, dir, reproducible, authfile, disable_cache=False, sandbox=False):
    """Pull REF (docker://HOST/REPO:TAG) into OUT (--name, else REPO_TAG.sif; in --dir).

    Private registries: credentials come from HPCRUN_DOCKER_USERNAME and
    HPCRUN_DOCKER_PASSWORD (or APPTAINER_/SINGULARITY_DOCKER_*), else from
    $REGISTRY_AUTH_FILE (--authfile), $XDG_RUNTIME_DIR/containers/auth.json or
    ~/.docker/config.json (see `hpcrun registry login`)."""
    import os
    from hpcrun.build import build as run_build
    from hpcrun.builders.registry import parse_ref

    if len(args) > 2 or len(args) == 2 and name:
        from hpcrun.errors import UsageError  # one line, as every failure a user causes

        raise UsageError("give at most OUT and REF" if not name else "give OUT or --name, not both")
    ref = args[-1]
    if len(args) == 2 or name:
        out = name or args[0]
    else:
        _host, repo, reference = parse_ref(ref)
        out = f"{repo.rsplit('/', 1)[-1]}_{reference.replace('sha256:', '')[:12]}.sif"
    if dir:
        out = os.path.join(dir, out.lstrip("/"))  # as Go's filepath.Join: DIR/ABS, not ABS
    _authfile(authfile)
    _disable_cache(disable_cache)
    if ref.startswith("oras://") and _pull_sif(out, ref, force, quiet, sandbox):
        return 0
    run_build(out, ref, force, quiet, reproducible=reproducible, sandbox=sandbox)
    if not sandbox:
        _pull_mode(out)
    return 0


def _pull_sif(out, ref, force, quiet, sandbox):
    """oras://REF that is a SIF artifact: its bytes as OUT (the SIF itself: its signatures
    stay), or a sandbox made from it. False when REF is an OCI image."""
    import os
    import shutil
    from hpcrun.build import Work, _place, build as run_build
    from hpcrun.builders import registry
    from hpcrun.errors import UsageError

    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} exists", "use --force to replace it")
    with Work(os.path.abspath(out), None) as work:
        sif = registry.pull_sif(ref, quiet, scratch=work.path)
        if sif is None:
            return False
        if sandbox:
            run_build(out, sif, force, quiet, sandbox=True)
            return True
        tmp = os.path.join(work.path, "image.sif")
        try:
            with open(sif, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as e:
            from hpcrun import inroot

            raise inroot.failure(e, f"cannot write {tmp}") from None
        _place(tmp, out, work.path)
    _pull_mode(out)
    return True


def _pull_mode(out):
    """A pulled file's mode is 0777 less the umask, as Apptainer's (testPullUmask), also
    when --force replaced a file of another mode."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    try:
        fd = os.open(out, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # /dev/null, or gone: nothing of ours to set
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o777 & ~mask)
    finally:
        os.close(fd)


@app.group()
def registry():
    """Credentials for private registries, kept in ~/.docker/config.json ($DOCKER_CONFIG)."""


def _api_host(host):
    """What the user typed (HOST[:PORT], docker://HOST, https://HOST/v1/) -> (key, API host)."""
    from hpcrun.builders.auth import host_key

    key = host_key(host)
    if not key or any(c in key for c in "@ \t"):
        raise click.UsageError(f"{host!r} is not a registry host")
    return key, "registry-1.docker.io" if key == "docker.io" else key


@registry.command()
@click.option("-u", "--username", help="User name (asked for when not given).")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input (else it is asked for, never on the command line).",
)
@click.argument("host")
def login(host, username, password_stdin):
    """Check USERNAME's password with registry HOST[:PORT] (docker.io for Docker Hub) and save
    it in ~/.docker/config.json (mode 0600). Environment credentials and $REGISTRY_AUTH_FILE
    or $XDG_RUNTIME_DIR/containers/auth.json entries for HOST take precedence over it."""
    import sys
    from hpcrun.builders import auth
    from hpcrun.builders.registry import Registry
    from hpcrun.errors import ImageError

    key, api = _api_host(host)
    if not username:
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, err=True)
    if not username or not password or ":" in username:
        raise click.UsageError("a user name (without ':') and a password are needed")
    try:
        Registry(api, None, creds=auth.Credentials(username, password, "registry login")).check()
    except ImageError as e:  # the usual hint ("run hpcrun registry login") would go in circles
        raise ImageError(e.message, "check the user name and password" if "refused" in e.message else e.hint) from None
    path = auth.save(key, username, password)
    click.echo(f"Login succeeded: credentials for {key} saved in {path}")
    return 0


@registry.command()
@click.argument("host")
def logout(host):
    """Remove HOST's credentials from ~/.docker/config.json."""
    from hpcrun.builders import auth

    key, _api = _api_host(host)
    path, removed = auth.forget(key)
    click.echo(f"Removed the credentials for {key} from {path}" if removed else f"Not logged in to {key}")
    return 0


@app.group()
def cache():
    """The layer cache ($XDG_CACHE_HOME/hpcrun/blobs)."""


@cache.command("list")
def cache_list():
    """List cached blobs and their sizes."""
    from hpcrun.builders.registry import cache_entries

    entries = cache_entries()
    for digest, size in entries:
        click.echo(f"sha256:{digest}  {size}")
    click.echo(f"{len(entries)} blobs, {sum(s for _, s in entries)} bytes")
    return 0


@cache.command("clean")
def cache_clean():
    """Remove every cached blob."""
    from hpcrun.builders.registry import cache_clean as clean

    click.echo(f"removed {clean()} blobs")
    return 0


@app.command()
def check():
    """Diagnose whether hpcrun can work on this node, and how to fix what cannot."""
    from hpcrun.check import run_checks

    return run_checks()


import hpcrun.instance  # noqa: E402,F401  (registers the `instance` group; it imports this module)
