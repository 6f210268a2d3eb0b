"""hpcrun as `apptainer`/`singularity`: names, --version as the workflow clients parse it,
Apptainer's options and environment keys, for real (test user, namespaces, squashfuse)."""

import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest

from hpcrun_testlib import HPCRUN, WORK, WORK_USER, as_user, user_env
from test_pull import registry  # noqa: F401  (the loopback registry fixture)

BIN = os.path.dirname(HPCRUN)


def app(name, *args, env=None, cwd=None):
    """Run the installed `name` (apptainer, singularity, hpcrun) as the test user."""
    return subprocess.run(
        as_user([os.path.join(BIN, name), *args]),
        env=user_env(env),
        capture_output=True,
        text=True,
        cwd=cwd or WORK_USER,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["apptainer", "singularity"])
def test_installed_under_each_name_and_says_it(images, name):
    for prog in (name, "hpcrun"):
        r = app(prog, "exec", "/nonexistent.sif", "true")
        assert r.returncode == 252 and r.stderr.startswith(f"{prog}: error: ") and r.stderr.count("\n") == 1, r
        r = app(prog, "exec", "--help")
        assert r.returncode == 0 and f"Usage: {prog} exec" in r.stdout


@pytest.mark.parametrize("name", ["apptainer", "singularity"])
def test_version_as_apptainer(name):
    r = app(name, "--version")
    assert r.returncode == 0 and r.stdout.startswith("apptainer version 1.") and "+hpcrun." in r.stdout, r
    r = app(name, "version")
    assert r.returncode == 0 and r.stdout.startswith("1.") and "+hpcrun." in r.stdout
    r = app("hpcrun", "--version")
    assert r.returncode == 0 and r.stdout.startswith("hpcrun version ")


@pytest.fixture
def client_path(monkeypatch):
    """The clients find apptainer/singularity on PATH; they run here, as root (they only
    run --version)."""
    monkeypatch.setenv("PATH", BIN + ":/usr/bin:/bin")


def test_snakemake_accepts_the_version(client_path):
    from packaging.version import Version
    from snakemake.deployment.singularity import Singularity

    s = Singularity()
    s.check()  # raises WorkflowError when unparseable or < 1.0.0
    assert s.binary == "apptainer" and s.parseversion(s.version) >= Version("1.1")


def test_cwltool_accepts_the_version(client_path, monkeypatch):
    from cwltool import singularity

    monkeypatch.setattr(singularity, "_SINGULARITY_VERSION", None)
    monkeypatch.setattr(singularity, "_SINGULARITY_FLAVOR", "")
    version, flavor = singularity.get_version()
    assert flavor == "apptainer" and singularity.is_apptainer_1_1_or_newer()
    assert str(version).startswith("1.")


def test_spython_accepts_the_version(client_path, monkeypatch):
    monkeypatch.delenv("SPYTHON_SINGULARITY_VERSION", raising=False)
    from spython.main import Client
    from spython.utils import check_install

    assert check_install() is True
    assert Client.version().startswith("apptainer version 1.")


def test_global_options_before_the_command(images):
    r = app("apptainer", "-q", "-s", "--nocolor", "-v", "exec", images["sif"], "echo", "ok")
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    r = app("apptainer", "-d", "exec", images["sif"], "true")
    assert r.returncode == 0 and "timings" in r.stderr
    r = app("apptainer", "exec", "--debug", images["sif"], "true")
    assert r.returncode == 0 and "timings" in r.stderr


def test_mount_docker_style(images, utmp):
    (utmp / "f").write_text("hello\n")
    r = app(
        "apptainer",
        "exec",
        f"--mount=type=bind,source={utmp},target=/mnt/m,readonly",
        images["sif"],
        "sh",
        "-c",
        "cat /mnt/m/f; touch /mnt/m/g && echo wrote",
    )
    assert r.returncode != 0 or "wrote" not in r.stdout
    assert r.stdout.startswith("hello\n"), r.stderr
    r = app("apptainer", "exec", "--mount", f"type=bind,src={utmp},dst=/mnt/m", images["sif"], "cat", "/mnt/m/f")
    assert r.returncode == 0 and r.stdout == "hello\n", r.stderr
    r = app("apptainer", "exec", "--mount", "type=tmpfs,dst=/mnt/m", images["sif"], "true")
    assert r.returncode == 2 and "type 'tmpfs' is not supported" in r.stderr and r.stderr.count("\n") == 1


