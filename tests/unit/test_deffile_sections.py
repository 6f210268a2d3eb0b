"""Section arguments and interpreters as Apptainer's build (internal/pkg/build/util.go
getSectionScriptArgs, metadata.go handleShebangScript; e2e imgbuild.go buildDefinition)."""

import pytest

from hpcrun.builders import deffile
from hpcrun.errors import UsageError

BASE = "Bootstrap: scratch\n"


def parse(body, build_args=()):
    return deffile.parse(BASE + body, "x.def", build_args)


def test_post_dash_c_becomes_one_command():
    d = parse("%post -c /bin/bash -l # a comment\n  echo hi\n")
    assert deffile.section_argv(d, "post", "/.post.script") == ["/bin/sh", "-e", "-c", "/bin/bash -l /.post.script"]
    assert deffile.section_argv(parse("%post\n true\n"), "post", "/s") == ["/bin/sh", "-e", "/s"]
    with pytest.raises(UsageError):
        deffile.section_argv(parse("%post -c\n true\n"), "post", "/s")


def test_shebang_lines():
    assert deffile.shebang(parse("%runscript\n#!/bin/bash\necho a\n"), "runscript") == ("#!/bin/bash", "echo a")
    assert deffile.shebang(parse("%test -c /bin/ash\necho a\n"), "test") == ("#!/bin/ash", "echo a")
    assert deffile.shebang(parse("%runscript\necho a\n"), "runscript") == ("#!/bin/sh", "echo a")


def test_used_build_args_and_build_labels(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    d = parse("From: {{ A }}\n%post\n echo {{ B }}\n", ["A=1", "B=2", "C=3"])
    assert d.used == {"A", "B"}
    labels = deffile.build_labels(d, reproducible=True)
    assert labels["org.label-schema.build-date"] == "Thursday_1_January_1970_0:0:0_UTC"
    assert labels["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    assert labels["org.label-schema.usage.singularity.deffile.from"] == "1"
    assert "org.label-schema.usage" not in labels  # no %help
