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


MULTI = """# comment before the first stage
Bootstrap: scratch
Stage: one
%arguments
    WHO=one
%files
    a {{ WHO }}.txt

bootstrap: scratch
Stage: two
%files from one
    /one.txt "/with space"
%files
    b
%post
    echo {{ WHO }}
"""


def test_parse_all_splits_stages_as_apptainer():
    """pkg/build/types/parser/deffile.go All (testdata_multi/simple): a stage starts at
    each line beginning `Bootstrap:` (any case); %arguments are per stage (MakeAllDefs);
    the last stage carries the whole file and every stage's used {{ NAME }}."""
    one, two = deffile.parse_all(MULTI, "m.def", ["WHO=cli"])
    assert (one.stage, two.stage) == ("one", "two")
    assert one.file_blocks == [(None, [("a", "cli.txt")])]
    assert two.file_blocks == [("one", [("/one.txt", "/with space")]), (None, [("b", "")])]
    assert deffile.host_files(two) == [("b", "")] and deffile.stage_files(two) == [("one", "/one.txt", "/with space")]
    assert two.text == MULTI.replace("{{ WHO }}", "cli") and two.used == {"WHO"}
    assert "echo cli" in two.sections["post"]
    with pytest.raises(UsageError, match="has no value"):  # stage one's %arguments are its own
        deffile.parse_all(MULTI, "m.def")
    one, two = deffile.parse_all(MULTI.replace("Stage: two\n", "Stage: two\n%arguments\n WHO=two\n"), "m.def")
    assert one.file_blocks[0][1] == [("a", "one.txt")] and "echo two" in two.sections["post"]


def test_parse_all_single_stage_unchanged():
    text = "From: x.sif\nBootstrap: localimage\n%files\n  a /b\n"
    (d,) = deffile.parse_all(text, "s.def")
    assert d.header == {"from": "x.sif", "bootstrap": "localimage"} and d.text == text
    assert d.stage == "" and deffile.host_files(d) == [("a", "/b")]
    assert deffile.host_files(parse("%files\n a\n")) == [("a", "")]  # parse() alone: no file_blocks


def test_parse_all_errors_name_the_line_and_stage():
    """build.go findStageIndex: "stage NAME was not found"; a later stage is not built yet."""
    with pytest.raises(UsageError, match=r"m.def:5: unknown section %nope"):
        deffile.parse_all("Bootstrap: scratch\nStage: a\n\nBootstrap: scratch\n%nope\n", "m.def")
    with pytest.raises(UsageError, match="stage b was not found"):
        deffile.parse_all("Bootstrap: scratch\n%files from b\n a\nBootstrap: scratch\nStage: b\n", "m.def")
    with pytest.raises(UsageError, match="stage a was not found"):
        deffile.parse_all("Bootstrap: scratch\nStage: a\n%files from a\n x\n", "m.def")
    with pytest.raises(UsageError, match="two stages named a"):
        deffile.parse_all("Bootstrap: scratch\nStage: a\nBootstrap: scratch\nStage: a\n", "m.def")
    with pytest.raises(UsageError, match="not understood"):
        deffile.parse_all("Bootstrap: scratch\n%files to x\n a\n", "m.def")
