"""Apptainer's command line: every flag name it has is known to hpcrun (with a status),
its environment keys and their precedence, --mount, --network, --compat, --version."""

import os

import pytest

from hpcrun import cli, errors, options
from hpcrun.errors import UsageError

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "apptainer-flags.txt")


def apptainer_flags():
    with open(DATA, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    assert len(rows) > 350  # the whole list, not a stub
    return rows


def hpcrun_table(cmd):
    """flag -> (status, env keys) as hpcrun knows them for cmd."""
    if cmd == "global":
        table = options.GLOBAL
    elif cmd in options.tables():
        from hpcrun.clickapp import app

        known = {}
        for p in app.commands[cmd].params:  # implemented by the click command itself
            for flag in p.opts + p.secondary_opts:
                known[flag] = ("", ())
        for o in options.tables()[cmd]:
            for flag in o[0]:
                known[flag] = (o[6], o[5])
        return known
    else:
        table = options.for_command(cmd)
    return {flag: (o[6], o[5]) for o in table for flag in o[0]}


@pytest.mark.parametrize("cmd", ["global", "exec", "run", "shell", "build", "pull", "inspect", "instance start"])
def test_every_apptainer_flag_is_known(cmd):
    rows = [r for r in apptainer_flags() if r[0] == cmd]
    assert rows, cmd
    known = hpcrun_table(cmd)
    missing = [(r[1], r[2]) for r in rows if r[1] not in known or r[2] and r[2] not in known]
    assert not missing, f"{cmd}: Apptainer flags hpcrun does not know: {missing}"
    for r in rows:
        status, env = known[r[1]]
        assert status.partition(":")[0] in ("", "noop", "refused"), (cmd, r[1], status)
        assert status.partition(":")[0] == "" or status.partition(":")[2], (cmd, r[1])  # a reason
        if r[2]:  # the short form means the same option
            assert known[r[2]] == known[r[1]], (cmd, r[1], r[2])
        if r[3] and cmd not in ("build", "pull", "inspect") or r[3] and env:
            assert set(r[3].split(",")) - set(options.ENV_ELSEWHERE) <= set(env), (cmd, r[1], r[3], env)


def test_fast_parser_knows_the_short_forms_and_aliases():
    opts, image, args = options.fast_parse(["-f", "-p", "-i", "-n", "--cwd", "/w", "-u", "img", "x"])
    assert opts["fakeroot"] and opts["pid"] and opts["ipc"] and opts["net"] and opts["userns"]
    assert opts["pwd"] == "/w" and (image, args) == ("img", ["x"])
    opts, _, _ = options.fast_parse(["-s", "/bin/ash", "img"], "shell")
    assert opts["shell"] == "/bin/ash"
    with pytest.raises(options.NeedClick):  # -s is --shell for shell only
        options.fast_parse(["-s", "/bin/ash", "img"], "exec")


def _settle(argv, env=None, action="exec"):
    notes = []
    opts, _, _ = options.fast_parse(argv + ["img"], action)
    options.settle(action, opts, env or {}, lambda level, text: notes.append((level, text)))
    return opts, notes


def test_env_keys_fill_unset_options():
    opts, notes = _settle(
        [],
        {
            "APPTAINER_CONTAINALL": "1",
            "APPTAINER_NO_HOME": "true",
            "APPTAINER_PWD": "/w",
            "APPTAINER_ENV_FILE": "/e",
            "APPTAINER_NO_MOUNT": "tmp",
            "APPTAINER_WRITABLE_TMPFS": "t",
            "APPTAINER_HOME": "/h:/home/x",
            "APPTAINER_FAKEROOT": "True",
            "APPTAINER_CLEANENV": "0",
        },
    )
    assert opts["containall"] and opts["no_home"] and opts["writable_tmpfs"] and opts["fakeroot"]
    assert not opts["cleanenv"] and notes == []
    assert (opts["pwd"], opts["env_file"], opts["no_mount"], opts["home"]) == ("/w", ["/e"], ["tmp"], "/h:/home/x")


def test_command_line_beats_apptainer_beats_singularity():
    opts, notes = _settle(
        ["--pwd", "/cli"], {"APPTAINER_PWD": "/a", "SINGULARITY_PWD": "/s", "SINGULARITY_HOSTNAME": "sing"}
    )
    assert opts["pwd"] == "/cli" and opts["hostname"] == "sing"
    assert ("warning", "SINGULARITY_PWD and APPTAINER_PWD have different values, using the latter") in notes
    assert ("info", "Environment variable SINGULARITY_HOSTNAME is set, but APPTAINER_HOSTNAME is preferred") in notes
    opts, _ = _settle([], {"APPTAINER_PWD": "/a", "SINGULARITY_PWD": "/s"})
    assert opts["pwd"] == "/a"


def test_bind_from_env_is_appended_to_the_command_line():
    opts, notes = _settle(
        ["-B", "/c"], {"APPTAINER_BIND": "/a,/b", "APPTAINER_BINDPATH": "/p", "SINGULARITY_BINDPATH": "/s"}
    )
    # SINGULARITY_BINDPATH: APPTAINER_BINDPATH is set (and differs): the latter is used
    assert opts["bind"] == ["/c", "/a,/b", "/p"]
    assert notes == [("warning", "SINGULARITY_BINDPATH and APPTAINER_BINDPATH have different values, using the latter")]
    opts, notes = _settle([], {"SINGULARITY_BINDPATH": "/s"})
    assert opts["bind"] == ["/s"]
    assert notes == [("info", "Environment variable SINGULARITY_BINDPATH is set, but APPTAINER_BINDPATH is preferred")]


@pytest.mark.parametrize("value", ["yes", "on", "2", "enable"])
def test_env_booleans_as_go_parses_them(value):
    with pytest.raises(UsageError) as e:
        _settle([], {"APPTAINER_CONTAINALL": value})
    assert "APPTAINER_CONTAINALL" in e.value.message


def test_env_keys_only_for_their_commands():
    opts, _ = _settle([], {"APPTAINER_SHELL": "/bin/ash"}, "exec")
    assert opts["shell"] is None
    opts, _ = _settle([], {"APPTAINER_SHELL": "/bin/ash"}, "shell")
    assert opts["shell"] == "/bin/ash"


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--keep-privs"], ["--keep-privs", "root"]),
        (["--compat32"], ["--compat32", "GPU"]),
        (["--intel-hpu"], ["--intel-hpu", "accelerator"]),
        (["--memory", "1G"], ["--memory", "cgroup"]),
        (["-o", "ov.img"], ["--overlay", "overlay"]),
        (["--network", "bridge"], ["--network bridge", "none"]),
        (["--fakeroot", "--no-privs"], ["--no-privs"]),
    ],
)
def test_refused_with_one_reason(argv, words):
    with pytest.raises(UsageError) as e:
        _settle(argv)
    line = e.value.line()
    assert "\n" not in line and all(w in line for w in words), line


