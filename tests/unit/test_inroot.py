"""The in-root file API against hostile trees: every link an image can plant (absolute,
relative with many `..`, chains, links replacing directories) must keep each operation
inside the root; a canary outside must stay byte-for-byte and mode-for-mode as it was.
Run with the kernel's openat2 and with the component-walk fallback."""

import io
import os
import stat
import tarfile

import pytest

from hpcrun import inroot, trees
from hpcrun.builders import layers
from hpcrun.errors import ImageError


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    if request.param == "walk":
        monkeypatch.setattr(inroot, "_openat2_works", False)
    elif not inroot.have_openat2():
        pytest.fail("this kernel has no openat2 (Linux >= 5.6 expected on the test machines)")
    return request.param


@pytest.fixture
def tree(tmp_path, resolver):
    """root/ with links at the canary/ beside it, in every form an image can make them."""
    root, canary = tmp_path / "root", tmp_path / "canary"
    root.mkdir()
    (canary / "dir").mkdir(parents=True)
    (canary / "file").write_text("secret\n")
    os.chmod(canary / "file", 0o600)
    os.chmod(canary / "dir", 0o700)
    os.symlink(str(canary), root / "abs")
    os.symlink("../" * 12 + str(canary).lstrip("/"), root / "rel")
    os.symlink(str(canary / "file"), root / "filelink")
    os.symlink(".", root / "p")  # p -> . : p/p/p/... stays at the root
    os.symlink("p/" * 30 + "../" * 5 + str(canary).lstrip("/"), root / "chain")
    return root, canary


def snapshot(top):
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, data)
    return out


LINKS = ["abs", "rel", "chain", "p/p/p/abs"]


@pytest.mark.parametrize("link", LINKS)
def test_writes_through_links_stay_inside(tree, link):
    root, canary = tree
    before = snapshot(canary)
    with inroot.Root(str(root)) as r:
        r.write(f"{link}/new", "x")
        r.write(f"{link}/file", "overwritten")
        with r.create(f"{link}/created") as f:
            f.write(b"y")
        os.close(r.makedirs(f"{link}/a/b"))
        os.close(r.mkdir(f"{link}/dir", 0o777))
        r.symlink("/etc/shadow", f"{link}/sym")
        r.set_attrs(f"{link}/file", mode=0o6777)
        r.set_attrs(f"{link}/dir", mode=0o6777)
        r.copy_in(os.path.dirname(__file__), f"{link}/copied")
        r.remove(f"{link}/dir")
        r.empty(link)
    assert snapshot(canary) == before
    # what was written landed where the container would see it: inside, under the canary's path
    inside = root / str(canary).lstrip("/")
    assert inside.is_dir() and not (inside / "new").exists()  # emptied by the last call


def test_last_component_is_replaced_not_followed(tree):
    root, canary = tree
    before = snapshot(canary)
    with inroot.Root(str(root)) as r:
        r.set_attrs("filelink", mode=0o6777, mtime=0)  # a link's target keeps its mode
        r.write("filelink", "mine", 0o755)
        assert os.path.isfile(root / "filelink") and not os.path.islink(root / "filelink")
        r.remove("abs")  # the link goes, not the canary
        assert not os.path.lexists(root / "abs")
    assert snapshot(canary) == before


def test_hard_links_join_names_inside_only(tree):
    root, canary = tree
    before = snapshot(canary)
    with inroot.Root(str(root)) as r:
        r.hardlink("filelink", "hl")  # links the link itself
        assert os.path.islink(root / "hl") and os.lstat(root / "hl").st_ino == os.lstat(root / "filelink").st_ino
        with pytest.raises(FileNotFoundError):
            r.hardlink("abs/file", "hl2")  # abs/file is /root/<canary>/file: absent
        os.close(r.mkdir("realdir", 0o755))
        with pytest.raises(OSError):
            r.hardlink("realdir", "hl3")  # never a directory
        r.write("hl", "x")  # writing hl replaces that name only
        assert os.path.islink(root / "filelink")
    assert snapshot(canary) == before


def test_reads_resolve_inside_and_refuse_fifos_and_giants(tree):
    root, canary = tree
    os.mkfifo(root / "fifo")
    (root / "big").write_bytes(b"x" * 2048)
    with inroot.Root(str(root)) as r:
        assert r.read("filelink", 100, "t") is None  # /canary/file inside the root: absent
        with pytest.raises(OSError):
            r.open_read("fifo")  # never blocks
        with pytest.raises(ImageError, match="larger than"):
            r.read("big", 1024, "t")
        assert r.lstat("abs") is not None and stat.S_ISLNK(r.lstat("abs").st_mode)


