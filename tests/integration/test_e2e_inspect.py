"""Apptainer's inspect table, ported: e2e/inspect/inspect.go (apptainer/apptainer), on a SIF,
a plain squashfs and a sandbox built from e2e/testdata/inspector_container.def (its
bootstrap replaced by our busybox base). Each case keeps the name of Apptainer's subtest;
the SCIF app cases are in test_scif.py."""

import json
import os
import subprocess

import pytest
from hpcrun_testlib import build_def_image, hpcrun

INSPECTOR_DEF = """bootstrap: localimage
from: base.sif

%help
This is a e2e test container used for testing the 'inspect'
command. This container "inspector_container.sif" should be placed
in the "e2e/testdata" directory of Apptainer.

%labels
MAINTAINER "WestleyK <westley@sylabs.io>"
e2e awesome
E2E AWESOME
hi "hello world"
HI "HELLO WORLD"

%post
echo "export hello=\\"world\\"" >> $APPTAINER_ENVIRONMENT
# add labels from post section
k=first; echo "$k.build.labels  $k" >> $APPTAINER_LABELS
k=second; echo "$k.build.labels $k" >> $APPTAINER_LABELS

%test
ls /
test -d /
test -d /etc

%environment
export test="testing"
export e2e="e2e testing"

%runscript
cat /.singularity.d/runscript.help

%startscript
exec "$@"
"""

HELP = (
    "This is a e2e test container used for testing the 'inspect'\n"
    'command. This container "inspector_container.sif" should be placed\n'
    'in the "e2e/testdata" directory of Apptainer.'
)
# Apptainer appends "\n" + %environment to the base image's 90-environment.sh: in its test
# the base's is Apptainer's header, here it is make_rootfs's two exports (hpcrun_testlib)
ENV_90 = 'export IMAGE_VAR=from_image\nexport OVERRIDDEN=image\n\nexport test="testing"\nexport e2e="e2e testing"'


@pytest.fixture(scope="module")
def inspected(images):
    """{'SIF': path, 'Squash': path, 'Sandbox': path} of the inspector container."""
    sif = build_def_image(images, "e2e-inspect", INSPECTOR_DEF)
    d = os.path.dirname(sif)
    from hpcrun.images import sif as sifmod

    squash = os.path.join(d, "image.sqs")
    part = sifmod.SifFile(sif).primary_partition()  # copied out, as Apptainer's test does
    with open(sif, "rb") as src, open(squash, "wb") as out:
        src.seek(part.offset)
        out.write(src.read(part.size))
    box = os.path.join(d, "sandbox")
    subprocess.run(["unsquashfs", "-q", "-no-xattrs", "-d", box, squash], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["chmod", "-R", "a+rX", d], check=True)
    return {"SIF": sif, "Squash": squash, "Sandbox": box}


def label(name, want):
    return lambda attrs: attrs["labels"][name] == want


CASES = [
    ("label maintainer", "--labels", label("MAINTAINER", '"WestleyK <westley@sylabs.io>"')),
    ("label_E2E", "--labels", label("E2E", "AWESOME")),
    ("label_HI", "--labels", label("HI", '"HELLO WORLD"')),
    ("label_e2e", "--labels", label("e2e", "awesome")),
    ("label_hi", "--labels", label("hi", '"hello world"')),
    ("build_label_first", "--labels", label("first.build.labels", "first")),
    ("build_label_second", "--labels", label("second.build.labels", "second")),
    ("label_org.label-schema.usage", "--labels", label("org.label-schema.usage", "/.singularity.d/runscript.help")),
    (
        "label_org.label-schema.usage.singularity.deffile.bootstrap",
        "--labels",
        label("org.label-schema.usage.singularity.deffile.bootstrap", "localimage"),
    ),
    (
        "label_org.label-schema.usage.singularity.deffile.from",
        "--labels",
        label("org.label-schema.usage.singularity.deffile.from", "base.sif"),
    ),
    (
        "label_org.label-schema.usage.apptainer.runscript.help",
        "--labels",
        label("org.label-schema.usage.apptainer.runscript.help", "/.singularity.d/runscript.help"),
    ),
    ("deffile", "--deffile", lambda a: a["deffile"].startswith("bootstrap:")),
    ("runscript", "--runscript", lambda a: a["runscript"] == "#!/bin/sh\n\ncat /.singularity.d/runscript.help"),
    ("startscript", "--startscript", lambda a: a["startscript"] == '#!/bin/sh\n\nexec "$@"'),
    ("test", "--test", lambda a: a["test"] == "#!/bin/sh\n\nls /\ntest -d /\ntest -d /etc"),
    ("helpfile", "--helpfile", lambda a: a["helpfile"] == HELP),
    (
        "environment",
        "--environment",
        lambda a: (
            a["environment"]["/.singularity.d/env/90-environment.sh"] == ENV_90
            and a["environment"]["/.singularity.d/env/91-environment.sh"] == 'export hello="world"'
        ),
    ),
]


def attributes(r):
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["type"] == "container"
    return doc["data"]["attributes"]


@pytest.mark.parametrize("kind", ["SIF", "Squash", "Sandbox"])
@pytest.mark.parametrize("name,flag,check", CASES, ids=[c[0] for c in CASES])
def test_apptainerInspect(inspected, kind, name, flag, check):
    attrs = attributes(hpcrun("inspect", "--json", flag, inspected[kind]))
    assert check(attrs), attrs


def test_apptainerInspect_all(inspected):
    """SIF/all: --all has every attribute above in one document."""
    attrs = attributes(hpcrun("inspect", "--all", inspected["SIF"]))
    for name, _, check in CASES:
        assert check(attrs), name
