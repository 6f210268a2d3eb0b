"""Apptainer's action tables, ported: e2e/actions/actions.go (apptainer/apptainer) —
actionRun, actionExec, STDPipe, exitSignals, actionFakerootHome. Each case keeps the name
of Apptainer's subtest. The image stands in for e2e/testdata/Apptainer: its %runscript
and %test are Apptainer's. The SCIF cases are in test_scif.py; binds in test_binds_parity.py.
Where hpcrun's exit code differs on purpose (a usage error is 2, Apptainer's is 1), the
case says so and README's "Coming from Apptainer" lists it."""

import os
import subprocess

import pytest
from hpcrun_testlib import build_def_image, hpcrun, user

E2E_DEF = """Bootstrap: localimage
From: base.sif

%runscript
    echo "Running command: $*"
    exec "$@"

%post
    ln -s /etc /var/etc
    mkdir /madness
    ln -s /madness /var/etc/madness

%test
    exec "$@"
"""


@pytest.fixture(scope="module")
def image(images):
    return build_def_image(images, "e2e-actions", E2E_DEF)


RUN_CASES = [("NoCommand", [], 0), ("True", ["true"], 0), ("False", ["false"], 1)]


@pytest.mark.parametrize("name,argv,code", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_actionRun(image, name, argv, code):
    r = hpcrun("run", image, *argv, cwd="/tmp")
    assert r.returncode == code, r.stderr


def test_singularityLink(image):
    """singularityLink: actionRun through the `singularity` name."""
    from hpcrun_testlib import HPCRUN, as_user, user_env

    singularity = os.path.join(os.path.dirname(HPCRUN), "singularity")
    for _, argv, code in RUN_CASES:
        r = subprocess.run(as_user([singularity, "run", image, *argv]), env=user_env(), cwd="/tmp")
        assert r.returncode == code


# (name, options before the image, command, exit code, exact stdout or None)
EXEC_CASES = [
    ("True", [], ["true"], 0, None),
    ("TrueAbsPAth", [], ["/bin/true"], 0, None),
    ("False", [], ["false"], 1, None),
    ("FalseAbsPath", [], ["/bin/false"], 1, None),
    ("NoHome", ["--no-home"], ["ls", "-ld", "{home}"], 1, None),
    ("ContainAllPID", ["--containall", "--no-init"], ["sh", "-c", "echo $$"], 0, "1\n"),
]


@pytest.mark.parametrize("name,opts,argv,code,out", EXEC_CASES, ids=[c[0] for c in EXEC_CASES])
def test_actionExec(image, name, opts, argv, code, out):
    argv = [a.format(home=user().pw_dir) for a in argv]
    r = hpcrun("exec", *opts, image, *argv, cwd="/tmp")
    assert r.returncode == code, r.stderr
    if out is not None:
        assert r.stdout == out


def test_actionExec_ContainAllNoPID(image):
    r = hpcrun("exec", "--containall", "--no-init", "--no-pid", image, "sh", "-c", "echo $$", cwd="/tmp")
    assert r.returncode == 0 and r.stdout != "1\n", r.stderr


def test_actionExec_NoCommand(image):
    """Apptainer exits 1 on a missing command (a cobra usage error); hpcrun's usage
    errors are 2 (README: exit codes). Both: one line, non-zero."""
    r = hpcrun("exec", image, cwd="/tmp")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("name,text,code", [("TrueSTDIN", "hi", 0), ("FalseSTDIN", "bye", 1)])
def test_STDPipe_stdin(image, name, text, code):
    r = hpcrun("exec", image, "grep", "hi", input=text)
    assert r.returncode == code, r.stderr


STDOUT_CASES = [
    ("CwdPath", "exec", ["--cwd", "/etc", "{img}", "pwd"], "/etc", 0),
    ("PwdPath", "exec", ["--pwd", "/etc", "{img}", "pwd"], "/etc", 0),
    ("Arguments", "run", ["{img}", "foo"], "Running command: foo", 127),
    ("Permissions", "exec", ["{img}", "id", "-un"], "{user}", 0),
]


@pytest.mark.parametrize("name,cmd,argv,out,code", STDOUT_CASES, ids=[c[0] for c in STDOUT_CASES])
def test_STDPipe_stdout(image, name, cmd, argv, out, code):
    r = hpcrun(cmd, *[a.format(img=image) for a in argv])
    assert r.returncode == code, r.stderr
    assert r.stdout == out.format(user=user().pw_name) + "\n"


def test_STDPipe_shell_stdin(image):
    """STDPipe TrueLibrary/FalseLibrary, on a local image: `shell` reads commands from stdin."""
    assert hpcrun("shell", image, input="true").returncode == 0
    assert hpcrun("shell", image, input="false").returncode == 1


SIGNAL_CASES = [
    ("Exit0", "exit 0", 0),
    ("Exit1", "exit 1", 1),
    ("Exit134", "exit 134", 134),
    ("SignalKill", "kill -KILL $$", 137),
    ("SignalAbort", "kill -ABRT $$", 134),
]


@pytest.mark.parametrize("name,script,code", SIGNAL_CASES, ids=[c[0] for c in SIGNAL_CASES])
def test_exitSignals(image, name, script, code):
    assert hpcrun("exec", image, "/bin/sh", "-c", script).returncode == code


@pytest.mark.parametrize("opts", [[], ["--userns"]], ids=["fakeroot --with-suid", "fakeroot --without-suid"])
def test_actionFakerootHome(image, opts):
    r = hpcrun("exec", "--fakeroot", *opts, image, "sh", "-c", "echo $HOME")
    assert r.returncode == 0 and r.stdout == "/root\n", r.stderr


def test_test_command_runs_the_test_section(image):
    """%test is `exec "$@"`: `apptainer test IMG false` fails as the command does."""
    assert hpcrun("test", image, "true").returncode == 0
    assert hpcrun("test", image, "false").returncode == 1