def test_dangling_link_parent_is_made_inside(tree):
    root, canary = tree
    os.symlink("/nonexistent/deep", root / "dangling")
    with inroot.Root(str(root)) as r:
        r.write("dangling/f", "x")
    assert (root / "nonexistent/deep/f").read_text() == "x"
    assert not os.path.exists("/nonexistent")


def test_remove_and_make_removable_never_follow(tmp_path, resolver):
    top, canary = tmp_path / "top", tmp_path / "canary"
    (top / "a/b").mkdir(parents=True)
    canary.mkdir()
    (canary / "keep").write_text("k")
    os.chmod(canary, 0o500)
    os.symlink(str(canary), top / "a/link")
    os.chmod(top / "a/b", 0)
    os.chmod(top / "a", 0o500)
    before = snapshot(canary)
    trees.make_removable(str(top))
    trees.remove(str(top))
    assert not os.path.lexists(top)
    assert snapshot(canary) == before and stat.S_IMODE(os.stat(canary).st_mode) == 0o500


def _tar(members):
    """members: (TarInfo kwargs dict, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kw, data in members:
            ti = tarfile.TarInfo(kw.pop("name"))
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf)


def test_layer_dir_replaced_by_link_keeps_final_chmod_inside(tree):
    """A directory that a later member replaces by a link to a host file: the final mode
    pass must not chmod the link's target."""
    root, canary = tree
    before = snapshot(canary)
    tar = _tar(
        [
            ({"name": "d", "type": tarfile.DIRTYPE, "mode": 0o6777}, None),
            ({"name": "d", "type": tarfile.SYMTYPE, "linkname": str(canary / "file")}, None),
            ({"name": "e", "type": tarfile.DIRTYPE, "mode": 0o6777}, None),
            ({"name": "e", "type": tarfile.SYMTYPE, "linkname": str(canary / "dir")}, None),
            ({"name": "chain/x", "mode": 0o644}, b"payload"),
        ]
    )
    with inroot.Root(str(root)) as r:
        layers.apply(tar, r, "t", [], owners=os.getuid() == 0)
    assert snapshot(canary) == before
    assert os.readlink(root / "d") == str(canary / "file")


@pytest.mark.parametrize("name", [".wh..", ".wh...", "sub/.wh...", ".wh..wh.x"])
def test_layer_whiteouts_of_dot_and_dotdot_are_refused(tree, name):
    root, canary = tree
    (root / "sub").mkdir()
    before = snapshot(canary)
    with inroot.Root(str(root)) as r, pytest.raises(ImageError, match="invalid whiteout"):
        layers.apply(_tar([({"name": name}, b"")]), r, "t", [])
    assert snapshot(canary) == before and (root / "sub").is_dir()


def test_opaque_whiteout_through_a_link_empties_inside_only(tree):
    root, canary = tree
    inside = root / str(canary).lstrip("/")
    inside.mkdir(parents=True)
    (inside / "lower").write_text("from a lower layer")
    before = snapshot(canary)
    with inroot.Root(str(root)) as r:
        layers.apply(_tar([({"name": "abs/.wh..wh..opq"}, b"")]), r, "t", [])
    assert snapshot(canary) == before and os.listdir(inside) == []


def test_members_escaping_with_dotdot_are_refused(tree):
    root, canary = tree
    with inroot.Root(str(root)) as r, pytest.raises(ImageError, match="outside the image"):
        layers.apply(_tar([({"name": "../../x"}, b"x")]), r, "t", [])


@pytest.mark.parametrize("link", LINKS)
def test_copy_from_another_tree_resolves_in_each_root(tree, tmp_path, link):
    """Root.copy_from (build %files from STAGE): the source resolved inside its own tree
    (a link at the canary reads the stage's own file there), the destination inside this
    one; links inside a copied directory stay links; the canary never changes."""
    root, canary = tree
    stage = tmp_path / "stage"
    own = stage / str(canary).lstrip("/")
    own.mkdir(parents=True)
    (own / "file").write_text("the stage's own\n")
    for name in ("abs", "rel", "chain", "p"):
        os.symlink(os.readlink(root / name), stage / name)
    os.makedirs(stage / "d")
    os.symlink(str(canary / "file"), stage / "d" / "esc")
    before = snapshot(canary)
    with inroot.Root(str(stage)) as src, inroot.Root(str(root)) as dst:
        dst.copy_from(src, f"{link}/file", f"{link}/copied")
        dst.copy_from(src, "d", "/d")
        with pytest.raises(FileNotFoundError):
            dst.copy_from(src, f"{link}/missing", "/m")
    assert snapshot(canary) == before
    inside = root / str(canary).lstrip("/")
    assert (inside / "copied").read_text() == "the stage's own\n"
    assert os.readlink(root / "d" / "esc") == str(canary / "file")
