"""Apptainer's OCI runscript tables, ported: e2e/docker/docker.go (apptainer/apptainer) —
testDockerCMD, testDockerENTRYPOINT, testDockerCMDENTRYPOINT. Apptainer pulls
ghcr.io/apptainer/docker-{cmd,entrypoint,cmd-entrypoint}; here the same configs are OCI
layouts the test writes (no Docker Hub here), built with `hpcrun build OUT oci:DIR`."""

import gzip
import os

import pytest
from hpcrun_testlib import WORK, hpcrun, user
from test_build import _base_layer
from test_e2e_docker_layers import write_layout

WORDS = ["'quotes'", '"quotes"', "$DOLLAR", "s p a c e s"]
CONFIGS = {
    "cmd": {"Cmd": ["/bin/echo", "CMD", *WORDS]},
    "entrypoint": {"Entrypoint": ["/bin/echo", "ENTRYPOINT", *WORDS]},
    "cmd-entrypoint": {"Entrypoint": ["/bin/echo", "ENTRYPOINT", *WORDS], "Cmd": ["CMD", *WORDS]},
}
CMD = """CMD 'quotes' "quotes" $DOLLAR s p a c e s"""
EP = """ENTRYPOINT 'quotes' "quotes" $DOLLAR s p a c e s"""


@pytest.fixture(scope="module")
def containers(images):
    import subprocess

    out = {}
    top = os.path.join(WORK, "e2e-docker")
    for name, config in CONFIGS.items():
        d = os.path.join(top, name)
        write_layout(d, [gzip.compress(_base_layer(images))], config)
        subprocess.run(["chmod", "-R", "a+rX", top], check=True)
        sif = os.path.join(WORK, "work", f"docker-{name}.sif")  # WORK/work: the test user's
        r = hpcrun("build", "-F", sif, f"oci:{d}", timeout=180)
        assert r.returncode == 0, r.stderr
        out[name] = sif
    return out


def home():
    return user().pw_dir


# (Apptainer's subtest name, arguments, expected output); each is run with and without --no-eval
CMD_CASES = [
    ("default", [], CMD, CMD),
    ("override", ["echo", "test"], "test", "test"),
    ("override env var", ["echo", "$HOME"], "{home}", "$HOME"),
    ("override sh echo", ["sh", "-c", 'echo "hello there"'], "hello", "hello there"),
]
EP_CASES = [
    ("default", [], EP, EP),
    ("override", ["echo", "test"], EP + " echo test", EP + " echo test"),
    ("override env var", ["echo", "$HOME"], EP + " echo {home}", EP + " echo $HOME"),
]
CMD_EP_CASES = [("default", [], EP + " " + CMD, EP + " " + CMD)] + EP_CASES[1:]


def run_case(image, args, want, noeval):
    r = hpcrun("run", *(["--no-eval"] if noeval else []), image, *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.format(home=home()) + "\n"


@pytest.mark.parametrize("noeval", [False, True], ids=["eval", "no-eval"])
@pytest.mark.parametrize("name,args,evaluated,literal", CMD_CASES, ids=[c[0] for c in CMD_CASES])
def test_testDockerCMD(containers, name, args, evaluated, literal, noeval):
    run_case(containers["cmd"], args, literal if noeval else evaluated, noeval)


@pytest.mark.parametrize("noeval", [False, True], ids=["eval", "no-eval"])
@pytest.mark.parametrize("name,args,evaluated,literal", EP_CASES, ids=[c[0] for c in EP_CASES])
def test_testDockerENTRYPOINT(containers, name, args, evaluated, literal, noeval):
    run_case(containers["entrypoint"], args, literal if noeval else evaluated, noeval)


@pytest.mark.parametrize("noeval", [False, True], ids=["eval", "no-eval"])
@pytest.mark.parametrize("name,args,evaluated,literal", CMD_EP_CASES, ids=[c[0] for c in CMD_EP_CASES])
def test_testDockerCMDENTRYPOINT(containers, name, args, evaluated, literal, noeval):
    run_case(containers["cmd-entrypoint"], args, literal if noeval else evaluated, noeval)
