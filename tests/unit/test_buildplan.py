"""Build plans: which steps run for each source kind, whose files are kept, what runs as
root of the subuid mapping (pure code: no privilege, no files but the sources)."""

import pytest

from hpcrun.builders import source as sourcemod
from hpcrun.builders.buildplan import build_plan
from hpcrun.errors import UsageError

SUBID = {"mode": "subid", "uid": 1000, "gid": 1000, "subuid": (100000, 65536), "subgid": (100000, 65536)}
ROOTONLY = {"mode": "root", "uid": 1000, "gid": 1000, "subuid": None, "subgid": None}


@pytest.fixture
def srcs(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "root.tar").write_bytes(b"x" * 100 + b"\0" * 412)
    (tmp_path / "img.sqfs").write_bytes(b"hsqs" + b"\0" * 96)
    (tmp_path / "post.def").write_text(
        "Bootstrap: localimage\nFrom: root.tar\n%files\na /a\n%post\ntrue\n%test\ntrue\n%runscript\necho\n"
    )
    (tmp_path / "scratch.def").write_text("Bootstrap: scratch\n%setup\ntrue\n")
    (tmp_path / "nested.def").write_text("Bootstrap: localimage\nFrom: post.def\n")
    return tmp_path


def plan(src, idmap=None, **kw):
    return build_plan("/out/x.sif", sourcemod.classify(str(src)), idmap, **kw)


def test_steps_per_source_kind(srcs, monkeypatch):
    assert plan(srcs / "dir").steps == ["squash"]
    assert plan(srcs / "dir", sandbox=True).steps == ["copy", "metadata", "sandbox"]
    assert plan(srcs / "root.tar").steps == ["fetch", "unpack", "metadata", "squash"]
    assert plan(srcs / "img.sqfs").steps == ["unsquash", "metadata", "squash"]
    assert plan(srcs / "scratch.def").steps == ["mkroot", "metadata", "setup", "sections", "labels", "squash"]
    assert plan(srcs / "post.def").steps == [
        "fetch",
        "unpack",
        "metadata",
        "files",
        "sections",
        "post",
        "labels",
        "test",
        "squash",
    ]
    assert "test" not in plan(srcs / "post.def", notest=True).steps
    assert plan(f"docker-archive:{srcs / 'root.tar'}").source.kind == "docker-archive"
    # cwltool's form, absolute and relative
    assert plan(f"docker-archive://{srcs / 'root.tar'}").source.path == str(srcs / "root.tar")
    monkeypatch.chdir(srcs)
    assert plan("docker-archive://root.tar").source.path == str(srcs / "root.tar")
    assert plan("docker://localhost:5000/a/b:1").source.to_dict()["ref"] == "docker://localhost:5000/a/b:1"


def test_owner_mapping_is_decided_once(srcs):
    as_root = plan(srcs / "root.tar")
    assert as_root.owners and not as_root.mapped
    sub = plan(srcs / "root.tar", SUBID)
    assert sub.owners and sub.mapped and not sub.chown_sandbox
    sandbox = plan(srcs / "root.tar", SUBID, sandbox=True)
    assert not sandbox.owners and not sandbox.mapped and sandbox.chown_sandbox
    alone = plan(srcs / "post.def", ROOTONLY)
    assert not alone.owners and alone.root_only_post
    assert not plan(srcs / "root.tar", ROOTONLY).root_only_post


def test_sources_are_classified_by_content_and_refused_with_one_line(srcs, tmp_path):
    assert sourcemod.classify(str(srcs / "post.def")).base.kind == "tarball"
    with pytest.raises(UsageError, match="another definition file"):
        sourcemod.classify(str(srcs / "nested.def"))
    with pytest.raises(UsageError, match="no such file"):
        sourcemod.classify(str(tmp_path / "missing"))
    import os

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="not a regular file"):
        sourcemod.classify(str(tmp_path / "fifo"))  # never opened: it would block


def test_dry_run_plan_is_json(srcs):
    import json

    d = json.loads(json.dumps(plan(srcs / "post.def", SUBID).to_dict()))
    assert d["source"]["base"]["kind"] == "tarball" and d["source"]["sections"] == [
        "files",
        "post",
        "runscript",
        "test",
    ]


def test_multistage_plan(tmp_path):
    """build.go New/Full: every stage is bootstrapped and built in its own tree, in order;
    only the last one is assembled (squash or sandbox); %files from comes before %setup."""
    (tmp_path / "base.tar").write_bytes(b"x" * 100 + b"\0" * 412)
    (tmp_path / "m.def").write_text(
        "Bootstrap: localimage\nFrom: base.tar\nStage: build\n%post\n make\n%test\n true\n"
        "Bootstrap: scratch\n%setup\n true\n%files from build\n /app /app\n%runscript\n /app\n"
    )
    p = plan(tmp_path / "m.def")
    assert p.steps == ["stages", "mkroot", "metadata", "stagefiles", "setup", "sections", "labels", "squash"]
    (stage,) = p.stages
    assert (stage.name, stage.dir, stage.out) == ("build", "stage-0", None)
    assert stage.steps == ["fetch", "unpack", "metadata", "sections", "post", "labels", "test"]
    assert p.to_dict()["stages"][0]["steps"] == stage.steps
    sub = plan(tmp_path / "m.def", SUBID, sandbox=True)
    assert sub.stages[0].mapped == sub.mapped and sub.steps[-1] == "sandbox"


def test_section_update_and_mksquashfs_plans(srcs):
    """--section (RunSection), --update (the sandbox OUT copied, no bootstrap) and
    --mksquashfs-args (-comp replaces --compress; probed first) decided in the plan."""
    assert plan(srcs / "post.def", sections=["post"]).steps == [
        "fetch",
        "unpack",
        "metadata",
        "sections",
        "post",
        "labels",
        "squash",
    ]
    assert "post" not in plan(srcs / "post.def", sections=[]).steps
    up = plan(srcs / "post.def", sandbox=True, update=True)
    assert up.steps[:2] == ["copy", "metadata"] and up.steps[-1] == "sandbox"
    assert up.base().kind == "dir" and up.base().path == "/out/x.sif"
    squashed = plan(srcs / "root.tar", mksquashfs_args=["-comp", "lz4"])
    assert squashed.steps[0] == "probe" and squashed.compress is None
    assert plan(srcs / "root.tar", mksquashfs_args=["-b", "4096"]).compress == "gzip"
    assert plan(srcs / "dir", mksquashfs_args=["-b", "4096"]).direct
    assert "probe" not in plan(srcs / "root.tar", sandbox=True, mksquashfs_args=["-b", "4096"]).steps
