"""Apptainer's own environment tables, ported: e2e/env/env.go and e2e/env/regressions.go
(apptainer/apptainer). Each case keeps the name of Apptainer's subtest; the images stand
in for Apptainer's: BusyboxSIF (the default image) and e2e/testdata/Apptainer (the custom
image, whose %environment extends PATH and sets CGO_ENABLED)."""

import os
import shutil
import subprocess

import pytest
from hpcrun_testlib import WORK, build_def_image, hpcrun, user

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CUSTOM_PATH = DEFAULT_PATH + ":/go/bin:/usr/local/go/bin"
LIBS = "/.singularity.d/libs"

# e2e/testdata/Apptainer's %environment, on our busybox base
CUSTOM_DEF = """Bootstrap: localimage
From: base.sif

%environment
    GOPATH=/go
    PATH=$PATH:$GOPATH/bin:/usr/local/go/bin
    CGO_ENABLED=0
    AVENGERS=assemble
    export GOPATH PATH CGO_ENABLED AVENGERS
"""


@pytest.fixture(scope="module")
def debian(images):
    """Apptainer's Debian image, for the LD_LIBRARY_PATH rows: glibc's ldconfig (static,
    the host's) and an ld.so.conf, on our busybox tree. -> (image, its default library
    path: what its ldconfig lists, as Apptainer's action script reads it)."""
    root = os.path.join(WORK, "e2e-debian")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(images["sandbox"], root, symlinks=True)
    os.makedirs(os.path.join(root, "sbin"), exist_ok=True)
    shutil.copy("/sbin/ldconfig", os.path.join(root, "sbin/ldconfig"))
    for d in ("usr/local/lib", "lib/x86_64-linux-gnu"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with open(os.path.join(root, "etc/ld.so.conf"), "w") as f:
        f.write("/usr/local/lib\n/lib/x86_64-linux-gnu\n")
    out = os.path.join(WORK, "e2e-debian.sqfs")
    subprocess.run(["mksquashfs", root, out, "-noappend", "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)
    os.chmod(out, 0o644)
    r = hpcrun("exec", out, "/sbin/ldconfig", "-Nv")
    dirs = [line.split(":")[0] for line in r.stdout.splitlines() if line and not line.startswith("\t")]
    assert "/usr/local/lib" in dirs and "/lib/x86_64-linux-gnu" in dirs, r.stdout + r.stderr
    return out, ":".join(dirs)


# env.go apptainerEnvOption, its Debian rows: (name, --env entries, exec options, expected
# with {default} the image's library directories)
LD_CASES = [
    ("TestDefaultLdLibraryPath", [], [], LIBS),
    ("TestDefaultLdLibraryPathWithBind", [], ["-B", "/etc/os-release:" + LIBS + "/os-release"], "{default}:" + LIBS),
    ("TestPrependLdLibraryPath", ["PREPEND_LD_LIBRARY_PATH=/foo"], [], "/foo:{default}:" + LIBS),
    ("TestAppendLdLibraryPath", ["APPEND_LD_LIBRARY_PATH=/foo"], [], "{default}:" + LIBS + ":/foo"),
    ("TestCustomTrailingCommaPath", ["LD_LIBRARY_PATH=/foo,"], [], "/foo,:" + LIBS),
    ("TestCustomLdLibraryPath", ["LD_LIBRARY_PATH=/foo"], [], "/foo:" + LIBS),
]


@pytest.mark.parametrize("name,opt,execopt,want", LD_CASES, ids=[c[0] for c in LD_CASES])
def test_apptainerEnvOption_ld_library_path(debian, name, opt, execopt, want):
    image, default = debian
    args = (["--env", ",".join(opt)] if opt else []) + execopt
    assert echo(image, "LD_LIBRARY_PATH", *args, env={"LD_LIBRARY_PATH": "/host/lib"}) == want.format(default=default)


@pytest.fixture(scope="module")
def e2e(images):
    """{'default': busybox SIF, 'custom': the e2e/testdata/Apptainer stand-in}"""
    return {"default": images["sif"], "custom": build_def_image(images, "e2e-env", CUSTOM_DEF)}


def echo(image, var, *opts, env=None):
    r = hpcrun("exec", *opts, image, "/bin/sh", "-c", f'echo "${{{var}}}"', env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout


# env.go apptainerEnv: (name, image, expected PATH, host environment)
ENV_CASES = [
    ("DefaultPath", "default", DEFAULT_PATH, {}),
    ("CustomPath", "custom", CUSTOM_PATH, {}),
    ("AppendToDefaultPath", "default", DEFAULT_PATH + ":/foo", {"APPTAINERENV_APPEND_PATH": "/foo"}),
    ("AppendToCustomPath", "custom", CUSTOM_PATH + ":/foo", {"APPTAINERENV_APPEND_PATH": "/foo"}),
    ("PrependToDefaultPath", "default", "/foo:" + DEFAULT_PATH, {"APPTAINERENV_PREPEND_PATH": "/foo"}),
    ("PrependToCustomPath", "custom", "/foo:" + CUSTOM_PATH, {"APPTAINERENV_PREPEND_PATH": "/foo"}),
    ("OverwriteDefaultPath", "default", "/usr/bin:/bin", {"APPTAINERENV_PATH": "/usr/bin:/bin"}),
    ("OverwriteCustomPath", "custom", "/usr/bin:/bin", {"APPTAINERENV_PATH": "/usr/bin:/bin"}),
    ("OverwriteTrailingCommaPath", "default", "/usr/bin:/bin,", {"APPTAINERENV_PATH": "/usr/bin:/bin,"}),
]


@pytest.mark.parametrize("name,image,path,env", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_apptainerEnv(e2e, name, image, path, env):
    assert echo(e2e[image], "PATH", env=env) == path


# env.go apptainerEnvOption: (name, image, --env entries, host environment, variable, value).
# Its LD_LIBRARY_PATH rows, on a Debian stand-in, are test_apptainerEnvOption_ld_library_path.
ENV_OPTION_CASES = [
    ("DefaultPath", "default", [], {}, "PATH", DEFAULT_PATH),
    ("DefaultPathOverride", "default", ["PATH=/"], {}, "PATH", "/"),
    ("AppendDefaultPath", "default", ["APPEND_PATH=/foo"], {}, "PATH", DEFAULT_PATH + ":/foo"),
    ("PrependDefaultPath", "default", ["PREPEND_PATH=/foo"], {}, "PATH", "/foo:" + DEFAULT_PATH),
    ("DefaultPathImage", "custom", [], {}, "PATH", CUSTOM_PATH),
    ("DefaultPathTestImageOverride", "custom", ["PATH=/"], {}, "PATH", "/"),
    ("AppendDefaultPathTestImage", "custom", ["APPEND_PATH=/foo"], {}, "PATH", CUSTOM_PATH + ":/foo"),
    ("AppendLiteralDefaultPathTestImage", "custom", ["PATH=$PATH:/foo"], {}, "PATH", CUSTOM_PATH + ":/foo"),
    ("PrependDefaultPathTestImage", "custom", ["PREPEND_PATH=/foo"], {}, "PATH", "/foo:" + CUSTOM_PATH),
    ("PrependLiteralDefaultPathTestImage", "custom", ["PATH=/foo:$PATH"], {}, "PATH", "/foo:" + CUSTOM_PATH),
    ("TestImageCgoEnabledDefault", "custom", [], {}, "CGO_ENABLED", "0"),
    ("TestImageCgoEnabledOverride", "custom", ["CGO_ENABLED=1"], {}, "CGO_ENABLED", "1"),
    ("TestImageCgoEnabledOverride_KO", "custom", [], {"CGO_ENABLED": "1"}, "CGO_ENABLED", "0"),
    ("TestImageCgoEnabledOverrideFromEnv", "custom", [], {"APPTAINERENV_CGO_ENABLED": "1"}, "CGO_ENABLED", "1"),
    (
        "TestImageCgoEnabledOverrideEnvOptionPrecedence",
        "custom",
        ["CGO_ENABLED=2"],
        {"APPTAINERENV_CGO_ENABLED": "1"},
        "CGO_ENABLED",
        "2",
    ),
    ("TestImageCgoEnabledOverrideEmpty", "custom", ["CGO_ENABLED="], {}, "CGO_ENABLED", ""),
    ("TestImageOverrideHost", "custom", ["FOO=foo"], {"FOO": "bar"}, "FOO", "foo"),
    ("TestMultiLine", "custom", [], {"MULTI": "Hello\nWorld"}, "MULTI", "Hello\nWorld"),
    ("TestEscapedNewline", "custom", [], {"ESCAPED": "Hello\\nWorld"}, "ESCAPED", "Hello\\nWorld"),
    ("TestInvalidKey", "custom", [], {"BASH_FUNC_ml%%": "TEST"}, "BASH_FUNC_ml%%", ""),
]


@pytest.mark.parametrize("name,image,opt,env,var,value", ENV_OPTION_CASES, ids=[c[0] for c in ENV_OPTION_CASES])
def test_apptainerEnvOption(e2e, name, image, opt, env, var, value):
    args = ["--env", ",".join(opt)] if opt else []
    if var == "BASH_FUNC_ml%%":  # not a shell name: the case checks the key is dropped quietly
        r = hpcrun("exec", *args, e2e[image], "/bin/sh", "-c", "env", env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert not [line for line in r.stdout.splitlines() if line.startswith("BASH_FUNC_ml")], r.stdout
        return
    assert echo(e2e[image], var, *args, env=env) == value


# env.go apptainerNoEnvOption: (name, --no-env names, host environment, variable, value)
NO_ENV_CASES = [
    ("NormalImport", [], {"FOO": "bar", "BAR": "foo"}, "FOO", "bar"),
    ("NoEnvAlone", ["FOO"], {"FOO": "bar", "BAR": "foo"}, "FOO", ""),
    ("NoEnvSecond", ["BAR", "FOO"], {"FOO": "bar", "BAR": "foo"}, "FOO", ""),
    ("NoEnvViaEnv", [], {"FOO": "bar", "BAR": "foo", "APPTAINER_NOENV": "FOO,BAR"}, "FOO", ""),
    ("OverridePermitted", ["BAR", "FOO"], {"FOO": "bar", "BAR": "foo", "APPTAINERENV_FOO": "Bar"}, "FOO", "Bar"),
    ("OverrideNotPermitted", ["APPTAINER_APPNAME"], {"APPTAINERENV_APPTAINER_APPNAME": "foo"}, "APPTAINER_APPNAME", ""),
]


@pytest.mark.parametrize("name,noenv,env,var,value", NO_ENV_CASES, ids=[c[0] for c in NO_ENV_CASES])
def test_apptainerNoEnvOption(e2e, name, noenv, env, var, value):
    args = ["--no-env", ",".join(noenv)] if noenv else []
    assert echo(e2e["default"], var, *args, env=env) == value


# env.go apptainerEnvFile: (name, --env entries, env files (one line each), variable, value)
ENV_FILE_CASES = [
    ("DefaultPathOverride", [], ["PATH=/"], "PATH", "/"),
    ("DefaultPathOverrideEnvOptionPrecedence", ["PATH=/etc"], ["PATH=/"], "PATH", "/etc"),
    ("DefaultPathOverrideEnvFileOptionPrecedence", [], ["PATH=/", "PATH=/etc"], "PATH", "/etc"),
    ("DefaultPathOverrideEnvAndEnvFileOptionPrecedence", ["PATH=/etc"], ["PATH=/", "PATH=/foo"], "PATH", "/etc"),
    ("AppendDefaultPath", [], ["APPEND_PATH=/"], "PATH", CUSTOM_PATH + ":/"),
    ("AppendLiteralDefaultPath", [], ['PATH="\\$PATH:/"'], "PATH", CUSTOM_PATH + ":/"),
    ("PrependLiteralDefaultPath", [], ['PATH="/:\\$PATH"'], "PATH", "/:" + CUSTOM_PATH),
    ("PrependDefaultPath", [], ["PREPEND_PATH=/"], "PATH", "/:" + CUSTOM_PATH),
    ("DefaultLdLibraryPath", [], [], "LD_LIBRARY_PATH", LIBS),
    ("CustomLdLibraryPath", [], ["LD_LIBRARY_PATH=/foo"], "LD_LIBRARY_PATH", "/foo:" + LIBS),
    ("CustomTrailingCommaPath", [], ["LD_LIBRARY_PATH=/foo,"], "LD_LIBRARY_PATH", "/foo,:" + LIBS),
]


@pytest.mark.parametrize("name,opt,files,var,value", ENV_FILE_CASES, ids=[c[0] for c in ENV_FILE_CASES])
def test_apptainerEnvFile(e2e, utmp, name, opt, files, var, value):
    args = ["--env", ",".join(opt)] if opt else []
    for i, line in enumerate(files):
        p = utmp / f"env.file{i}"
        p.write_text(line)
        args += ["--env-file", str(p)]
    assert echo(e2e["custom"], var, *args) == value


# env.go apptainerEnvEval: (name, APPTAINERENV_WHO, --no-eval, expected); $UID is the caller's
EVAL_CASES = [
    ("no env", None, False, ""),
    ("string env", "ME", False, "ME"),
    ("env var", "$UID", False, "{uid}"),
    ("double quoted env var", '"$UID"', False, '"{uid}"'),
    ("single quoted env var", "'$UID'", False, "'{uid}'"),
    ("escaped env var", "\\$UID", False, "$UID"),
    ("subshell env", "$(id -u)", False, "{uid}"),
    ("double quoted subshell env", '"$(id -u)"', False, '"{uid}"'),
    ("single quoted subshell env", "'$(id -u)'", False, "'{uid}'"),
    ("escaped subshell env", "\\$(id -u)", False, "$(id -u)"),
    ("no-eval/no env", None, False, ""),
    ("no-eval/string env", "ME", False, "ME"),
    ("no-eval/env var", "$UID", True, "$UID"),
    ("no-eval/double quoted env var", '"$UID"', True, '"$UID"'),
    ("no-eval/single quoted env var", "'$UID'", True, "'$UID'"),
    ("no-eval/escaped env var", "\\$UID", True, "\\$UID"),
    ("no-eval/subshell env", "$(id -u)", True, "$(id -u)"),
    ("no-eval/double quoted subshell env", '"$(id -u)"', True, '"$(id -u)"'),
    ("no-eval/single quoted subshell env", "'$(id -u)'", True, "'$(id -u)'"),
    ("no-eval/escaped subshell env", "\\$(id -u)", True, "\\$(id -u)"),
]


@pytest.mark.parametrize("name,who,noeval,expect", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_apptainerEnvEval(e2e, name, who, noeval, expect):
    env = {"APPTAINERENV_WHO": who} if who is not None else {}
    args = ["--no-eval"] if noeval else []
    r = hpcrun("exec", *args, e2e["custom"], "/bin/sh", "-c", "echo $WHO", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expect.format(uid=user().pw_uid) + "\n"


def test_issue43(e2e):
    """regressions.go issue43: an escaped $ stays literal."""
    env = {"APPTAINERENV_LD_PRELOAD": "/foo/bar/\\$LIB/baz.so"}
    assert echo(e2e["custom"], "LD_PRELOAD", env=env) == "/foo/bar/$LIB/baz.so"


def test_issue1263(e2e, utmp):
    """regressions.go issue1263: an empty env file does not trip over read-only variables."""
    (utmp / "env-file").write_text("")
    r = hpcrun("exec", "--env-file", str(utmp / "env-file"), e2e["custom"], "/bin/true")
    assert r.returncode == 0 and "readonly variable" not in r.stderr, r.stderr
