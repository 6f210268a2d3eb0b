"""hpcrun.envvars: the container environment, env files and the wrapper script."""

import subprocess

import pytest

from hpcrun import envvars
from hpcrun.envvars import build, parse_env_file, parse_env_opts, quote, wrapper_script
from hpcrun.errors import UsageError

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
KEEP = {"TERM", "LANG"}


def make(host_env, cleanenv=False, env_files=(), env_opts=None, extra=None, home="/home/u"):
    return build(
        host_env,
        cleanenv=cleanenv,
        keep=KEEP,
        env_files=list(env_files),
        env_opts=env_opts or {},
        home=home,
        default_path=DEFAULT_PATH,
        extra=extra or {},
    )


def test_host_env_passes_except_own_and_path():
    host = {
        "FOO": "1",
        "TERM": "xterm",
        "PATH": "/host/bin",
        "HOME": "/h",
        "HPCRUN_BIND": "/x",
        "HPCRUN_DEBUG": "1",
        "APPTAINER_BIND": "/y",
        "APPTAINER_CACHEDIR": "/c",
        "APPTAINERENV_BAR": "2",
        "SINGULARITY_BIND": "/z",
        "SINGULARITYENV_BAZ": "3",
        "MY_HPCRUN_X": "kept",
    }
    env, forced = make(host)
    assert env["FOO"] == "1" and env["TERM"] == "xterm" and env["MY_HPCRUN_X"] == "kept"
    for k in (
        "HPCRUN_BIND",
        "HPCRUN_DEBUG",
        "APPTAINER_BIND",
        "APPTAINER_CACHEDIR",
        "APPTAINERENV_BAR",
        "SINGULARITY_BIND",
        "SINGULARITYENV_BAZ",
    ):
        assert k not in env
    assert env["PATH"] == DEFAULT_PATH
    assert env["HOME"] == "/home/u"
    assert env["BAR"] == "2" and env["BAZ"] == "3"
    assert forced == {"BAR": "2", "BAZ": "3"}


def test_host_env_not_modified():
    host = {"A": "1", "HPCRUN_ENV_B": "2"}
    copy = dict(host)
    make(host, env_opts={"C": "3"}, extra={"D": "4"})
    assert host == copy


def test_extra_overrides_host():
    env, _ = make({"HPCRUN_CONTAINER": "/fake", "X": "host"}, extra={"HPCRUN_CONTAINER": "/img", "X": "x"})
    assert env["HPCRUN_CONTAINER"] == "/img" and env["X"] == "x"


def test_force_prefix_precedence():
    host = {
        "SINGULARITYENV_V": "sing",
        "APPTAINERENV_V": "app",
        "HPCRUN_ENV_V": "hpc",
        "SINGULARITYENV_W": "sing",
        "APPTAINERENV_W": "app",
        "SINGULARITYENV_Y": "sing",
        "V": "host",
    }
    env, forced = make(host)
    assert env["V"] == "hpc" and forced["V"] == "hpc"
    assert env["W"] == "app"
    assert env["Y"] == "sing"


def test_force_prefix_invalid_names_ignored():
    env, forced = make({"APPTAINERENV_": "x", "HPCRUN_ENV_1X": "y", "APPTAINERENV_A-B": "z"})
    assert forced == {}
    assert "" not in env and "1X" not in env and "A-B" not in env


def test_env_file_below_env_option_above_prefixes():
    host = {"HPCRUN_ENV_A": "prefix", "HPCRUN_ENV_B": "prefix", "HPCRUN_ENV_C": "prefix"}
    files = [{"A": "file1", "B": "file1"}, {"B": "file2"}]
    env, forced = make(host, env_files=files, env_opts={"A": "opt"})
    assert env["A"] == "opt"  # --env beats the env file
    assert env["B"] == "file2"  # later file beats earlier file and prefixes
    assert env["C"] == "prefix"
    assert forced == {"A": "opt", "B": "file2", "C": "prefix"}


def test_forced_can_set_path_not_home():
    # Apptainer's alwaysOmitKeys (internal/pkg/util/env/create.go): HOME, *_SHELL, *_APPNAME
    # are not permitted through the prefixes; PATH is
    env, forced = make({"APPTAINERENV_PATH": "/only", "HPCRUN_ENV_HOME": "/h2", "APPTAINERENV_APPTAINER_APPNAME": "x"})
    assert env["PATH"] == "/only" and env["HOME"] != "/h2"
    assert "HOME" not in forced and "APPTAINER_APPNAME" not in forced


