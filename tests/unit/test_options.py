"""hpcrun.options.fast_parse: the click-free parser of exec/run/shell arguments."""

import pytest

from hpcrun import options
from hpcrun.options import NeedClick, defaults, fast_parse


def test_defaults_shape():
    d = defaults()
    assert d["bind"] == [] and d["env"] == [] and d["no_mount"] == [] and d["env_file"] == []
    assert d["contain"] is False and d["fakeroot"] is False
    assert d["home"] is None and d["pwd"] is None and d["hostname"] is None
    # every option has a default, and lists are fresh objects each time
    assert set(d) == {o[1] for o in options.OPTIONS}
    d["bind"].append("x")
    assert defaults()["bind"] == []


def test_image_only():
    opts, image, args = fast_parse(["img.sif"])
    assert image == "img.sif" and args == []
    assert opts == defaults()


def test_command_after_image_belongs_to_command():
    opts, image, args = fast_parse(["img", "ls", "-la"])
    assert image == "img"
    assert args == ["ls", "-la"]
    assert opts == defaults()


def test_flags_after_image_are_not_parsed():
    opts, image, args = fast_parse(["-c", "img", "-B", "/x", "--contain", "--help"])
    assert image == "img"
    assert args == ["-B", "/x", "--contain", "--help"]
    assert opts["contain"] is True
    assert opts["bind"] == []


def test_long_flags():
    opts, image, args = fast_parse(
        ["--contain", "--fakeroot", "--no-home", "--writable-tmpfs", "--pid", "--net", "--dry-run", "img", "true"]
    )
    assert all(opts[k] for k in ("contain", "fakeroot", "no_home", "writable_tmpfs", "pid", "net", "dry_run"))
    assert opts["cleanenv"] is False and opts["ipc"] is False
    assert (image, args) == ("img", ["true"])


@pytest.mark.parametrize(
    "argv", [["-B", "/a:/b", "img"], ["--bind", "/a:/b", "img"], ["--bind=/a:/b", "img"], ["-B/a:/b", "img"]]
)
def test_value_forms(argv):
    opts, image, args = fast_parse(argv)
    assert opts["bind"] == ["/a:/b"]
    assert image == "img" and args == []


def test_value_with_equals_inside():
    opts, _, _ = fast_parse(["--env=A=B=C", "--env", "X=1", "img"])
    assert opts["env"] == ["A=B=C", "X=1"]


def test_empty_value_with_equals():
    opts, _, _ = fast_parse(["--pwd=", "img"])
    assert opts["pwd"] == ""


def test_single_value_options():
    opts, image, _ = fast_parse(["-H", "/h:/home/x", "--pwd", "/w", "--hostname=node", "img"])
    assert opts["home"] == "/h:/home/x"
    assert opts["pwd"] == "/w"
    assert opts["hostname"] == "node"
    assert image == "img"


def test_value_option_last_one_wins():
    opts, _, _ = fast_parse(["--pwd", "/a", "--pwd=/b", "img"])
    assert opts["pwd"] == "/b"


def test_repeatable_multi_keeps_order():
    opts, _, _ = fast_parse(
        ["-B", "/1", "--bind=/2", "-B/3", "--bind", "/4,/5", "--no-mount", "home", "--no-mount=tmp", "img"]
    )
    assert opts["bind"] == ["/1", "/2", "/3", "/4,/5"]
    assert opts["no_mount"] == ["home", "tmp"]


def test_combined_short_flags():
    opts, image, args = fast_parse(["-ce", "img", "cmd"])
    assert opts["contain"] is True and opts["cleanenv"] is True
    assert opts["containall"] is False
    assert (image, args) == ("img", ["cmd"])
    opts, _, _ = fast_parse(["-Cqv", "img"])
    assert opts["containall"] and opts["quiet"] and opts["verbose"]


def test_combined_short_flags_ending_with_value_option():
    opts, image, args = fast_parse(["-cB", "/a", "img", "x"])
    assert opts["contain"] is True
    assert opts["bind"] == ["/a"]
    assert (image, args) == ("img", ["x"])


def test_double_dash_terminator():
    opts, image, args = fast_parse(["-c", "--", "-weird-image", "--contain"])
    assert opts["contain"] is True
    assert image == "-weird-image"
    assert args == ["--contain"]


def test_single_dash_is_an_image_name():
    _, image, args = fast_parse(["-", "x"])
    assert (image, args) == ("-", ["x"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help", "img"],
        ["-h", "img"],
        ["--unknown", "img"],
        ["-x", "img"],
        ["-cx", "img"],
        ["--contain=yes", "img"],  # a flag given a value
        ["--bind"],  # value missing at the end
        ["-B"],
        ["-eB"],  # value option last in a group, nothing after it
        ["-cBe", "img"],  # value option not last in a group
    ],
)
def test_needclick(argv):
    with pytest.raises(NeedClick):
        fast_parse(argv)


def test_needclick_names_the_flag():
    with pytest.raises(NeedClick) as ei:
        fast_parse(["--frobnicate", "img"])
    assert ei.value.args == ("--frobnicate",)


@pytest.mark.parametrize("argv", [[], ["-c"], ["--bind", "/a"], ["-c", "--"], ["--"]])
def test_missing_image_needs_click(argv):
    with pytest.raises(NeedClick) as ei:
        fast_parse(argv)
    assert ei.value.args == ("IMAGE",)


def test_by_flag_table_consistent():
    for flags, dest, kind, _metavar, _help, _env, status, cmds in options.OPTIONS:
        assert kind in ("flag", "value", "multi")
        assert flags[-1].startswith("--") and status.partition(":")[0] in ("", "noop", "refused")
        for cmd in options.ACTIONS:
            for flag in flags:
                assert (options.BY_CMD[cmd][flag][1] == dest) if cmd in cmds else flag not in options.BY_CMD[cmd]
                assert flag.startswith("--") or len(flag) == 2
