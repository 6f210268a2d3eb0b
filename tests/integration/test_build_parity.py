"""Definition-file builds as Apptainer's (issue 10): multi-stage definitions, --update,
--section, --mksquashfs-args, %files source paths. Each test names the Apptainer e2e test
(e2e/imgbuild/imgbuild.go) or code it follows; built by the test user and run."""

import os
import shutil
import subprocess

import pytest

from hpcrun_testlib import HPCRUN, hpcrun


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def one_line_error(r, code, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("hpcrun: error:"), (r.returncode, r.stderr)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def prepare(images, bdir, body, **extra):
    shutil.copy(images["sif"], bdir / "base.sif")
    (bdir / "x.def").write_text(body)
    for name, text in extra.items():
        (bdir / name).write_text(text)
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    return bdir / "x.def"


def build(bdir, *args, out="out", cwd=None):
    return hpcrun("build", *args, str(bdir / out), str(bdir / "x.def"), timeout=300, cwd=cwd or str(bdir))


def cat(img, *paths):
    return ok(hpcrun("exec", str(img), "cat", *paths)).stdout


STAGE = "Bootstrap: localimage\nFrom: base.sif\n"

COMPLEX = f"""{STAGE}Stage: one
%files
    data.txt StageOne2.txt
    data.txt StageOne.txt

{STAGE}Stage: two
%files
    data.txt StageTwo2.txt
    data.txt StageTwo.txt

{STAGE}Stage: three
%files from one
    StageOne2.txt StageOneCopy2.txt
    StageOne.txt StageOneCopy.txt
%files from two
    StageTwo2.txt StageTwoCopy2.txt
    StageTwo.txt StageTwoCopy.txt

{STAGE}%files from three
    StageOneCopy2.txt StageOneCopyFinal2.txt
    StageOneCopy.txt StageOneCopyFinal.txt
    StageTwoCopy2.txt StageTwoCopyFinal2.txt
    StageTwoCopy.txt StageTwoCopyFinal.txt
%runscript
    echo final stage
"""


def test_multistage_file_copy(images, bdir):
    """imgbuild.go buildMultiStageDefinition (FileCopySimple, FileCopyComplex): files
    pass from stage to stage; only the last stage is OUT (its runscript, none of the
    earlier stages' own files); the whole file is the image's definition."""
    prepare(images, bdir, COMPLEX, **{"data.txt": "multi stage data\n"})
    for args, out in ((["--sandbox"], "box"), ([], "out.sif")):
        ok(build(bdir, *args, out=out))
        img = bdir / out
        finals = [f"/StageOneCopyFinal{n}.txt" for n in ("", "2")] + [f"/StageTwoCopyFinal{n}.txt" for n in ("", "2")]
        assert cat(img, *finals) == "multi stage data\n" * 4
        r = hpcrun("exec", str(img), "ls", "/StageOne.txt", "/StageOneCopy.txt", "/StageTwo.txt")
        assert r.returncode != 0 and r.stdout == "", r.stdout
        assert ok(hpcrun("run", str(img))).stdout == "final stage\n"
        assert cat(img, "/.singularity.d/Singularity") == COMPLEX


HOSTILE = """Bootstrap: localimage
From: base.sif
Stage: s1
%post
    mkdir -p /etc /tree/sub
    echo "stage one passwd" > /etc/passwd
    echo "stage one hostname" > /etc/hostname
    ln -s /etc /out
    ln -s /etc /tree/esc
    ln -s ../../etc/passwd /tree/sub/up
    echo inside > /tree/sub/f

Bootstrap: localimage
From: base.sif
%files from s1
    /out/passwd /x
    /out /from-out
    /tree /t
    /tree/sub/up /y
    /out/hostname /t/esc/written
"""


@pytest.mark.parametrize("builder", ["user", "root"])
def test_multistage_links_stay_in_their_trees(images, bdir, builder):
    """imgbuild.go buildMultiStageDefinition, hostile: stage 1's /out -> /etc must give
    stage 1's /etc/passwd (files.CopyFromStage's securejoin), never the host's; links
    inside a copied directory stay links in the final tree, and a destination through one
    stays in the final tree. By the user and by root (who could read and write anything
    on the host)."""
    prepare(images, bdir, HOSTILE)
    if builder == "user":
        ok(build(bdir, "--sandbox", out="box"))
    else:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8"}
        cmd = [HPCRUN, "build", "--sandbox", str(bdir / "box"), str(bdir / "x.def")]
        ok(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(bdir)))
    box = bdir / "box"
    assert (box / "x").read_text() == "stage one passwd\n"
    assert (box / "y").read_text() == "stage one passwd\n"
    assert (box / "from-out" / "hostname").read_text() == "stage one hostname\n"
    assert os.readlink(box / "t" / "esc") == "/etc" and os.readlink(box / "t" / "sub" / "up") == "../../etc/passwd"
    assert (box / "t" / "sub" / "f").read_text() == "inside\n"
    # written through the copied link /t/esc -> /etc: the final tree's /etc, not the host's
    assert (box / "etc" / "written").read_text() == "stage one hostname\n"
    assert not os.path.lexists("/etc/written")
    with open("/etc/passwd") as f:
        assert "stage one" not in f.read()


