"""The `instance` command group (Apptainer's): start, run, list, stop. The work is in
runtime/instances.py; start and run take exec's options, built by clickapp's
container_command from the same table."""

import click

from hpcrun.clickapp import CONTEXT, app, container_command


@click.group(context_settings=CONTEXT)
def instance():
    """Named, long-lived containers: start one, join it with exec|run|shell
    instance://NAME, list and stop them."""


def _container_start(name, summary):
    """instance start|run: the options of Apptainer's `instance start` (container_command
    builds them from the table), then IMAGE NAME [ARGS]; the command is moved from the
    top level into this group."""
    container_command("instance start", summary, True)
    cmd = app.commands.pop("instance start")
    cmd.name = name
    cmd.params[-1].metavar = "NAME [ARGS]..."
    if "pid_file" not in {p.name for p in cmd.params}:
        cmd.params.insert(
            0, click.Option(["--pid-file", "pid_file"], metavar="FILE", help="Write the instance's PID to FILE.")
        )

    def callback(image, args, pid_file=None, **kw):
        from hpcrun.options import defaults
        from hpcrun.runtime.instances import check_name
        from hpcrun.start import Request, run_container

        opts = defaults()
        opts.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()})
        root = click.get_current_context().find_root()
        for k in ("quiet", "verbose", "debug"):  # given before the command
            opts[k] = opts[k] or bool((root.obj or root.params).get(k))
        check_name(args[0])
        opts["pid"] = True  # an instance always has its own PID namespace, as under Apptainer
        opts["instance"] = {"mode": name, "name": args[0], "pid_file": pid_file}
        return run_container(Request("run", opts, image, args[1:]))

    cmd.callback = callback
    instance.add_command(cmd)


_container_start(
    "start",
    "Start instance NAME of IMAGE, running its startscript "
    "(/.singularity.d/startscript) with ARGS; it lives until stopped.",
)
_container_start("run", "Start instance NAME of IMAGE, running its runscript with ARGS; it lives until stopped.")


def _own_user(user):
    import os
    import pwd

    if user and user != pwd.getpwuid(os.getuid()).pw_name:
        from hpcrun.errors import UsageError

        raise UsageError(
            "--user: only root can see other users' instances, and hpcrun runs no instances as root for others",
            "leave --user out",
        )


@instance.command("list")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON, as Apptainer does.")
@click.option("-l", "--logs", is_flag=True, help="Show where each instance's output goes.")
@click.option("-a", "--all", "all_", is_flag=True, help="Accepted: there are no --sharens instances to add.")
@click.option("-u", "--user", metavar="USER", help="Only your own user (Apptainer: root may list others').")
@click.argument("name", required=False, default="*")
def list_(name, as_json, logs, all_, user):
    """List your running instances (NAME: a glob, default all)."""
    from hpcrun.runtime.instances import list_instances

    _own_user(user)
    if as_json and logs:
        raise click.UsageError("give --json or --logs, not both")
    found = list_instances(name)
    if as_json:
        import json

        rows = [
            {
                "instance": s["name"],
                "pid": s["pid"],
                "img": s["image"],
                "ip": "",
                "logErrPath": s.get("logErrPath", ""),
                "logOutPath": s.get("logOutPath", ""),
            }
            for s in found
        ]
        click.echo(json.dumps({"instances": rows}, indent="\t"))
        return 0
    if logs:  # Apptainer's layout: the .err path on the instance's line, the .out one below
        rows = [["INSTANCE NAME", "PID", "LOGS"]]
        for s in found:
            rows += [[s["name"], str(s["pid"]), s.get("logErrPath", "")], ["", "", s.get("logOutPath", "")]]
    else:
        rows = [["INSTANCE NAME", "PID", "IP", "IMAGE"]] + [[s["name"], str(s["pid"]), "", s["image"]] for s in found]
    click.echo(_tabulate(rows), nl=False)
    return 0


def _tabulate(rows):
    """Go's tabwriter as Apptainer uses it (padding 4, the last column unpadded)."""
    widths = [max(len(r[i]) for r in rows) + 4 for i in range(len(rows[0]) - 1)]
    return "".join("".join(c.ljust(w) for c, w in zip(r, widths)) + r[-1] + "\n" for r in rows)


def _signal_number(text):
    import signal

    t = text.upper()
    if t.isdigit():
        n = int(t)
    else:
        n = getattr(signal, t if t.startswith("SIG") else "SIG" + t, None)
    if not isinstance(n, int) or not 0 < n < signal.NSIG or t.startswith("SIG_"):
        raise click.BadParameter(f"{text!r} is not a signal", param_hint="--signal")
    return int(n)


@instance.command("stop")
@click.option("-a", "--all", "all_", is_flag=True, help="Stop all your instances.")
@click.option("-F", "--force", is_flag=True, help="Kill at once (SIGKILL).")
@click.option("-s", "--signal", "sig", metavar="SIG", help="Signal to send (name or number; default SIGINT).")
@click.option(
    "-t",
    "--timeout",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="SIGKILL what is left after this many seconds.",
)
@click.option("-u", "--user", metavar="USER", help="Only your own user (Apptainer: root may stop others').")
@click.argument("name", required=False)
def stop(name, all_, force, sig, timeout, user):
    """Stop instance NAME (a glob) or --all: the signal to every process in it, SIGKILL
    after the timeout; returns when nothing of it is left."""
    from hpcrun.runtime.instances import stop as run_stop

    _own_user(user)
    if not name and not all_:
        raise click.UsageError("give an instance NAME or --all")
    number = 9 if force else _signal_number(sig) if sig else 2  # Apptainer's default: SIGINT
    root = click.get_current_context().find_root()
    quiet = bool((root.obj or root.params).get("quiet"))
    return run_stop("*" if all_ else name, number, timeout, quiet)


app.add_command(instance)


@instance.command("stats", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def stats(args):
    """Not available: Apptainer reads these from the instance's cgroup."""
    from hpcrun.errors import UsageError

    raise UsageError(
        "instance stats: hpcrun puts instances in no cgroup of their own, so it has no statistics for them",
        "use ps or top in the instance: exec instance://NAME top",
    )
