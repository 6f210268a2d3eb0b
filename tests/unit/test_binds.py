"""hpcrun.binds: SRC[:DST[:ro|rw]] specs and comma lists."""

import pytest

from hpcrun import binds
from hpcrun.binds import Bind, parse, parse_one
from hpcrun.errors import USAGE, UsageError

CWD = "/home/u/work"


def test_src_only_binds_at_same_path_rw():
    b = parse_one("/data", CWD)
    assert (b.src, b.dst, b.readonly) == ("/data", "/data", False)
    assert b.origin == "--bind"


def test_src_dst():
    b = parse_one("/data:/mnt/data", CWD)
    assert (b.src, b.dst, b.readonly) == ("/data", "/mnt/data", False)


def test_src_dst_ro_and_rw():
    b = parse_one("/data:/mnt:ro", CWD)
    assert (b.src, b.dst, b.readonly) == ("/data", "/mnt", True)
    b = parse_one("/data:/mnt:rw", CWD)
    assert (b.src, b.dst, b.readonly) == ("/data", "/mnt", False)


@pytest.mark.parametrize("opt,ro", [("ro", True), ("rw", False)])
def test_src_ro_shorthand(opt, ro):
    b = parse_one(f"/data:{opt}", CWD)
    assert (b.src, b.dst, b.readonly) == ("/data", "/data", ro)


def test_empty_destination_means_same_path():
    b = parse_one("/data::ro", CWD)
    assert (b.src, b.dst, b.readonly) == ("/data", "/data", True)


def test_relative_source_resolved_against_cwd():
    b = parse_one("sub/dir", CWD)
    assert b.src == "/home/u/work/sub/dir"
    assert b.dst == "/home/u/work/sub/dir"
    b = parse_one("../x:/x", CWD)
    assert b.src == "/home/u/x" and b.dst == "/x"
    b = parse_one(".", CWD)
    assert b.src == CWD


def test_paths_are_normalised():
    b = parse_one("/a//b/./c/:/mnt/x/../y/", CWD)
    assert b.src == "/a/b/c"
    assert b.dst == "/mnt/y"


def test_relative_destination_is_usage_error():
    with pytest.raises(UsageError) as ei:
        parse_one("/data:mnt", CWD)
    assert "relative" in ei.value.message
    assert ei.value.code == USAGE


@pytest.mark.parametrize("spec", ["/data:/mnt:rx", "/data:/mnt:RO", "/data:/mnt:", "/a:/b:nosuid"])
def test_bad_option_is_usage_error(spec):
    with pytest.raises(UsageError) as ei:
        parse_one(spec, CWD)
    assert "option" in ei.value.message


@pytest.mark.parametrize("spec", ["", ":/mnt", ":", "::ro"])
def test_empty_source_is_usage_error(spec):
    with pytest.raises(UsageError) as ei:
        parse_one(spec, CWD)
    assert "malformed" in ei.value.message


@pytest.mark.parametrize("spec", ["/a:/b:ro:x", "/a:/b:/c:/d", "a:b:c:d:e"])
def test_too_many_colons_is_usage_error(spec):
    with pytest.raises(UsageError) as ei:
        parse_one(spec, CWD)
    assert "malformed" in ei.value.message
    assert ei.value.hint and "SRC" in ei.value.hint


def test_origin_in_message():
    with pytest.raises(UsageError) as ei:
        parse_one("/a:b", CWD, origin="$HPCRUN_BIND")
    assert ei.value.message.startswith("$HPCRUN_BIND")
    assert parse_one("/a", CWD, origin="x").origin == "x"


def test_parse_comma_lists_and_multiple_args():
    out = parse(["/a,/b:/mnt/b:ro", "rel:/r", "/c:rw"], CWD)
    assert out == [Bind("/a", "/a"), Bind("/b", "/mnt/b", True), Bind(CWD + "/rel", "/r"), Bind("/c", "/c")]
    assert [b.readonly for b in out] == [False, True, False, False]


def test_parse_skips_empty_entries_and_strips_spaces():
    assert parse([], CWD) == []
    assert parse([""], CWD) == []
    assert parse([",, ,"], CWD) == []
    assert parse([" /a , /b:/c "], CWD) == [Bind("/a", "/a"), Bind("/b", "/c")]


def test_parse_error_in_list_propagates():
    with pytest.raises(UsageError):
        parse(["/ok,/bad:rel"], CWD)


def test_bind_equality_ignores_origin_and_repr():
    assert Bind("/a", "/b", True, "x") == Bind("/a", "/b", True, "y")
    assert Bind("/a", "/b", True) != Bind("/a", "/b", False)
    assert repr(Bind("/a", "/b", True)) == "Bind('/a', '/b', ro=True)"
    assert binds.Bind is Bind


# Escaped commas and colons: Apptainer's ParseBindPath
# (pkg/runtime/engine/apptainer/config/bind.go; e2e actionBinds BindFileWith{Comma,Colon}*).


def test_escaped_comma_in_source():
    """BindFileWithCommaOK: `file\\,comma:/canary/file` is one bind of `file,comma`;
    BindFileWithCommaKO: without the backslash the comma separates two binds."""
    assert parse(["/c/file\\,comma:/canary/file"], CWD) == [Bind("/c/file,comma", "/canary/file")]
    two = [Bind("/c/file", "/c/file"), Bind(CWD + "/comma", "/canary/file")]
    assert parse(["/c/file,comma:/canary/file"], CWD) == two


def test_escaped_colon_in_source():
    """BindFileWithColonOK: `file\\:colon:/canary/file` binds `file:colon`;
    BindFileWithColonKO: unescaped, `/canary/file` is taken as the option."""
    assert parse(["/c/file\\:colon:/canary/file"], CWD) == [Bind("/c/file:colon", "/canary/file")]
    assert parse_one("/c/a\\:b:ro", CWD) == Bind("/c/a:b", "/c/a:b", True)
    with pytest.raises(UsageError) as ei:
        parse(["/c/file:colon:/canary/file"], CWD)
    assert "option" in ei.value.message


def test_escapes_in_destination_and_lists():
    """hpcrun also takes the escapes in the destination (Apptainer only in the source);
    any other backslash stays, as in Apptainer."""
    out = parse(["/a\\,b:/m\\:n:ro,/x\\:y"], CWD)
    assert out == [Bind("/a,b", "/m:n", True), Bind("/x:y", "/x:y")]
    assert parse(["/a\\b:/c\\d,/e\\"], CWD) == [Bind("/a\\b", "/c\\d"), Bind("/e\\", "/e\\")]


def test_options_list_after_full_spec():
    """`SRC:DST:OPT,OPT` (ParseBindPath): a bare ro/rw after a three-field item is one
    more option of it, not a path named ro."""
    assert parse(["/a:/b:rw,ro"], CWD) == [Bind("/a", "/b", True)]
    assert parse(["/a:/b:ro,rw,/c"], CWD) == [Bind("/a", "/b", True), Bind("/c", "/c")]
    assert parse(["/a:/b,ro"], CWD) == [Bind("/a", "/b"), Bind(CWD + "/ro", CWD + "/ro")]
