"""Definition-file behaviour as Apptainer's (issue 10). Each test names the Apptainer e2e
test it follows (e2e/imgbuild/imgbuild.go, e2e/inspect/inspect.go). Every image is run."""

import json
import shutil
import subprocess

from hpcrun_testlib import hpcrun

# An interpreter that says it was used, then runs the script with sh.
MYSHELL = '#!/bin/sh\necho "myshell: $*" >> /tmp/myshell.log 2>/dev/null; echo "myshell ran"\nexec /bin/sh "$@"\n'


def build_def(images, bdir, body, *args, name="out.sif"):
    shutil.copy(images["sif"], bdir / "base.sif")
    (bdir / "myshell").write_text(MYSHELL)
    (bdir / "myshell").chmod(0o755)
    (bdir / "x.def").write_text(body)
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    out = bdir / name
    return out, hpcrun("build", *args, str(out), str(bdir / "x.def"), timeout=180)


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def labels_of(img):
    return json.loads(ok(hpcrun("exec", str(img), "cat", "/.singularity.d/labels.json")).stdout)


ENV_DEF = """Bootstrap: localimage
From: base.sif

%setup
    echo "$APPTAINER_ENVIRONMENT $SINGULARITY_ENVIRONMENT" > "$APPTAINER_ROOTFS/setup-env"
    [ "$SINGULARITY_ROOTFS" = "$APPTAINER_ROOTFS" ]

%post
    echo 'export FROM_POST=yes' >> $APPTAINER_ENVIRONMENT
    echo 'export FROM_POST2=also' >> $SINGULARITY_ENVIRONMENT
    echo "post.label one" >> $APPTAINER_LABELS
    echo "post.label2 two" >> $SINGULARITY_LABELS
    echo "$APPTAINER_ROOTFS" > /rootfs-var
"""


def test_post_environment_and_labels_files(images, bdir):
    """imgbuild.go buildLabelsTests / buildEnvironmentTests ($APPTAINER_ENVIRONMENT and
    $APPTAINER_LABELS written by %post reach the run time environment and the labels)."""
    out, r = build_def(images, bdir, ENV_DEF)
    ok(r)
    r = ok(hpcrun("exec", str(out), "sh", "-c", 'echo "$FROM_POST $FROM_POST2"; cat /setup-env'))
    assert r.stdout.splitlines() == [
        "yes also",
        "/.singularity.d/env/91-environment.sh /.singularity.d/env/91-environment.sh",
    ]
    labels = labels_of(out)
    assert labels["post.label"] == "one" and labels["post.label2"] == "two", labels
    r = ok(hpcrun("exec", str(out), "sh", "-c", "ls -a /; cat /rootfs-var"))
    assert ".build.labels" not in r.stdout and ".post.script" not in r.stdout, r.stdout


SHELL_DEF = """Bootstrap: localimage
From: base.sif

%files
    myshell /opt/myshell

%post -c /opt/myshell
    echo "post ran" > /post-ran

%runscript
#!/opt/myshell
    echo "runscript ran"

%test -c /opt/myshell
    echo "test ran"
"""


def test_section_shells_and_shebangs(images, bdir):
    """imgbuild.go testScratchBuilds/buildDefinition ("%post -c /bin/bash", custom #! in
    %runscript and %test)."""
    out, r = build_def(images, bdir, SHELL_DEF)
    ok(r)
    assert r.stdout.count("myshell ran") == 2 and "test ran" in r.stdout, r.stdout  # %post and %test
    r = ok(hpcrun("run", str(out)))
    assert r.stdout.splitlines() == ["myshell ran", "runscript ran"], r.stdout
    head = ok(hpcrun("exec", str(out), "head", "-1", "/.singularity.d/runscript")).stdout
    assert head == "#!/opt/myshell\n"
    r = ok(hpcrun("exec", str(out), "cat", "/post-ran"))
    assert r.stdout == "post ran\n"


LABEL_DEF = """Bootstrap: localimage
From: base.sif

%help
    Some help.

%labels
    mine yes
"""


def test_build_labels(images, bdir):
    """inspect.go labels / imgbuild.go buildLabelsTests: Apptainer's org.label-schema build
    labels, a base image's replaced by this build's."""
    base, r = build_def(images, bdir, LABEL_DEF, name="first.sif")
    ok(r)
    first = labels_of(base)
    for key in ("org.label-schema.build-date", "org.label-schema.build-arch", "org.opencontainers.image.created"):
        assert first.get(key), (key, first)
    assert first["org.label-schema.schema-version"] == "1.0"
    assert first["org.label-schema.usage"] == "/.singularity.d/runscript.help"
    assert first["org.label-schema.usage.apptainer.runscript.help"] == "/.singularity.d/runscript.help"
    assert first["org.label-schema.usage.singularity.deffile.bootstrap"] == "localimage"
    assert first["org.label-schema.usage.singularity.deffile.from"] == "base.sif"
    assert first["mine"] == "yes"
    shutil.copy(base, bdir / "first-base.sif")
    (bdir / "second.def").write_text("Bootstrap: localimage\nFrom: first-base.sif\n")
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    r = ok(hpcrun("build", "--reproducible", str(bdir / "second.sif"), str(bdir / "second.def"), timeout=180))
    second = labels_of(bdir / "second.sif")
    assert second["org.label-schema.usage.singularity.deffile.from"] == "first-base.sif"
    assert second["org.label-schema.build-date"] == "Thursday_1_January_1970_0:0:0_UTC"
    assert second["mine"] == "yes"  # the base's own labels are kept


ARG_DEF = """Bootstrap: localimage
From: base.sif

%post
    echo "{{ USED }}" > /used
"""


def test_unused_build_args(images, bdir):
    """imgbuild.go testBuildWithBuildArgs ("unused build args" fails unless
    --warn-unused-build-args)."""
    out, r = build_def(images, bdir, ARG_DEF, "--build-arg", "USED=1", "--build-arg", "EXTRA=2")
    assert r.returncode == 2 and not out.exists(), r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "EXTRA" in lines[0] and "USED" not in lines[0], r.stderr
    out, r = build_def(
        images, bdir, ARG_DEF, "--warn-unused-build-args", "--build-arg", "USED=1", "--build-arg", "EXTRA=2"
    )
    ok(r)
    assert "EXTRA" in r.stderr
    assert ok(hpcrun("exec", str(out), "cat", "/used")).stdout == "1\n"
