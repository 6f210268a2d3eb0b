"""SCIF apps as Apptainer builds and runs them (issue 10). Each test names the Apptainer
e2e test it follows (e2e/actions/actions.go, e2e/inspect/inspect.go, e2e/imgbuild);
the layout is internal/pkg/build/apps/apps.go's. Built as the test user, every image run."""

import json
import os
import shutil
import subprocess

import pytest
from hpcrun_testlib import hpcrun

APPS_DEF = """Bootstrap: localimage
From: base.sif

%post
    echo post > /post-ran

%appinstall foo
    printf '#!/bin/sh\\necho "foo tool: $SCIF_APPNAME"\\n' > bin/footool
    chmod +x bin/footool
    touch filefoo.exec

%apprun foo
    echo "RUNNING FOO $*"

%appenv foo
    FOOVAR=from_appenv
    export FOOVAR

%applabels foo
    FOOLABEL yes

%apphelp foo
    This is the help for foo!

%apptest foo
    echo "THIS IS A FOO TEST"

%appfiles foo
    data.txt

%appstart foo
    echo "foo starting"
    exec sleep "${1:-1000}"

%appinstall bar
    touch filebar.exec
    [ -f /scif/apps/foo/filefoo.exec ]

%apprun bar
    echo "RUNNING BAR $SCIF_APPNAME"
"""