def test_refused_from_env_names_the_variable():
    with pytest.raises(UsageError) as e:
        _settle([], {"APPTAINER_COMPAT32": "1"})
    assert e.value.message.startswith("APPTAINER_COMPAT32 (--compat32)")


def test_compat_is_apptainers_set():
    opts, _ = _settle(["--compat"])
    assert all(opts[k] for k in ("containall", "no_init", "no_umask", "no_eval", "writable_tmpfs"))


def test_network_none_is_a_net_namespace():
    opts, _ = _settle(["--network", "none"])
    assert opts["net"] is True
    opts, _ = _settle(["--network=none"])
    assert opts["net"] is True


@pytest.mark.parametrize(
    "spec,want",
    [
        ("type=bind,source=/a,target=/b", [("/a", "/b", False, True)]),
        ("type=bind,src=/a,dst=/b,ro", [("/a", "/b", True, True)]),
        ("type=bind,source=rel,destination=/b,readonly", [("/cwd/rel", "/b", True, True)]),
        ('type=bind,"src=/a,b",dst=/c', [("/a,b", "/c", False, True)]),
        ("type=bind,src=/a,dst=/b\ntype=bind,src=/c,dst=/d", [("/a", "/b", False, True), ("/c", "/d", False, True)]),
        ("type=bind,src=/a,dst=/b,nonested", [("/a", "/b", False, False)]),  # mount_test.go
    ],
)
def test_parse_mounts(spec, want):
    assert options.parse_mounts([spec], "/cwd") == want


