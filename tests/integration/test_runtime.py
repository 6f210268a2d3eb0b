"""hpcrun exec/run/shell for real: namespaces, squashfuse, overlay, binds, identity."""

import os
import random

import pytest

from hpcrun_testlib import WORK, WORK_USER, hpcrun, user

KINDS = ["sif", "squashfs", "sandbox"]


@pytest.mark.parametrize("kind", KINDS)
def test_runs_as_caller_in_each_image_kind(images, kind):
    r = hpcrun("exec", images[kind], "sh", "-c", "id -u; id -g; id -un; whoami; echo ~; pwd")
    assert r.returncode == 0, r.stderr
    pw = user()
    assert r.stdout.split() == [str(pw.pw_uid), str(pw.pw_gid), pw.pw_name, pw.pw_name, pw.pw_dir, WORK_USER]


@pytest.mark.parametrize("kind", KINDS)
def test_image_content_is_the_root(images, kind):
    r = hpcrun("exec", images[kind], "sh", "-c", "readlink /bin/sh; test -x /bin/busybox && echo busybox")
    assert r.stdout.split() == ["busybox", "busybox"], r.stderr


def test_exit_status_passes_through(images):
    assert hpcrun("exec", images["sif"], "sh", "-c", "exit 42").returncode == 42
    assert hpcrun("exec", images["sif"], "false").returncode == 1
    assert hpcrun("exec", images["sif"], "true").returncode == 0


def test_killed_by_signal_gives_128_plus_n(images):
    assert hpcrun("exec", images["sif"], "sh", "-c", "kill -9 $$").returncode == 137
    assert hpcrun("exec", images["sif"], "sh", "-c", "kill -TERM $$").returncode == 143


def test_arguments_after_image_belong_to_the_command(images):
    r = hpcrun("exec", images["sif"], "echo", "-n", "--bind", "x", "-e")
    assert r.stdout == "--bind x -e"


def test_binary_stdin_stdout_intact(images):
    data = bytes(random.getrandbits(8) for _ in range(1 << 20))
    r = hpcrun("exec", images["sif"], "cat", input=data, text=False)
    assert r.returncode == 0 and r.stdout == data


