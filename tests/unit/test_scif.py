"""SCIF apps: parsing, the layout of internal/pkg/build/apps/apps.go (Apptainer's
pkg/build/types/parser deffile_test.go app sections, e2e/internal/e2e/imageverify.go's
app checks), the runtime's choice of script and environment (e2e/actions/actions.go
ScifTestAppGood/Bad), and inspect's apps (e2e/inspect/inspect.go "list apps")."""

import json
import os
import subprocess

import pytest

from hpcrun import envvars, inroot, options
from hpcrun.builders import deffile, scif
from hpcrun.errors import ImageError, UsageError
from hpcrun.images import inspect as insp
from hpcrun.runtime import launcher

DEF = """Bootstrap: scratch
%post
    echo post
%apprun foo
    echo foo $*
%appinstall bar
    echo installing bar
%appinstall foo
    echo installing foo
%appenv foo
    export FOO=1
%applabels foo
    A b c
    # a comment
%apphelp foo
    Help.
%apptest foo
    echo test
%appstart foo
    echo start
"""


def test_parse_keeps_apps_in_order_and_installs_after_post():
    d = deffile.parse(DEF, "/defs/x.def")
    found = scif.apps(d)
    assert list(found) == ["foo", "bar"]  # first appearance, as Apptainer's AppOrder
    assert found["foo"]["apprun"].strip() == "echo foo $*"
    post = d.sections["post"]
    assert post.index("echo post") < post.index("installing foo") < post.index("installing bar")
    assert ". /scif/apps/foo/scif/env/01-base.sh\n\ncd /scif/apps/foo\n" in post
    assert d.appdir == "/defs"


def test_no_apps_changes_nothing():
    d = deffile.parse("Bootstrap: scratch\n%runscript\n  echo hi\n", "x.def")
    assert scif.apps(d) == {} and "post" not in d.sections


@pytest.mark.parametrize("line", ["%apprun", "%apprun ../x", "%appenv .hidden", "%applabels a/b", "%appinstall $(id)"])
def test_bad_app_names_are_refused(line):
    with pytest.raises(UsageError) as e:
        deffile.parse(f"Bootstrap: scratch\n{line}\n  true\n", "x.def")
    assert "app name" in e.value.message


def _build(tmp_path, text=DEF, planted=None):
    tree = tmp_path / "tree"
    tree.mkdir()
    if planted:
        os.symlink(planted, tree / "scif")
    d = deffile.parse(text, str(tmp_path / "x.def"))
    with inroot.Root(str(tree)) as root:
        scif.write(d, root)
    return tree


def test_layout_as_apps_go(tmp_path):
    tree = _build(tmp_path)
    foo = tree / "scif/apps/foo"
    for sub in ("bin", "lib", "scif/env"):
        assert (foo / sub).is_dir()
    for sub in ("scif/data/foo/input", "scif/data/foo/output", "scif/data/bar/input"):
        assert (tree / sub).is_dir()
    assert (foo / "scif/runscript").read_text() == "#!/bin/sh\n\n    echo foo $*\n"
    assert os.access(foo / "scif/runscript", os.X_OK) and os.access(foo / "scif/test", os.X_OK)
    assert (foo / "scif/startscript").read_text().startswith("#!/bin/sh\n\n")
    assert (foo / "scif/runscript.help").read_text().strip() == "Help."
    assert (foo / "scif/env/90-environment.sh").read_text().strip() == "export FOO=1"
    assert json.loads((foo / "scif/labels.json").read_text()) == {"SCIF_APP_NAME": "foo", "A": "b c"}
    base = (foo / "scif/env/01-base.sh").read_text()
    assert "SCIF_APPNAME=foo\n" in base and 'SCIF_APPOUTPUT="/scif/data/foo/output"' in base
    assert not (tree / "scif/apps/bar/scif/runscript").exists()  # bar has no %apprun
    glob = (tree / ".singularity.d/env/94-appsbase.sh").read_text()
    assert "SCIF_APPBIN_foo=/scif/apps/foo/bin\n" in glob and 'SCIF_APPRUN_foo="/scif/apps/foo/scif/runscript"' in glob
    assert "SCIF_APPRUN_bar" not in glob and 'SCIF_APPLABELS_bar="/scif/apps/bar/scif/labels.json"' in glob
    assert "SCIF_APPENV_foo" in glob and "SCIF_APPSTART_foo" in glob


def test_global_names_replace_odd_characters(tmp_path):
    tree = _build(tmp_path, "Bootstrap: scratch\n%apprun my-app.1\n  true\n")
    glob = (tree / ".singularity.d/env/94-appsbase.sh").read_text()
    assert "SCIF_APPROOT_my_app_1=/scif/apps/my-app.1\n" in glob