def test_network_none_has_loopback_only(images):
    ifaces = "tail -n +3 /proc/net/dev | cut -d: -f1"  # of our network namespace (/sys is the host's)
    assert len(app("apptainer", "exec", images["sif"], "sh", "-c", ifaces).stdout.split()) > 1
    for argv in (["--net", "--network", "none"], ["--network=none"]):
        r = app("apptainer", "exec", *argv, images["sif"], "sh", "-c", ifaces)
        assert r.returncode == 0 and r.stdout.split() == ["lo"], r.stderr
    r = app("apptainer", "exec", "--network=bridge", images["sif"], "true")
    assert r.returncode == 2 and "--network bridge" in r.stderr and r.stderr.count("\n") == 1


def test_cwd_and_pwd_set_the_working_directory(images):
    for flag in ("--cwd", "--pwd"):
        r = app("apptainer", "exec", flag, "/etc", images["sif"], "pwd")
        assert r.returncode == 0 and r.stdout == "/etc\n", r.stderr


def test_userns_is_accepted(images):
    r = app("apptainer", "exec", "-u", "--userns", images["sif"], "true")  # cwltool probes this
    assert r.returncode == 0, r.stderr


def test_refused_options_say_why_in_one_line(images):
    for argv, word in (
        (["--keep-privs"], "root"),
        (["--compat32"], "GPU"),
        (["--cpus", "2"], "cgroup"),
        (["-o", "/x.img"], "overlay"),
    ):
        r = app("apptainer", "exec", *argv, images["sif"], "true")
        assert r.returncode == 2 and r.stderr.startswith("apptainer: error: ") and word in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


def test_containall_from_the_environment(images):
    script = "echo ${FOO:-unset}; ls /proc | grep -c '^[0-9]'"
    r = app("apptainer", "exec", images["sif"], "sh", "-c", script, env={"FOO": "host"})
    foo, nproc = r.stdout.split()
    assert foo == "host" and int(nproc) > 10, r.stderr  # the host's processes
    r = app("apptainer", "exec", images["sif"], "sh", "-c", script, env={"APPTAINER_CONTAINALL": "1", "FOO": "host"})
    assert r.returncode == 0, r.stderr
    foo, nproc = r.stdout.split()
    assert foo == "unset" and int(nproc) < 10  # clean environment, own PID namespace
    r = app("apptainer", "exec", images["sif"], "sh", "-c", "echo $FOO", env={"APPTAINER_CONTAINALL": "yes"})
    assert r.returncode == 2 and "APPTAINER_CONTAINALL" in r.stderr


def test_cleanenv_short_and_from_env(images):
    r = app("apptainer", "exec", "-e", images["sif"], "sh", "-c", "echo ${FOO:-unset}", env={"FOO": "host"})
    assert r.stdout == "unset\n", r.stderr
    r = app(
        "singularity",
        "exec",
        images["sif"],
        "sh",
        "-c",
        "echo ${FOO:-unset}",
        env={"FOO": "host", "SINGULARITY_CLEANENV": "true"},
    )
    assert r.stdout == "unset\n", r.stderr
    assert "SINGULARITY_CLEANENV is set, but APPTAINER_CLEANENV is preferred" in r.stderr


def test_singularity_bindpath_with_its_deprecation_note(images, utmp):
    (utmp / "f").write_text("bound\n")
    r = app("singularity", "exec", images["sif"], "cat", "/mnt/sb/f", env={"SINGULARITY_BINDPATH": f"{utmp}:/mnt/sb"})
    assert r.returncode == 0 and r.stdout == "bound\n", r.stderr
    assert (
        "singularity: info: Environment variable SINGULARITY_BINDPATH is set, but APPTAINER_BINDPATH is preferred\n"
    ) in r.stderr
    r = app(
        "apptainer", "-q", "exec", images["sif"], "cat", "/mnt/sb/f", env={"SINGULARITY_BINDPATH": f"{utmp}:/mnt/sb"}
    )
    assert r.stdout == "bound\n" and r.stderr == ""