def test_multistage_bad_stage_references(images, bdir):
    """build.go findStageIndex: an unknown stage fails the build (here: before anything is
    built, in one line); a later stage is refused as unknown too."""
    prepare(images, bdir, f"{STAGE}Stage: a\n\n{STAGE}%files from nope\n    /etc/hostname /h\n")
    one_line_error(build(bdir), 2, "stage nope was not found", "x.def")
    prepare(images, bdir, f"{STAGE}%files from later\n    /a /b\n\n{STAGE}Stage: later\n")
    one_line_error(build(bdir), 2, "stage later was not found")
    assert not (bdir / "out").exists()


UPDATE = """Bootstrap: localimage
From: base.sif
%files
    new.txt /new.txt
%post
    test -e /old.txt
    echo post >> /old.txt
"""


def test_update_sandbox(images, bdir):
    """imgbuild.go buildUpdateSandbox: --update without --sandbox, of a missing path or of a
    file fails (one line, nothing changed); of a sandbox it runs the definition over it,
    keeping what was there (the bootstrap skipped)."""
    prepare(images, bdir, UPDATE, **{"new.txt": "new\n"})
    box = bdir / "box"
    ok(hpcrun("build", "--sandbox", str(box), images["sif"], timeout=120))
    (box / "old.txt").write_text("old\n")
    one_line_error(build(bdir, "--update", out="box"), 2, "--sandbox")
    one_line_error(build(bdir, "--update", "--sandbox", out="missing"), 2, "does not exist")
    one_line_error(build(bdir, "--update", "--sandbox", out="x.def"), 2, "not a directory")
    assert (box / "old.txt").read_text() == "old\n" and not (box / "new.txt").exists()
    ok(build(bdir, "--update", "--sandbox", out="box"))
    assert (box / "old.txt").read_text() == "old\npost\n" and (box / "new.txt").read_text() == "new\n"
    assert cat(box, "/old.txt") == "old\npost\n"
    # --force wins over --update: built from scratch, so %post's test fails
    r = build(bdir, "--update", "--force", "--sandbox", out="box")
    one_line_error(r, 1, "%post")
    # the bootstrap is skipped: its From: need not be there any more
    (bdir / "x.def").write_text(UPDATE.replace("base.sif", "gone.sif"))
    ok(build(bdir, "--update", "--sandbox", out="box"))
    assert (box / "old.txt").read_text() == "old\npost\npost\n"


SECTIONS = """Bootstrap: localimage
From: base.sif
%files
    new.txt /new.txt
%post
    echo post > /post-ran
%environment
    export FROM_ENV=yes
%labels
    my.label here
"""


def test_section_only(images, bdir):
    """build.go/metadata.go RunSection (build --section NAME[,NAME]): only the named
    sections run; all and none stand alone (build_linux.go checkSections)."""
    prepare(images, bdir, SECTIONS, **{"new.txt": "new\n"})
    ok(build(bdir, "--section", "post,labels", out="a.sif"))
    r = ok(
        hpcrun(
            "exec", str(bdir / "a.sif"), "sh", "-c", 'cat /post-ran; echo "env=$FROM_ENV"; test -e /new.txt || echo no'
        )
    )
    assert r.stdout.splitlines() == ["post", "env=", "no"], r.stdout
    assert '"my.label": "here"' in cat(bdir / "a.sif", "/.singularity.d/labels.json")
    ok(build(bdir, "--section", "files", "--section", "environment", out="b.sif"))
    r = ok(
        hpcrun(
            "exec", str(bdir / "b.sif"), "sh", "-c", 'cat /new.txt; echo "env=$FROM_ENV"; test -e /post-ran || echo no'
        )
    )
    assert r.stdout.splitlines() == ["new", "env=yes", "no"], r.stdout
    assert "my.label" not in cat(bdir / "b.sif", "/.singularity.d/labels.json")
    one_line_error(build(bdir, "--section", "all,post", out="c.sif"), 2, "all and none")
    one_line_error(build(bdir, "--section", "pots", out="c.sif"), 2, "pots")


def _compression(path):
    with open(path, "rb") as f:
        sb = f.read(96)
    assert sb[:4] == b"hsqs"
    return int.from_bytes(sb[20:22], "little")  # squashfs superblock: compression id