def test_appfiles(tmp_path):
    (tmp_path / "data.txt").write_text("d\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/f").write_text("f\n")
    text = "Bootstrap: scratch\n%appfiles foo\n  data.txt\n  data.txt /opt/renamed\n  dir\n  data.txt bin # into bin\n"
    tree = _build(tmp_path, text)
    foo = tree / "scif/apps/foo"
    assert (foo / "data.txt").read_text() == "d\n"
    assert (foo / "opt/renamed").read_text() == "d\n"  # an absolute DST is under the app's root
    assert (foo / "dir/f").read_text() == "f\n"
    assert (foo / "bin/data.txt").read_text() == "d\n"  # into an existing directory, as cp
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ImageError, match="nope does not exist"):
        _build(other, "Bootstrap: scratch\n%appfiles a\n  nope\n")


def test_planted_scif_link_stays_inside(tmp_path):
    """A base image whose /scif is a link to / or to a host path: written inside the tree."""
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = _build(tmp_path, planted=str(outside))
    assert os.listdir(outside) == []
    assert (tree / str(outside).lstrip("/") / "apps/foo/scif/runscript").is_file()


class _Plan:
    def __init__(self, action, app, args=()):
        self.action, self.app, self.args, self.image = action, app, list(args), "/img.sif"
        self.forced, self.no_eval, self.uid, self.gid = {}, False, 1000, 1000
        self.lib_dirs, self.mounts = ("/.singularity.d/libs",), []


def _fs(paths):
    return (lambda p: p in paths), (lambda p, mode: p in paths)


def test_resolve_argv_app_scripts():
    """actions.go ScifTestAppGood: run/test --app use the app's scripts, through the
    environment wrapper; exec keeps the command."""
    exists, access = _fs({"/scif/apps/foo/scif", "/scif/apps/foo/scif/runscript", "/scif/apps/foo/scif/test"})
    argv = launcher.resolve_argv(_Plan("run", "foo", ["a"]), exists, access)
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3:] == ["hpcrun", "/scif/apps/foo/scif/runscript", "a"]
    assert launcher.resolve_argv(_Plan("test", "foo"), exists, access)[-1] == "/scif/apps/foo/scif/test"
    assert launcher.resolve_argv(_Plan("exec", "foo", ["ls"]), exists, access)[-1] == "ls"


def test_resolve_argv_unknown_app():
    """actions.go ScifTestAppBad: one line (ImageError, 252)."""
    exists, access = _fs({"/scif/apps/bar/scif"})
    for action in ("run", "exec", "shell", "test"):
        with pytest.raises(ImageError, match="no app 'foo'"):
            launcher.resolve_argv(_Plan(action, "foo", ["x"]), exists, access)
    with pytest.raises(ImageError, match="has no runscript"):
        launcher.resolve_argv(_Plan("run", "bar"), exists, access)


def test_app_wrapper_order(tmp_path):
    """The app's environment after the image's scripts, before forced values; bin and lib
    first in PATH and LD_LIBRARY_PATH (Apptainer's 95-apps.sh)."""
    script = envvars.wrapper_script({"FORCED": "f"}, True, app="foo")
    assert script.index(envvars.ENV_DIR) < script.index("/scif/env/01-base.sh")
    assert script.index("90-environment.sh") < script.index("export FORCED=")
    out = subprocess.run(
        ["/bin/sh", "-c", envvars.app_script("foo") + '\necho "$PATH|${LD_LIBRARY_PATH-unset}|$SCIF_APPROOT"'],
        env={"PATH": "/bin"},
        capture_output=True,
        text=True,
    ).stdout
    assert out == "/scif/apps/foo:/bin|unset|/scif/apps/foo\n"  # no bin/lib here: not added


def test_plan_app_name():
    from hpcrun.plan import scif_app

    assert scif_app(None) is None and scif_app("foo") == "foo"
    for bad in ("../x", "a/b", ".x", "a b", "$(id)"):
        with pytest.raises(UsageError):
            scif_app(bad)


def test_app_option_is_implemented():
    for cmd in options.ACTIONS + ("instance start",):
        rows = [o for o in options.for_command(cmd) if "--app" in o[0]]
        assert len(rows) == 1 and rows[0][6] == "", cmd
    assert all(o[6] == "" for o in options.tables()["inspect"] if o[1] in ("app", "list_apps"))


class _Reader:
    def __init__(self, files):
        self.files = files

    def read(self, path, strict=False):
        return self.files.get(path)

    def listdir(self, path):
        pre = path.rstrip("/") + "/"
        return sorted({p[len(pre) :].split("/")[0] for p in self.files if p.startswith(pre)})


def test_inspect_lists_only_plain_apps():
    """inspect.go "list apps": /scif/apps/NAME with a scif/ directory; odd names (image
    content) are not printed."""
    files = {
        "/scif/apps/hello/scif/labels.json": "{}",
        "/scif/apps/world/scif/runscript": "#!/bin/sh\n",
        "/scif/apps/nometa/bin/x": "",
        "/scif/apps/bad\nname/scif/labels.json": "{}",
    }
    assert insp.list_apps(_Reader(files)) == ["hello", "world"]
    meta = {"labels": {}, "apps": {"world": {"runscript": "#!/bin/sh", "labels": {}}, "hello": {}}}
    out = json.loads(insp.render_json(meta, ["runscript"]))
    assert out == {
        "data": {"attributes": {"apps": {"hello": {}, "world": {"runscript": "#!/bin/sh"}}}},
        "type": "container",
    }
