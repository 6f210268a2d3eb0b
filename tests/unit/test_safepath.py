"""hpcrun.runtime.safepath against hostile symlink trees: nothing may resolve outside the root."""

import os
import uuid

import pytest

from hpcrun.errors import BindError
from hpcrun.runtime import safepath
from hpcrun.runtime.safepath import canonical, make_in_upper, open_in_root


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "etc").mkdir()
    (r / "etc" / "passwd").write_text("inside\n")
    (r / "usr" / "bin").mkdir(parents=True)
    (r / "usr" / "bin" / "tool").write_text("tool\n")
    return r


@pytest.fixture
def fds():
    opened = []
    yield opened
    for fd in opened:
        os.close(fd)


def where(fd):
    return os.readlink(safepath.fd_path(fd))


def resolve(root, path, fds, **kw):
    fd = open_in_root(str(root), path, **kw)
    fds.append(fd)
    real = where(fd)
    base = os.path.realpath(root)
    assert real == base or real.startswith(base + "/"), f"{path} escaped the root: {real}"
    return real


def read(fd):
    with open(safepath.fd_path(fd), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------- open_in_root


def test_plain_paths(root, fds):
    assert resolve(root, "/etc/passwd", fds) == str(root / "etc" / "passwd")
    assert resolve(root, "usr/bin/tool", fds) == str(root / "usr" / "bin" / "tool")
    assert resolve(root, "/", fds) == str(root)
    assert resolve(root, "", fds) == str(root)
    assert resolve(root, "//usr/./bin//", fds) == str(root / "usr" / "bin")


def test_returns_o_path_fd_that_is_not_inheritable(root, fds):
    fd = open_in_root(str(root), "/etc/passwd")
    fds.append(fd)
    assert not os.get_inheritable(fd)
    assert read(fd) == "inside\n"  # through /proc/self/fd, as a mount target would be


@pytest.mark.parametrize("target", ["/", "/etc", "/etc/", "//etc/../etc"])
def test_absolute_symlink_stays_in_root(root, fds, target):
    (root / "hostile").mkdir()
    os.symlink(target, root / "hostile" / "link")
    path = "hostile/link/passwd" if target.rstrip("/").endswith("etc") else "hostile/link/etc/passwd"
    real = resolve(root, path, fds)
    assert real == str(root / "etc" / "passwd")
    assert read(fds[-1]) == "inside\n"
    assert not real.startswith("/etc")


def test_etc_symlink_to_host_etc(root, fds):
    # the image's /etc itself is a symlink to /etc: must mean the image's own
    os.rename(root / "etc", root / "real-etc")
    (root / "private").mkdir()
    os.rename(root / "real-etc", root / "private" / "etc")
    os.symlink("/private/etc", root / "etc")
    assert resolve(root, "/etc/passwd", fds) == str(root / "private" / "etc" / "passwd")
    os.unlink(root / "etc")
    os.symlink("/etc", root / "etc")  # a loop onto itself, never the host's /etc
    with pytest.raises(BindError):
        open_in_root(str(root), "/etc/passwd")


def test_dotdot_escapes_clamp_at_root(root, fds):
    os.symlink("../../../../", root / "usr" / "bin" / "up")
    assert resolve(root, "usr/bin/up", fds) == str(root)
    assert resolve(root, "usr/bin/up/etc/passwd", fds) == str(root / "etc" / "passwd")
    assert resolve(root, "../../../etc/passwd", fds) == str(root / "etc" / "passwd")
    assert resolve(root, "/usr/../../..", fds) == str(root)


def test_relative_symlink_resolved_from_its_directory(root, fds):
    os.symlink("../bin/tool", root / "usr" / "bin" / "rel")
    os.symlink("bin", root / "usr" / "sbin")
    assert resolve(root, "usr/bin/rel", fds) == str(root / "usr" / "bin" / "tool")
    assert resolve(root, "usr/sbin/tool", fds) == str(root / "usr" / "bin" / "tool")


def test_symlink_chain(root, fds):
    os.symlink("/b", root / "a")
    os.symlink("c/../d", root / "b")
    (root / "c").mkdir()
    os.symlink("/usr/../etc", root / "d")
    assert resolve(root, "a/passwd", fds) == str(root / "etc" / "passwd")
    ok = [f"l{i}" for i in range(safepath.MAXLINKS)]
    for a, b in zip(ok, ok[1:] + ["etc"]):
        os.symlink(b, root / a)
    assert resolve(root, "l0/passwd", fds) == str(root / "etc" / "passwd")


@pytest.mark.parametrize(
    "links", [[("x", "x")], [("x", "y"), ("y", "x")], [("x", "/x")], [("x", "../x/sub")], [("x", "y/z"), ("y", "/x")]]
)
def test_symlink_loops(root, links):
    for name, target in links:
        os.symlink(target, root / name)
    with pytest.raises(BindError) as ei:
        open_in_root(str(root), "x/anything")
    assert "too many levels" in ei.value.message
    with pytest.raises(BindError):
        canonical(str(root), "x/anything")


def test_too_long_chain_is_an_error(root):
    chain = [f"m{i}" for i in range(safepath.MAXLINKS + 1)]
    for a, b in zip(chain, chain[1:] + ["etc"]):
        os.symlink(b, root / a)
    with pytest.raises(BindError):
        open_in_root(str(root), "m0")


def test_missing_without_create(root):
    with pytest.raises(FileNotFoundError):
        open_in_root(str(root), "nope/deeper")
    os.symlink("/nowhere", root / "dangling")
    with pytest.raises(FileNotFoundError):
        open_in_root(str(root), "dangling")


def test_file_used_as_directory(root):
    with pytest.raises(NotADirectoryError):
        open_in_root(str(root), "etc/passwd/x")
    with pytest.raises(NotADirectoryError):
        open_in_root(str(root), "etc/passwd/x", create="dir")
    os.symlink("/etc/passwd", root / "plink")
    with pytest.raises(NotADirectoryError):
        open_in_root(str(root), "plink/x")
    assert not os.path.exists(root / "etc" / "passwd.x")


def test_create_dir_and_file(root, fds):
    assert resolve(root, "new/a/b", fds, create="dir") == str(root / "new" / "a" / "b")
    assert (root / "new" / "a" / "b").is_dir()
    assert resolve(root, "/other/f.conf", fds, create="file") == str(root / "other" / "f.conf")
    assert (root / "other").is_dir() and (root / "other" / "f.conf").is_file()
    # existing objects are opened, not recreated
    (root / "etc" / "passwd").write_text("kept\n")
    resolve(root, "etc/passwd", fds, create="file")
    assert (root / "etc" / "passwd").read_text() == "kept\n"


@pytest.fixture
def host_name():
    """A name that must never appear at the host's / (checked and cleaned up)."""
    name = f"hpcrun-unit-{uuid.uuid4().hex}"
    yield name
    escaped = os.path.join("/", name)
    leaked = os.path.lexists(escaped)
    if leaked:
        import shutil

        shutil.rmtree(escaped, ignore_errors=True)
        if os.path.lexists(escaped):
            os.unlink(escaped)
    assert not leaked, f"safepath created {escaped} on the host"


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_create_through_absolute_symlink_stays_inside(root, fds, host_name, kind):
    os.symlink(f"/{host_name}/deep", root / "mnt")
    real = resolve(root, "mnt/point", fds, create=kind)
    assert real == str(root / host_name / "deep" / "point")
    made = root / host_name / "deep" / "point"
    assert made.is_dir() if kind == "dir" else made.is_file()


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_create_dangling_symlink_target_inside(root, fds, host_name, kind):
    os.symlink(f"/{host_name}", root / "dangling")
    real = resolve(root, "dangling", fds, create=kind)
    assert real == str(root / host_name)


def test_create_through_dotdot_symlink_stays_inside(root, fds, tmp_path):
    os.symlink("../../../../../outside", root / "up")
    resolve(root, "up/x", fds, create="dir")
    assert (root / "outside" / "x").is_dir()
    assert not (tmp_path / "outside").exists()


# ---------------------------------------------------------------- canonical


def test_canonical_existing(root):
    assert canonical(str(root), "/etc/passwd") == (["etc", "passwd"], True)
    assert canonical(str(root), "/") == ([], True)
    assert canonical(str(root), "usr/./bin/../bin/tool") == (["usr", "bin", "tool"], True)


def test_canonical_missing_tail_taken_literally(root):
    assert canonical(str(root), "/etc/new/dir") == (["etc", "new", "dir"], False)
    assert canonical(str(root), "/opt") == (["opt"], False)
    assert canonical(str(root), "/etc/new/../other") == (["etc", "other"], False)


def test_canonical_follows_symlinks_inside(root):
    os.symlink("/", root / "etc" / "rootlink")
    os.symlink("../../../..", root / "usr" / "bin" / "up")
    os.symlink("/usr/bin", root / "bin")
    assert canonical(str(root), "/etc/rootlink/etc/passwd") == (["etc", "passwd"], True)
    assert canonical(str(root), "/usr/bin/up/usr") == (["usr"], True)
    assert canonical(str(root), "/bin/tool") == (["usr", "bin", "tool"], True)
    assert canonical(str(root), "/bin/missing/x") == (["usr", "bin", "missing", "x"], False)


def test_canonical_of_symlink_to_host_path(root):
    # the image's /etc/resolv.conf points at a file it lacks: the mount point is made
    # where the link leads inside the image, never on the host
    os.symlink("/run/resolvconf/resolv.conf", root / "etc" / "resolv.conf")
    assert canonical(str(root), "/etc/resolv.conf") == (["run", "resolvconf", "resolv.conf"], False)
    os.symlink("/etc/self", root / "etc" / "self")
    with pytest.raises(BindError):
        canonical(str(root), "/etc/self")
    os.symlink("/run/systemd/resolve/stub", root / "etc" / "r2")
    assert canonical(str(root), "/etc/r2") == (["run", "systemd", "resolve", "stub"], False)


def test_canonical_file_as_directory(root):
    with pytest.raises(NotADirectoryError):
        canonical(str(root), "/etc/passwd/x")


def test_canonical_dotdot_out_of_missing_tail(root):
    # "a/missing/../../b" is "b": the second ".." leaves the missing tail and must go
    # up from "etc" exactly as it does when the intermediate directory exists
    (root / "etc" / "present").mkdir()
    assert canonical(str(root), "/etc/present/../../usr") == (["usr"], True)
    assert canonical(str(root), "/etc/missing/../../opt") == (["opt"], False)


# ---------------------------------------------------------------- make_in_upper


def test_make_in_upper_dirs_and_file(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    make_in_upper(str(upper), ["a", "b", "c"], "dir")
    assert (upper / "a" / "b" / "c").is_dir()
    make_in_upper(str(upper), ["a", "x", "f.txt"], "file")
    assert (upper / "a" / "x").is_dir()
    assert (upper / "a" / "x" / "f.txt").is_file()
    assert (upper / "a" / "x" / "f.txt").stat().st_size == 0


def test_make_in_upper_is_idempotent_and_keeps_content(tmp_path):
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "passwd").write_text("data\n")
    make_in_upper(str(upper), ["etc", "passwd"], "file")
    make_in_upper(str(upper), ["etc"], "dir")
    assert (upper / "etc" / "passwd").read_text() == "data\n"
    make_in_upper(str(upper), [], "dir")  # the root itself: nothing to do


def test_make_in_upper_never_follows_symlinks(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), upper / "evil")
    with pytest.raises(OSError):
        make_in_upper(str(upper), ["evil", "x"], "dir")
    os.symlink(str(outside / "f"), upper / "evilfile")
    with pytest.raises(OSError):
        make_in_upper(str(upper), ["evilfile"], "file")
    assert list(outside.iterdir()) == []


def test_canonical_then_make_in_upper(root, tmp_path):
    os.symlink("/srv/data", root / "data")
    comps, exists = canonical(str(root), "/data/mnt")
    assert (comps, exists) == (["srv", "data", "mnt"], False)
    upper = tmp_path / "upper"
    upper.mkdir()
    make_in_upper(str(upper), comps, "dir")
    assert (upper / "srv" / "data" / "mnt").is_dir()


def test_components():
    assert safepath.components("/a//b/./c/") == ["a", "b", "c"]
    assert safepath.components("../x") == ["..", "x"]
    assert safepath.components("") == []


def test_fd_path():
    assert safepath.fd_path(7) == "/proc/self/fd/7"
    assert safepath.fd_path(7, "/old/proc") == "/old/proc/self/fd/7"


def test_tests_use_the_working_tree():
    tree = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    assert safepath.__file__.startswith(os.path.join(tree, "hpcrun") + os.sep)