def test_host_ld_library_path_is_not_passed():
    # env.go TestDefaultLdLibraryPath / TestCustomLdLibraryPath: the libs directory, last
    env, _ = make({"LD_LIBRARY_PATH": "/host/lib", "APPTAINERENV_X": "1"})
    assert env["LD_LIBRARY_PATH"] == "/.singularity.d/libs"
    env, forced = make({"LD_LIBRARY_PATH": "/host/lib", "APPTAINERENV_LD_LIBRARY_PATH": "/mine"})
    assert env["LD_LIBRARY_PATH"] == forced["LD_LIBRARY_PATH"] == "/mine:/.singularity.d/libs"
    _, forced = make({"APPTAINERENV_LD_LIBRARY_PATH": "$HOME/lib"})  # evaluated later: still gets it
    assert forced["LD_LIBRARY_PATH"] == "$HOME/lib:/.singularity.d/libs"


def test_values_to_evaluate_wait_for_the_image_scripts():
    env, forced = make({"APPTAINERENV_PATH": "$PATH:/foo", "APPTAINERENV_A": "$(id -u)", "APPTAINERENV_B": "b"})
    assert env["PATH"] == DEFAULT_PATH and "A" not in env and env["B"] == "b"
    assert forced["PATH"] == "$PATH:/foo"


def test_prepend_append_path():
    env, forced = make({"APPTAINERENV_PREPEND_PATH": "/pre", "HPCRUN_ENV_APPEND_PATH": "/post"})
    assert env["PATH"] == "/pre:" + DEFAULT_PATH + ":/post"
    assert "PREPEND_PATH" not in env and "APPEND_PATH" not in env
    assert forced == {"PREPEND_PATH": "/pre", "APPEND_PATH": "/post"}
    env, _ = make({}, env_opts={"PREPEND_PATH": "/a:/b"})
    assert env["PATH"] == "/a:/b:" + DEFAULT_PATH


def test_cleanenv_keeps_only_keep_list_home_path_extra():
    host = {"TERM": "xterm", "LANG": "C", "FOO": "1", "PATH": "/host", "HOME": "/h", "USER": "u", "HPCRUN_BIND": "/x"}
    env, _ = make(host, cleanenv=True, extra={"HPCRUN_NAME": "img"})
    assert env == {
        "TERM": "xterm",
        "LANG": "C",
        "PATH": DEFAULT_PATH,
        "HOME": "/home/u",
        "HPCRUN_NAME": "img",
        "LD_LIBRARY_PATH": "/.singularity.d/libs",  # as Apptainer's, on every container's
    }


def test_cleanenv_still_applies_forced():
    env, forced = make({"FOO": "1", "APPTAINERENV_BAR": "2"}, cleanenv=True, env_opts={"X": "y"})
    assert "FOO" not in env
    assert env["BAR"] == "2" and env["X"] == "y"


# ---------------------------------------------------------------- env files and --env


def test_parse_env_file():
    text = """
# a comment
   # indented comment
A=1
export B=two words
export   C="quoted # not a comment"
D='single'
E=
F="unbalanced
G=a=b=c
  H = x
"""
    with pytest.raises(UsageError):
        parse_env_file("f", text)  # "H = x": the key has a space
    with pytest.raises(UsageError):
        parse_env_file("f", text.replace("  H = x\n", ""))  # F: a shell syntax error in Apptainer
    out = parse_env_file("f", text.replace("  H = x\n", "").replace('F="unbalanced\n', ""))
    # as Apptainer's shell evaluation: `export B=two words` exports B=two (and `words`)
    assert out == {"A": "1", "B": "two", "C": "quoted # not a comment", "D": "single", "E": "", "G": "a=b=c"}


@pytest.mark.parametrize("line", ["NOEQUALS", "1A=x", "A-B=x", "=x", "export", "a b=c"])
def test_parse_env_file_bad_line_number(line):
    text = "OK=1\n\n# c\n" + line + "\nLATER=2\n"
    with pytest.raises(UsageError) as ei:
        parse_env_file("/p/env.txt", text)
    assert "/p/env.txt" in ei.value.message
    assert "line 4" in ei.value.message


def test_parse_env_file_empty():
    assert parse_env_file("f", "") == {}
    assert parse_env_file("f", "\n# only\n") == {}