def test_home_tmp_and_cwd_are_the_hosts(images):
    pw = user()
    marker = f"/tmp/hpcrun-it-marker-{os.getpid()}"
    try:
        r = hpcrun(
            "exec",
            images["sif"],
            "sh",
            "-c",
            f"echo inside > {marker}; test -d {pw.pw_dir} && echo home; ls -d {WORK_USER}",
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["home", WORK_USER]
        with open(marker) as f:
            assert f.read() == "inside\n"
    finally:
        os.unlink(marker)


def test_passwd_and_group_hold_image_entries_and_caller(images):
    r = hpcrun("exec", images["squashfs"], "sh", "-c", "cut -d: -f1 /etc/passwd; cut -d: -f1 /etc/group")
    name = user().pw_name
    assert r.stdout.split() == ["root", "nobody", name, "root", "nogroup", r.stdout.split()[-1]]


def test_bind_to_destination_missing_in_image(images, utmp):
    src = utmp / "data"
    src.mkdir()
    (src / "f").write_text("payload")
    os.chmod(utmp, 0o755)
    r = hpcrun("exec", "-B", f"{src}:/not/in/image", images["sif"], "cat", "/not/in/image/f")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "payload"


def test_bind_read_only_and_comma_lists(images, utmp):
    a, b = utmp / "a", utmp / "b"
    a.mkdir()
    b.mkdir()
    os.chmod(utmp, 0o777)
    os.chmod(a, 0o777)
    os.chmod(b, 0o777)
    r = hpcrun(
        "exec",
        "--bind",
        f"{a}:/a:ro,{b}:/b",
        images["sif"],
        "sh",
        "-c",
        "touch /b/ok && echo b-ok; touch /a/no 2>/dev/null || echo a-ro",
    )
    assert r.stdout.split() == ["b-ok", "a-ro"], r.stderr
    assert (b / "ok").exists() and not (a / "no").exists()


def test_bind_from_environment(images, utmp):
    os.chmod(utmp, 0o755)
    (utmp / "f").write_text("x")
    r = hpcrun("exec", images["sif"], "cat", "/envbind/f", env={"HPCRUN_BIND": f"{utmp}:/envbind"})
    assert r.stdout == "x", r.stderr
    r = hpcrun("exec", images["sif"], "cat", "/apbind/f", env={"APPTAINER_BIND": f"{utmp}:/apbind"})
    assert r.stdout == "x", r.stderr


def test_symlinks_in_image_never_redirect_binds_to_host(images, utmp):
    os.chmod(utmp, 0o755)
    (utmp / "f").write_text("bound")
    for dst, seen_at in (
        ("/escape-abs/hpcrun-esc1", "/hpcrun-esc1"),
        ("/opt/escape-rel/hpcrun-esc2", "/tmp/hpcrun-esc2"),
    ):
        # --no-mount tmp: /tmp is the image's own, so the relative link lands in the image
        r = hpcrun("exec", "--no-mount", "tmp", "-B", f"{utmp}:{dst}", images["sif"], "cat", f"{seen_at}/f")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "bound"
        assert not os.path.exists(seen_at), f"a bind escaped onto the host at {seen_at}"
    assert not os.path.exists("/hpcrun-esc1")


def test_mounts_are_nosuid_nodev_and_no_new_privs(images):
    r = hpcrun("exec", images["sif"], "sh", "-c", "grep NoNewPrivs /proc/self/status; cat /proc/self/mountinfo")
    assert "NoNewPrivs:\t1" in r.stdout
    for line in r.stdout.splitlines()[1:]:
        fields = line.split()
        mnt, opts = fields[4], fields[5]
        if mnt == "/" or mnt.startswith(("/home", "/tmp", WORK)):
            assert "nosuid" in opts and "nodev" in opts, line
    root = [ln for ln in r.stdout.splitlines()[1:] if ln.split()[4] == "/"][0]
    assert "ro" in root.split()[5].split(",")


def test_root_read_only_unless_writable_tmpfs(images):
    r = hpcrun("exec", images["sif"], "sh", "-c", "touch /newfile")
    assert r.returncode != 0 and "Read-only" in r.stderr
    r = hpcrun("exec", "--writable-tmpfs", images["sif"], "sh", "-c", "touch /newfile && ls /newfile")
    assert r.returncode == 0 and r.stdout.strip() == "/newfile", r.stderr
    assert hpcrun("exec", images["sif"], "ls", "/newfile").returncode != 0  # gone afterwards


def test_contain_hides_home_and_tmp(images):
    pw = user()
    r = hpcrun(
        "exec",
        "--contain",
        images["sif"],
        "sh",
        "-c",
        f"ls -A /tmp | wc -l; ls -A {pw.pw_dir} | wc -l; touch /tmp/x && echo tmp-writable",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0", "tmp-writable"]


def test_no_home_and_no_mount(images):
    pw = user()
    r = hpcrun(
        "exec",
        "--no-home",
        "--no-mount",
        "tmp",
        "--pwd",
        "/",
        images["sif"],
        "sh",
        "-c",
        f"test -e {pw.pw_dir}/. && echo home; ls -A /tmp | wc -l",
    )
    assert r.stdout.split() == ["0"], (r.stdout, r.stderr)


def test_pwd_option(images):
    r = hpcrun("exec", "--pwd", "/etc", images["sif"], "pwd")
    assert r.stdout.strip() == "/etc"
    r = hpcrun("exec", "--pwd", "/nonexistent", images["sif"], "pwd")
    assert r.returncode == 254 and "--pwd /nonexistent" in r.stderr


def test_scratch_directories_from_config(images, utmp):
    scratch = utmp / "scratch"
    scratch.mkdir()
    (scratch / "s").write_text("scratch!\n")
    os.chmod(utmp, 0o755)
    conf = utmp / "conf.yaml"
    conf.write_text(f"scratch: [{scratch}, /does/not/exist, $MYSCRATCH]\n")
    r = hpcrun(
        "exec",
        images["sif"],
        "sh",
        "-c",
        f"cat {scratch}/s; test -e /does/not/exist || echo absent",
        env={"HPCRUN_CONFIG": str(conf)},
    )
    assert r.stdout.split() == ["scratch!", "absent"], r.stderr


def test_environment(images, utmp):
    envfile = utmp / "env"
    envfile.write_text("# comment\nFROM_FILE=file\nexport BOTH='file'\n")
    os.chmod(utmp, 0o755)
    env = {
        "HOST_VAR": "host",
        "HPCRUN_ENV_SET_BY": "hpcrun",
        "APPTAINERENV_AP": "ap",
        "SINGULARITYENV_SING": "sing",
        "HPCRUN_ENV_OVERRIDDEN": "user",
    }
    r = hpcrun(
        "exec",
        "--env",
        "BOTH=flag",
        "--env-file",
        str(envfile),
        images["sif"],
        "sh",
        "-c",
        "echo $HOST_VAR $SET_BY $AP $SING $FROM_FILE $BOTH $IMAGE_VAR $OVERRIDDEN $PATH; env | grep -c '^HPCRUN_ENV_' ",
        env=env,
    )
    assert r.stdout.split() == [
        "host",
        "hpcrun",
        "ap",
        "sing",
        "file",
        "flag",
        "from_image",
        "user",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "0",
    ], r.stderr


def test_cleanenv(images):
    r = hpcrun("exec", "--cleanenv", images["plain"], "env", env={"HOST_VAR": "host"})
    names = {ln.split("=", 1)[0] for ln in r.stdout.splitlines()}
    assert "HOST_VAR" not in names and {"HOME", "PATH", "LANG"} <= names, names


def test_image_without_env_scripts_execs_directly(images):
    r = hpcrun("exec", images["plain"], "sh", "-c", "echo ${IMAGE_VAR:-unset}; cat /proc/$PPID/comm")
    assert r.stdout.split()[0] == "unset"


def test_run_uses_runscript_else_shell(images):
    r = hpcrun("run", images["sif"], "a", "b")
    assert r.stdout.strip() == "runscript:a b", r.stderr
    r = hpcrun("run", images["plain"], "-c", "echo shell-fallback")
    assert r.stdout.strip() == "shell-fallback", r.stderr


def test_shell_reads_commands(images):
    r = hpcrun("shell", images["sif"], input="echo $PS1; id -un\n")
    assert r.stdout.split() == ["hpcrun>", user().pw_name], r.stderr


def test_fakeroot_with_subuid_range(images):
    r = hpcrun("exec", "--fakeroot", images["sif"], "sh", "-c", "id -u; id -un; cat /proc/self/uid_map | wc -l; echo ~")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "root", "2", "/root"]


def test_pid_namespace(images):
    r = hpcrun("exec", "--pid", images["sif"], "sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'")
    pid, count = r.stdout.split()
    assert pid == "2" and int(count) <= 4, r.stdout + r.stderr
    r = hpcrun("exec", "--containall", images["sif"], "sh", "-c", "echo $$")
    assert r.stdout.strip() == "2"


def test_pid_namespace_exit_status(images):
    assert hpcrun("exec", "--pid", images["sif"], "sh", "-c", "exit 9").returncode == 9


def test_hostname_and_net(images):
    r = hpcrun("exec", "--hostname", "inside", images["sif"], "hostname")
    assert r.stdout.strip() == "inside"
    r = hpcrun(
        "exec",
        "--net",
        images["sif"],
        "sh",
        "-c",
        "tail -n +3 /proc/net/dev | cut -d: -f1; ping -c1 -W1 127.0.0.1 >/dev/null 2>&1; echo $?",
    )
    assert r.stdout.split()[0] == "lo" and len(r.stdout.split()) == 2, r.stdout


def test_unsquash_fallback_announced_and_removed(images):
    r = hpcrun("exec", "--unsquash", images["sif"], "sh", "-c", "cat /etc/passwd | head -1; echo $PWD")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "root:x:0:0:root:/root:/bin/sh"
    assert "extracting" in r.stderr and "hpcrun-unsquash-" in r.stderr
    assert not any(d.startswith("hpcrun-unsquash-") for d in os.listdir("/tmp"))


def test_config_fuse_never_extracts(images, utmp):
    conf = utmp / "c.yaml"
    conf.write_text("fuse: never\n")
    os.chmod(utmp, 0o755)
    r = hpcrun("exec", images["squashfs"], "true", env={"HPCRUN_CONFIG": str(conf)})
    assert r.returncode == 0 and "extracting" in r.stderr


def test_apptainer_sif_from_sif_library(images):
    """one-group.sif: written by Apptainer's SIF library, arch 386, no executables."""
    from hpcrun_testlib import TESTDATA

    src = os.path.join(TESTDATA, "one-group.sif")
    if not os.path.exists(src):
        pytest.fail(f"test data missing: {src}")
    import shutil

    dst = os.path.join(WORK, "one-group.sif")
    shutil.copy(src, dst)
    os.chmod(dst, 0o644)
    r = hpcrun("exec", "-B", "/bin/busybox:/busybox", dst, "/busybox", "cat", "/hello.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Hello from Sylabs!"
    assert "warning" in r.stderr and "386" in r.stderr


def test_dry_run_prints_plan(images):
    import json

    r = hpcrun("exec", "--dry-run", "-B", "/etc:/hostetc:ro", images["sif"], "true")
    plan = json.loads(r.stdout)
    assert plan["args"] == ["true"]
    assert {"src": "/etc", "dst": "/hostetc", "readonly": True}.items() <= [
        m for m in plan["mounts"] if m["dst"] == "/hostetc"
    ][0].items()


def test_version_and_check():
    r = hpcrun("version")
    assert r.returncode == 0 and r.stdout.strip()
    r = hpcrun("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   unprivileged user namespaces" in r.stdout
    assert "ok   overlayfs" in r.stdout


def test_build_sif_from_directory_then_run(images, utmp):
    import subprocess
    from hpcrun_testlib import as_user, user_env

    here = os.path.dirname(os.path.abspath(__file__))
    import shutil

    script = str(utmp / "make-rootfs.sh")  # the checkout may be unreadable to the test user
    shutil.copy(os.path.join(here, "..", "..", "images", "busybox", "make-rootfs.sh"), script)
    os.chmod(script, 0o755)
    os.chmod(utmp, 0o777)
    rootfs, out = str(utmp / "rootfs"), str(utmp / "demo.sif")
    subprocess.run(as_user(["sh", script, rootfs]), env=user_env(), check=True, cwd=str(utmp))
    r = hpcrun("build", out, rootfs)
    assert r.returncode == 0, r.stderr
    from hpcrun.images.sif import SifFile

    part = SifFile(out).primary_partition()
    from hpcrun.images.sif import host_arch

    assert part.offset % 4096 == 0 and part.arch == host_arch()
    r = hpcrun("run", out, "echo", "args-passed")
    assert r.returncode == 0, r.stderr
    assert "Hello from the hpcrun busybox demo" in r.stdout and "args-passed" in r.stdout
    assert hpcrun("build", out, rootfs).returncode == 2  # exists: needs --force
    assert hpcrun("build", "--force", out, rootfs).returncode == 0


def test_fakeroot_without_subuid_maps_root_only(images):
    import subprocess
    from hpcrun_testlib import USER
    import pwd

    if os.getuid() != 0:
        pytest.skip("needs root to switch to the second test user")
    pw = pwd.getpwnam(USER + "2")
    r = subprocess.run(
        [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            "--init-groups",
            "--",
            os.environ.get("HPCRUN_BIN", "/opt/hpcrun-venv/bin/hpcrun"),
            "exec",
            "--fakeroot",
            images["sif"],
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map",
        ],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0", str(pw.pw_uid), "1"]
    assert "maps only root" in r.stderr


def test_ipc_namespace(images):
    host = os.readlink("/proc/self/ns/ipc")
    assert hpcrun("exec", images["sif"], "readlink", "/proc/self/ns/ipc").stdout.strip() == host
    assert hpcrun("exec", "--ipc", images["sif"], "readlink", "/proc/self/ns/ipc").stdout.strip() != host


def test_no_squashfuse_binary_falls_back_to_extraction(images, utmp):
    conf = utmp / "c.yaml"
    conf.write_text("squashfuse: [no-such-squashfuse]\n")
    r = hpcrun("exec", images["sif"], "cat", "/etc/group", env={"HPCRUN_CONFIG": str(conf)})
    assert r.returncode == 0 and "root:x:0:" in r.stdout
    assert "no squashfuse binary" in r.stderr and "extracting" in r.stderr


def test_shell_on_a_terminal(images):
    """`shell` under a real pseudo-terminal (util-linux `script`): interactive, TTY inside."""
    import shutil
    import subprocess
    from hpcrun_testlib import HPCRUN, as_user, user_env

    if not shutil.which("script"):
        pytest.fail("util-linux `script` is missing")
    cmd = " ".join(as_user([HPCRUN, "shell", images["sif"]]))
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"],
        input="tty; exit 3\n",
        capture_output=True,
        text=True,
        env=user_env(),
        cwd=WORK_USER,
        timeout=60,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "/dev/pts/" in r.stdout and "hpcrun> " in r.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_reads_metadata_without_mounting(images, kind):
    import json

    r = hpcrun("inspect", images[kind])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "maintainer: hpcrun\norg.label-schema.name: busybox-test\n"
    r = hpcrun("inspect", "--all", "--json", images[kind])
    attrs = json.loads(r.stdout)["data"]["attributes"]
    assert attrs["runscript"] == '#!/bin/sh\necho "runscript:$*"'  # trailing newline trimmed, as Apptainer
    # Apptainer's shape: environment files by path, empty fields left out, --all is JSON
    assert "export IMAGE_VAR=from_image" in attrs["environment"]["/.singularity.d/env/90-environment.sh"]
    assert "deffile" not in attrs
    assert json.loads(hpcrun("inspect", "--all", images[kind]).stdout)["data"]["attributes"] == attrs