@pytest.mark.parametrize(
    "spec",
    [
        "type=volume,src=/a,dst=/b",
        "type=bind,src=/a",
        "type=bind,src=/a,dst=rel",
        "type=bind,src=/a,dst=/b,bind-propagation=shared",
        "type=bind,src=/a,dst=/b,image-src=/x",
        'type=bind,"src=/a',
    ],
)
def test_parse_mounts_bad(spec):
    with pytest.raises(UsageError):
        options.parse_mounts([spec], "/cwd")


def test_global_options(monkeypatch):
    monkeypatch.setattr(os, "environ", {"APPTAINER_VERBOSE": "1"})
    g, i = options.global_options(["-q", "-d", "--nocolor", "exec", "img"])
    assert (g["quiet"], g["debug"], g["verbose"], i) == (True, True, True, 3)
    g, i = options.global_options(["-s", "--version"])
    assert g["quiet"] and g["version"] and i == 2
    with pytest.raises(UsageError):
        options.global_options(["-c", "/etc/apptainer/apptainer.conf", "exec"])


@pytest.mark.parametrize(
    "prog,want",
    [
        ("hpcrun", "hpcrun version "),
        ("apptainer", f"apptainer version {options.APPTAINER_VERSION}+hpcrun."),
        ("singularity", f"apptainer version {options.APPTAINER_VERSION}+hpcrun."),
    ],
)
def test_version_line(monkeypatch, prog, want):
    monkeypatch.setattr(errors, "PROG", prog)
    assert cli.version_line().startswith(want)


def test_error_line_names_the_command(monkeypatch):
    monkeypatch.setattr(errors, "PROG", "singularity")
    assert UsageError("x", "y").line() == "singularity: error: x (y)"


def test_no_message_names_hpcrun_literally():
    """Notes, warnings and errors written outside HpcrunError.line() start with
    errors.PROG too: no string in hpcrun/ but a docstring begins a line with 'hpcrun: '."""
    import ast
    import re

    top = os.path.dirname(errors.__file__)
    bad = []
    for d, _, names in os.walk(top):
        for name in (n for n in names if n.endswith(".py")):
            with open(os.path.join(d, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, scopes) and ast.get_docstring(n)}
            for node in ast.walk(tree):
                text = node.value if isinstance(node, ast.Constant) and id(node) not in docs else None
                if isinstance(text, str) and re.search(r"(^|[\r\n\[])hpcrun: ", text):
                    bad.append(f"{name}:{node.lineno}: {text!r}")
    assert bad == []


def test_messages_name_the_command(monkeypatch, capsys):
    from hpcrun.images import inspect
    from hpcrun.runtime import launcher

    monkeypatch.setattr(errors, "PROG", "apptainer")
    launcher.say("hello")
    assert capsys.readouterr().err == "apptainer: hello\n"
    text = inspect._text(b"x" * (inspect.LIMIT + 1), inspect.LIMIT + 1, "/s.sh")
    assert text.endswith(f"\n[apptainer: /s.sh truncated: {inspect.LIMIT + 1} bytes, inspect shows the first 1 MiB]\n")


def test_docs_come_from_the_table():
    doc = options.markdown()
    for r in apptainer_flags():
        if r[0] in ("global", "exec", "build", "pull"):
            assert f"`{r[1]}`" in doc, r
    assert "| refused: needs root privileges, which hpcrun never has | `APPTAINER_KEEP_PRIVS` |" in doc