def test_parse_env_opts():
    assert parse_env_opts(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ["A", "=1", "9=1", "A B=1"]:
        with pytest.raises(UsageError):
            parse_env_opts([bad])


def test_valid_name():
    assert envvars.valid_name("_a1") and envvars.valid_name("A")
    assert not envvars.valid_name("") and not envvars.valid_name("1a") and not envvars.valid_name("a.b")


# ---------------------------------------------------------------- wrapper script

HOSTILE = 'it\'s $(echo PWNED) `echo PWNED` $HOME "q" \\ ; exit 3\nnew line'


def run_wrapper(forced, *argv, env=None):
    script = wrapper_script(forced)
    return subprocess.run(
        ["/bin/sh", "-c", script, "sh", *argv],
        capture_output=True,
        text=True,
        env=env if env is not None else {"PATH": "/usr/bin:/bin", "HOME": "/h"},
        timeout=20,
    )


def test_quote_roundtrip_through_shell():
    for value in ["", "plain", "it's", "'", "''", HOSTILE, "a\\'b"]:
        r = subprocess.run(["/bin/sh", "-c", f"printf %s {quote(value)}"], capture_output=True, text=True, timeout=20)
        assert r.stdout == value


def test_wrapper_exports_values_literally():
    r = run_wrapper({"V": HOSTILE, "W": "plain"}, "/usr/bin/env")
    assert r.returncode == 0, r.stderr
    assert f"V={HOSTILE}\n" in r.stdout
    assert "W=plain\n" in r.stdout
    assert r.stdout.count("PWNED") == 2  # only the two literal occurrences
    r2 = run_wrapper({"V": HOSTILE}, "/bin/sh", "-c", 'printf %s "$V"')
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == HOSTILE


def test_wrapper_path_prepend_append():
    r = run_wrapper(
        {"PREPEND_PATH": "/p'1", "APPEND_PATH": "/a $x"},
        "/bin/sh",
        "-c",
        'printf %s "$PATH"',
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "/p'1:/usr/bin:/bin:/a $x"


def test_wrapper_execs_args_and_passes_status():
    r = run_wrapper({}, "/bin/sh", "-c", 'echo "$0|$1"; exit 7', "arg 0", "a'b")
    assert r.stdout == "arg 0|a'b\n"
    assert r.returncode == 7


def test_wrapper_order_later_wins():
    r = run_wrapper({"A": "1", "B": "$A"}, "/bin/sh", "-c", 'printf "%s,%s" "$A" "$B"')
    assert r.stdout == "1,$A"


def test_wrapper_sources_env_dir_first():
    script = wrapper_script({"X": "forced"})
    lines = script.splitlines()
    assert envvars.ENV_DIR in lines[0]
    assert lines[1] == "export X='forced'"
    assert lines[-1] == 'exec "$@"'


def test_env_opts_as_apptainers_map_flag():
    assert parse_env_opts(["A=1,B=2", "C=x,y", '"D=1,2",E=3', 'F="q"']) == {
        "A": "1",
        "B": "2",
        "C": "x,y",
        "D": "1,2",
        "E": "3",
        "F": '"q',
    }  # pflag trims the whole argument
    with pytest.raises(UsageError):
        parse_env_opts(['"A=1,B=2'])  # an open CSV quote


def _sh(script, env, *argv):
    return subprocess.run(["/bin/sh", "-c", script, "hpcrun", *argv], env=env, capture_output=True, text=True).stdout


@pytest.mark.parametrize("no_eval", [False, True])
def test_wrapper_evaluates_unless_no_eval(no_eval):
    forced = {"A": "$HOME/x", "B": 'q"uote', "C": "a\\$b", "PREPEND_PATH": "$HOME/bin"}
    env = {"HOME": "/h", "PATH": "$HOME/bin:/usr/bin:/bin"}  # as build() left it: literal prefix
    out = _sh(envvars.wrapper_script(forced, no_eval), env, "sh", "-c", 'echo "$A|$B|$C|$PATH"')
    if no_eval:
        assert out == '$HOME/x|q"uote|a\\$b|$HOME/bin:/usr/bin:/bin\n'
    else:
        assert out == '/h/x|q"uote|a$b|/h/bin:/usr/bin:/bin\n'
    assert envvars.needs_eval(forced, False) and not envvars.needs_eval(forced, True)
    assert not envvars.needs_eval({"A": "plain"}, False)


def test_path_given_wins_over_prepend_and_append():
    host_env = {"APPTAINERENV_PATH": "/only", "APPTAINERENV_PREPEND_PATH": "/pre", "APPTAINERENV_APPEND_PATH": "/app"}
    env, forced = build(
        host_env,
        cleanenv=False,
        keep=set(),
        env_files=[],
        env_opts={},
        home="/h",
        default_path="/usr/bin:/bin",
        extra={},
    )
    assert env["PATH"] == "/only"
    out = _sh(wrapper_script(forced, True), {"PATH": env["PATH"]}, "/bin/sh", "-c", 'echo "$PATH"')
    assert out == "/only\n"


def test_uid_euid_gid_defined_for_evaluation():
    # env.go apptainerEnvEval "env var": APPTAINERENV_WHO=$UID gives the caller's uid, as
    # Apptainer's embedded shell defines UID, EUID and GID; dash and ash don't
    script = envvars.wrapper_script({"WHO": "$UID/$EUID/$GID"}, False, (1234, 99))
    assert _sh(script, {"PATH": "/usr/bin:/bin"}, "sh", "-c", 'echo "$WHO"') == "1234/1234/99\n"
    script = envvars.wrapper_script({"WHO": "$UID"}, True, (1234, 99))
    assert _sh(script, {"PATH": "/usr/bin:/bin"}, "sh", "-c", 'echo "$WHO"') == "$UID\n"