def test_mksquashfs_args(images, bdir):
    """imgbuild.go buildExtraArgs (--mksquashfs-args "-comp lz4"): the args reach
    mksquashfs, -comp replacing the default; a bad one fails first, in one line."""
    prepare(images, bdir, "Bootstrap: localimage\nFrom: base.sif\n")
    ok(build(bdir, "--mksquashfs-args", "-comp lz4 -b 65536", out="lz4.sqfs"))
    assert _compression(bdir / "lz4.sqfs") == 5  # LZ4
    assert ok(hpcrun("exec", str(bdir / "lz4.sqfs"), "echo", "runs")).stdout == "runs\n"
    r = build(bdir, "--mksquashfs-args", "-no-such-option", out="bad.sqfs")
    one_line_error(r, 2, "--mksquashfs-args", "-no-such-option")
    assert not (bdir / "bad.sqfs").exists()
    assert [n for n in os.listdir(bdir) if n.startswith(".hpcrun-build-")] == []


def test_json_flag_is_a_no_op(images, bdir):
    """cmd/internal/cli/build.go --json: declared ("interpret build definition as JSON")
    but never read by Apptainer; the definition is built as a definition."""
    prepare(images, bdir, "Bootstrap: localimage\nFrom: base.sif\n%post\n    echo j > /j\n")
    ok(build(bdir, "--json", out="j.sif"))
    assert cat(bdir / "j.sif", "/j") == "j\n"


HOST_FILES = """Bootstrap: localimage
From: base.sif
%files
    srcFile
    srcFile dstDir/
    srcFile dstDir/dstFile
    srcFile dstDir/long/path/to/dstFile
    "src File" "src File"
    srcFile "dst File"
    src?ile glob/
    srcDi?/srcFil?Nested glob/
    srcDi?/srcFil?Nested
    srcDir srcDirDest
    srcDir dstDir/
    srcFileLinkAbs srcFileLinkAbs
    srcDirLinkRel srcDirLinkRel
    srcDir /existing
    srcFile /existing
    both.txt /both.txt
    onlydef.txt /onlydef.txt
"""


def test_files_from_host_as_cp(images, bdir):
    """files/copy_test.go TestCopyFromHost (CopyFromHost runs `cp -fLr SRC DST` in the
    build's current directory): relative sources are read from the current directory,
    globs expanded, quoted names with spaces, DST/ made as a directory, a source copied
    into an existing directory by name (not replacing it), links in SRC followed. A
    source found only next to the definition file still works, with a note."""
    defs, work = bdir / "defs", bdir / "work"
    (work / "srcDir").mkdir(parents=True)
    defs.mkdir()
    for path, text in {
        "srcFile": "file\n",
        "src File": "space\n",
        "srcDir/srcFileNested": "nested\n",
        "both.txt": "from the current directory\n",
    }.items():
        (work / path).write_text(text)
    os.symlink(work / "srcFile", work / "srcFileLinkAbs")
    os.symlink("./srcDir", work / "srcDirLinkRel")
    (defs / "both.txt").write_text("from the definition's directory\n")
    (defs / "onlydef.txt").write_text("only there\n")
    shutil.copy(images["sif"], defs / "base.sif")
    (defs / "x.def").write_text(HOST_FILES.replace("base.sif", str(defs / "base.sif")))
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    r = ok(hpcrun("build", "--sandbox", str(bdir / "box"), str(defs / "x.def"), cwd=str(work), timeout=300))
    assert "onlydef.txt is read from" in r.stderr, r.stderr
    box = bdir / "box"
    expect = {
        "srcFile": "file\n",
        "dstDir/srcFile": "file\n",
        "dstDir/dstFile": "file\n",
        "dstDir/long/path/to/dstFile": "file\n",
        "src File": "space\n",
        "dst File": "file\n",
        "glob/srcFile": "file\n",
        "glob/srcFileNested": "nested\n",
        "srcDir/srcFileNested": "nested\n",
        "srcDirDest/srcFileNested": "nested\n",
        "dstDir/srcDir/srcFileNested": "nested\n",
        "srcFileLinkAbs": "file\n",
        "srcDirLinkRel/srcFileNested": "nested\n",
        "existing/srcFileNested": "nested\n",
        "existing/srcFile": "file\n",
        "both.txt": "from the current directory\n",
        "onlydef.txt": "only there\n",
    }
    assert {p: (box / p).read_text() for p in expect} == expect
    assert not (box / "srcFileLinkAbs").is_symlink() and not (box / "srcDirLinkRel").is_symlink()
    r = hpcrun("build", "--sandbox", str(bdir / "box2"), str(defs / "x.def"), cwd="/", timeout=120)
    one_line_error(r, 252, "%files: srcFile does not exist", "current directory /")