def test_bind_keys_and_command_line_all_count(images, utmp):
    for d in "abc":
        (utmp / d).mkdir()
    r = app(
        "apptainer",
        "exec",
        "-B",
        f"{utmp}/a:/mnt/a",
        images["sif"],
        "ls",
        "-d",
        "/mnt/a",
        "/mnt/b",
        "/mnt/c",
        env={"APPTAINER_BINDPATH": f"{utmp}/b:/mnt/b", "SINGULARITY_BIND": f"{utmp}/c:/mnt/c"},
    )
    assert r.returncode == 0 and r.stdout.split() == ["/mnt/a", "/mnt/b", "/mnt/c"], r.stderr


def test_env_keys_for_pwd_home_and_shell(images):
    r = app("apptainer", "exec", images["sif"], "pwd", env={"APPTAINER_PWD": "/etc"})
    assert r.stdout == "/etc\n", r.stderr
    r = app("apptainer", "exec", "--pwd", "/usr", images["sif"], "pwd", env={"APPTAINER_PWD": "/etc"})
    assert r.stdout == "/usr\n", r.stderr  # the command line wins
    r = app("apptainer", "shell", "-s", "/bin/echo", images["sif"], "from-shell")
    assert r.returncode == 0 and r.stdout == "from-shell\n", r.stderr
    r = app("apptainer", "shell", images["sif"], "from-env", env={"APPTAINER_SHELL": "/bin/echo"})
    assert r.returncode == 0 and r.stdout == "from-env\n", r.stderr


def test_no_umask_and_compat(images):
    r = subprocess.run(
        as_user(["sh", "-c", f"umask 0077; exec {BIN}/apptainer exec --no-umask {images['sif']} sh -c umask"]),
        env=user_env(),
        capture_output=True,
        text=True,
        cwd=WORK_USER,
        timeout=60,
    )
    assert r.stdout.strip() in ("0022", "022"), r.stderr
    r = app(
        "apptainer",
        "exec",
        "--compat",
        images["sif"],
        "sh",
        "-c",
        "touch /new && echo writable; echo ${FOO:-unset}",
        env={"FOO": "host"},
    )
    assert r.returncode == 0 and r.stdout.split() == ["writable", "unset"], r.stderr


def test_no_env_blocks_host_variables(images):
    r = app(
        "apptainer",
        "exec",
        "--no-env",
        "FOO,BAR",
        images["sif"],
        "sh",
        "-c",
        "echo ${FOO:-unset} ${BAR:-unset} $BAZ",
        env={"FOO": "1", "BAR": "2", "BAZ": "3"},
    )
    assert r.stdout.split() == ["unset", "unset", "3"], r.stderr


def test_inspect_takes_the_union_of_selectors(images):
    r = app("apptainer", "inspect", "-l", "-r", "--json", images["sif"])
    assert r.returncode == 0, r.stderr
    import json

    attrs = json.loads(r.stdout)["data"]["attributes"]
    assert set(attrs) == {"labels", "runscript"}


def test_build_and_pull_know_apptainers_names(images, bdir):
    r = app("apptainer", "build", "--nv", str(bdir / "o.sif"), images["sandbox"])
    assert r.returncode == 2 and "GPU" in r.stderr and r.stderr.count("\n") == 1
    r = app("apptainer", "build", "--disable-cache", "--no-https", "-F", str(bdir / "o.sif"), images["sandbox"])
    assert r.returncode == 0, r.stderr
    r = app("apptainer", "pull", "--library", "https://x", "library://alpine")
    assert r.returncode == 2 and "library://" in r.stderr


def test_pull_name_dir_and_cachedir(registry, bdir):  # noqa: F811
    cache = os.path.join(WORK, "cache", "apptainer-cachedir")
    r = app(
        "apptainer",
        "pull",
        "--name",
        "named.sif",
        "--dir",
        str(bdir),
        f"docker://{registry}/test/busybox:v1",
        env={"APPTAINER_CACHEDIR": cache},
    )
    assert r.returncode == 0, r.stderr
    assert (bdir / "named.sif").is_file()
    assert os.listdir(os.path.join(cache, "hpcrun", "blobs", "sha256"))  # the cache is where it was put
    r = app("apptainer", "exec", str(bdir / "named.sif"), "true")
    assert r.returncode == 0, r.stderr


