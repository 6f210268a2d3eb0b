"""Pure parts of image references: refused schemes, Singularity 2.x launch lines."""

import pytest

from hpcrun.errors import UsageError
from hpcrun.images import refcache
from hpcrun.images.detect import launch_offset


@pytest.mark.parametrize("ref", ["library://alpine:3", "shub://a/b", "foo://x"])
def test_refused_schemes(ref):
    with pytest.raises(UsageError) as ei:
        refcache.resolve(ref)
    assert ref in ei.value.message


def test_a_file_with_scheme_like_name_is_a_file(tmp_path):
    (tmp_path / "a:").mkdir()
    path = str(tmp_path / "a:") + "//img"  # '<dir>/a://img'
    open(path, "wb").close()
    assert refcache.resolve(path) == path


def test_launch_offset():
    line = b"#!/usr/bin/env run-singularity\n"
    assert launch_offset(line + b"hsqs" + bytes(92)) == len(line)
    assert launch_offset(b"#!/bin/sh run-singularity\nhsqs") == 26
    assert launch_offset(line + b"junk") == 0  # no squashfs right after the line
    assert launch_offset(b"# run-singularity\nhsqs") == 0  # not a #! line
    assert launch_offset(b"hsqs") == 0