@pytest.fixture(scope="module")
def apps_image(images, tmp_path_factory):
    """The two-app image, built once as the test user (SIF)."""
    from hpcrun_testlib import WORK

    d = os.path.join(WORK, "t", "scif-apps")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    shutil.copy(images["sif"], f"{d}/base.sif")
    with open(f"{d}/x.def", "w") as f:
        f.write(APPS_DEF)
    with open(f"{d}/data.txt", "w") as f:
        f.write("app data\n")
    subprocess.run(["chmod", "-R", "a+rwX", d], check=True)
    r = hpcrun("build", f"{d}/apps.sif", f"{d}/x.def", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return f"{d}/apps.sif"


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_run_each_app(apps_image):
    """actions.go actionRun ScifTestAppGood, and the stdout table's AppsFoo ("RUNNING FOO")."""
    assert ok(hpcrun("run", "--app", "foo", apps_image, "a", "b")).stdout == "RUNNING FOO a b\n"
    assert ok(hpcrun("run", "--app", "bar", apps_image)).stdout == "RUNNING BAR bar\n"
    assert ok(hpcrun("run", apps_image)).stdout.startswith("runscript:")  # the image's own


def test_unknown_app_is_one_line(apps_image):
    """actions.go ScifTestAppBad (run and exec --app fakeapp fail; Apptainer exits 1,
    hpcrun 252: README's table)."""
    for action, extra in (("run", []), ("exec", ["true"]), ("test", []), ("shell", ["-c", "true"])):
        r = hpcrun(action, "--app", "fakeapp", apps_image, *extra)
        assert r.returncode == 252, (action, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "no app 'fakeapp'" in r.stderr, r.stderr
    r = hpcrun("test", "--app", "bar", apps_image)  # an app without %apptest
    assert r.returncode == 252 and "has no test" in r.stderr, r.stderr


def test_folder_organisation(apps_image):
    """actions.go actionExec ScifTestfolderOrg: /scif, /scif/apps/{foo,bar}, the files
    %appinstall made in the app's root, /scif/data/foo/{input,output}."""
    checks = [
        "-d /scif",
        "-d /scif/apps",
        "-d /scif/data",
        "-d /scif/apps/foo",
        "-d /scif/apps/bar",
        "-f /scif/apps/foo/filefoo.exec",
        "-f /scif/apps/bar/filebar.exec",
        "-d /scif/data/foo/output",
        "-d /scif/data/foo/input",
        "-f /scif/apps/foo/data.txt",  # %appfiles
        "-x /scif/apps/foo/scif/runscript",
        "-f /scif/apps/foo/scif/env/01-base.sh",
        "-f /.singularity.d/env/94-appsbase.sh",
        "-f /post-ran",
    ]
    script = " && ".join(f"test {c}" for c in checks)
    ok(hpcrun("exec", apps_image, "sh", "-c", script))


def test_app_environment(apps_image):
    """actions.go ScifTestAppGood for exec (the app's bin on PATH), imageverify.go's
    verifyEnv with --app (%appenv), apps.go's 01-base.sh and 94-appsbase.sh variables."""
    script = (
        'echo "$FOOVAR|$SCIF_APPNAME|$SCIF_APPROOT|$SCIF_APPDATA|$SCIF_APPINPUT|$SCIF_APPMETA"; '
        'echo "$SINGULARITY_APPNAME|$APPTAINER_APPNAME|$SCIF_APPBIN_foo|$SCIF_APPDATA_bar"; '
        'echo "$PATH"; echo "$LD_LIBRARY_PATH"; footool'
    )
    lines = ok(hpcrun("exec", "--app", "foo", apps_image, "sh", "-c", script)).stdout.splitlines()
    assert lines[0] == "from_appenv|foo|/scif/apps/foo|/scif/data/foo|/scif/data/foo/input|/scif/apps/foo/scif"
    assert lines[1] == "foo|foo|/scif/apps/foo/bin|/scif/data/bar"
    assert lines[2].startswith("/scif/apps/foo/bin:/scif/apps/foo:"), lines[2]
    assert lines[3].split(":")[0] == "/scif/apps/foo/lib", lines[3]
    assert lines[4] == "foo tool: foo"
    # without --app: no app is active, the global exports are there
    r = ok(hpcrun("exec", apps_image, "sh", "-c", 'echo "${FOOVAR:-unset}|${SCIF_APPNAME:-unset}|$SCIF_APPROOT_foo"'))
    assert r.stdout == "unset|unset|/scif/apps/foo\n"


def test_app_env_after_image_and_before_env_option(apps_image):
    """Apptainer's order: the image's scripts, then the app's (95-apps.sh), then --env."""
    r = ok(hpcrun("exec", "--app", "foo", "--env", "OVERRIDDEN=cli", apps_image, "sh", "-c", 'echo "$OVERRIDDEN"'))
    assert r.stdout == "cli\n"
    r = ok(hpcrun("exec", "--app", "foo", "--env", "FOOVAR=cli", apps_image, "sh", "-c", 'echo "$FOOVAR"'))
    assert r.stdout == "cli\n"


def test_app_test(apps_image):
    """actions.go's test command with --app (Apptainer's action script: the app's test)."""
    assert ok(hpcrun("test", "--app", "foo", apps_image)).stdout == "THIS IS A FOO TEST\n"


def test_inspect_list_apps_and_app(apps_image):
    """inspect.go "list apps", "label app hello", "help app hello", "env app hello",
    "runscript app hello", "test app hello" (JSON), and run-help --app."""
    r = ok(hpcrun("inspect", "--list-apps", apps_image))
    assert r.stdout == "bar\nfoo\n"
    attrs = json.loads(ok(hpcrun("inspect", "--json", "--list-apps", apps_image)).stdout)["data"]["attributes"]
    assert sorted(attrs["apps"]) == ["bar", "foo"]
    meta = json.loads(ok(hpcrun("inspect", "--json", "--labels", "--app", "foo", apps_image)).stdout)
    foo = meta["data"]["attributes"]["apps"]["foo"]
    assert foo["labels"] == {"FOOLABEL": "yes", "SCIF_APP_NAME": "foo"}
    args = ["inspect", "--json", "-r", "-t", "-H", "-e", "--app", "foo", apps_image]
    foo = json.loads(ok(hpcrun(*args)).stdout)["data"]["attributes"]["apps"]["foo"]
    assert "RUNNING FOO" in foo["runscript"] and foo["runscript"].startswith("#!/bin/sh\n")
    assert "THIS IS A FOO TEST" in foo["test"]
    assert foo["helpfile"].strip() == "This is the help for foo!"
    env = foo["environment"]["/scif/apps/foo/scif/env/90-environment.sh"]
    assert "FOOVAR=from_appenv" in env and "export FOOVAR" in env
    assert ok(hpcrun("inspect", "--app", "foo", apps_image)).stdout == "FOOLABEL: yes\nSCIF_APP_NAME: foo\n"
    assert ok(hpcrun("run-help", "--app", "foo", apps_image)).stdout.strip() == "This is the help for foo!"
    r = hpcrun("inspect", "--app", "fakeapp", apps_image)
    assert r.returncode == 252 and r.stderr.count("\n") == 1 and "no app 'fakeapp'" in r.stderr, r.stderr


def test_bad_app_name(images, bdir):
    """An app name is one path component: `%apprun ../x` or `--app ../x` is refused (one line)."""
    shutil.copy(images["sif"], bdir / "base.sif")
    (bdir / "x.def").write_text("Bootstrap: localimage\nFrom: base.sif\n\n%apprun ../../etc\n    true\n")
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    r = hpcrun("build", str(bdir / "out.sif"), str(bdir / "x.def"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "app name" in r.stderr, r.stderr
    r = hpcrun("exec", "--app", "../x", images["sif"], "true")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


def test_instance_start_app_runs_its_startscript(apps_image):
    """instance.go testAppEchoServer: `instance start --app foo` runs foo's %appstart;
    a joining task chooses its own --app (none by default)."""
    try:
        ok(hpcrun("instance", "start", "--app", "foo", apps_image, "scifinst", "4321"))
        ps = ok(hpcrun("exec", "instance://scifinst", "ps", "-o", "args")).stdout
        assert any(line.split() == ["sleep", "4321"] for line in ps.splitlines()), ps
        r = ok(hpcrun("exec", "instance://scifinst", "sh", "-c", 'echo "${SCIF_APPNAME:-none}"'))
        assert r.stdout == "none\n"
        r = ok(hpcrun("exec", "--app", "bar", "instance://scifinst", "sh", "-c", 'echo "$SCIF_APPNAME"'))
        assert r.stdout == "bar\n"
    finally:
        hpcrun("instance", "stop", "--all", "-t", "1")
    r = hpcrun("instance", "start", "--app", "fakeapp", apps_image, "scifbad")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "no app 'fakeapp'" in r.stderr, r.stderr


def test_apptainer_image_own_95_apps_script_stays_idle(images, utmp):
    """Images Apptainer built carry its 95-apps.sh, which acts on $SINGULARITY_APPNAME:
    the app is activated once (hpcrun sets the name after the image's scripts)."""
    root = str(utmp / "sandbox")
    shutil.copytree(images["sandbox"], root, symlinks=True)
    for d in ("scif/apps/x/bin", "scif/apps/x/scif/env"):
        os.makedirs(os.path.join(root, d))
    with open(os.path.join(root, ".singularity.d/env/95-apps.sh"), "w") as f:
        f.write('if [ -n "${SINGULARITY_APPNAME:-}" ]; then PATH="/scif/apps/$SINGULARITY_APPNAME/bin:$PATH"; fi\n')
    with open(os.path.join(root, "scif/apps/x/scif/env/01-base.sh"), "w") as f:
        f.write("SCIF_APPNAME=x\nexport SCIF_APPNAME\n")
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    r = ok(hpcrun("exec", "--app", "x", root, "sh", "-c", 'echo "$SCIF_APPNAME $PATH"'))
    assert r.stdout.startswith("x /scif/apps/x/bin:/scif/apps/x:") and r.stdout.count("/scif/apps/x/bin") == 1, r.stdout