def test_scratch_is_an_empty_directory_in_memory(images):
    r = app(
        "apptainer",
        "exec",
        "-S",
        "/scratch1,/opt/s2",
        "--scratch",
        "/data/s3",
        images["sif"],
        "sh",
        "-c",
        "for d in /scratch1 /opt/s2 /data/s3; do ls -A $d; touch $d/f && echo ok; done",
    )
    assert r.returncode == 0 and r.stdout.split() == ["ok", "ok", "ok"], r.stderr
    r = app("apptainer", "exec", images["sif"], "ls", "/scratch1", env={"APPTAINER_SCRATCH": "/scratch1"})
    assert r.returncode == 0, r.stderr


def test_test_run_help_and_help_commands(images, bdir):
    """`test IMAGE` runs %test (its status is the command's), `run-help` shows %help, `help CMD`
    the command's help: as Apptainer's."""
    (bdir / "t.def").write_text(
        f"Bootstrap: localimage\nFrom: {images['sif']}\n%help\nUse it well.\n"
        '%test\necho "tested $*"\n[ "$1" != fail ]\n'
    )
    out = str(bdir / "t.sif")
    r = app("apptainer", "build", "--notest", out, str(bdir / "t.def"))
    assert r.returncode == 0, r.stderr
    r = app("apptainer", "test", out, "a", "b")
    assert (r.returncode, r.stdout) == (0, "tested a b\n"), r.stderr
    assert app("apptainer", "test", out, "fail").returncode == 1
    r = app("apptainer", "test", images["sif"])  # no %test: nothing to fail
    assert r.returncode == 0 and "No test script found" in r.stderr, r.stderr
    assert app("apptainer", "run-help", out).stdout == "Use it well.\n"
    assert app("apptainer", "run-help", images["sif"]).stdout == "No help sections were defined for this image\n"
    r = app("apptainer", "help", "exec")
    assert r.returncode == 0 and r.stdout.startswith("Usage: apptainer exec"), r.stdout
    r = app("apptainer", "help", "instance", "stop")
    assert r.returncode == 0 and "Usage: apptainer instance stop" in r.stdout, r.stdout
    assert app("apptainer", "help", "nosuch").returncode == 2


def test_inspect_json_has_apptainers_shape(images):
    r = app("apptainer", "inspect", "--all", images["sif"])  # --all: JSON, as Apptainer's
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["type"] == "container" and r.stdout.startswith('{\n\t"data"')
    attrs = doc["data"]["attributes"]
    assert list(attrs) == ["environment", "labels", "runscript"]  # Apptainer's order, empty ones left out
    assert attrs["environment"] == {
        "/.singularity.d/env/90-environment.sh": "export IMAGE_VAR=from_image\nexport OVERRIDDEN=image"
    }  # trailing newlines trimmed, as Apptainer's setAttribute does
    r = app("apptainer", "inspect", "-e", images["sif"])
    assert r.stdout.startswith("=== /.singularity.d/env/90-environment.sh ===\nexport IMAGE_VAR"), r.stdout


def test_build_from_docker_archive_url_form(images, bdir):
    """cwltool builds `docker-archive://FILE`, relative paths included."""
    layer = bdir / "layer.tar"
    subprocess.run(["tar", "-C", images["sandbox"], "-cf", str(layer), "."], check=True)
    digest = hashlib.sha256(layer.read_bytes()).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest}"]}, "config": {}}).encode()
    archive = bdir / "img.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (
            ("layer.tar", layer.read_bytes()),
            ("c.json", config),
            ("manifest.json", json.dumps([{"Config": "c.json", "Layers": ["layer.tar"]}]).encode()),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    os.chmod(archive, 0o644)
    r = app("apptainer", "build", str(bdir / "a.sif"), "docker-archive://img.tar", cwd=str(bdir))
    assert r.returncode == 0, r.stderr
    assert app("apptainer", "exec", str(bdir / "a.sif"), "cat", "/etc/group").stdout.startswith("root:x:0:")


@pytest.mark.parametrize("name", ["apptainer", "singularity"])
def test_in_container_errors_name_the_command(images, name):
    """Lines written in the container (the launcher's, or sh's for the environment wrapper,
    whose $0 it is) say the name too, not 'hpcrun'."""
    r = app(name, "exec", images["sif"], "/no/such/cmd")
    assert r.returncode == 127 and r.stderr.startswith(f"{name}: ") and "hpcrun" not in r.stderr, r
    assert "/no/such/cmd: " in r.stderr and r.stderr.count("\n") == 1, r
