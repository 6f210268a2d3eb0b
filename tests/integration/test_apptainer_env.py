"""What the command sees inside the container, old (Singularity 2.x) images and
registry references, as Apptainer does it (issue 9)."""

import os

from hpcrun_testlib import WORK, hpcrun
from test_pull import proxy, registry  # noqa: F401  (a loopback registry and a counting proxy)


def env_of(r):
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def test_pwd_is_the_container_working_directory(images, utmp):
    # ReFrame's line: the host's $PWD and $OLDPWD must not leak in
    r = hpcrun(
        "exec",
        "-B",
        f"{utmp}:/rfm",
        "--pwd",
        "/rfm",
        images["sif"],
        "sh",
        "-c",
        'pwd; echo "$PWD"; echo "${OLDPWD-unset}"',
        env={"PWD": "/host/dir", "OLDPWD": "/host/old"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/rfm", "/rfm", "unset"]
    for clean in ([], ["--cleanenv"]):  # what the command itself gets, not what a shell fixed
        env = env_of(
            hpcrun(
                "exec",
                *clean,
                "-B",
                f"{utmp}:/rfm",
                "--pwd",
                "/rfm",
                images["plain"],
                "env",
                cwd=str(utmp),
                env={"PWD": str(utmp), "OLDPWD": "/host/old"},
            )
        )
        assert env["PWD"] == "/rfm" and "OLDPWD" not in env


def test_container_variables(images, utmp):
    for clean in ([], ["--cleanenv"]):
        r = hpcrun(
            "exec", *clean, "-B", f"{utmp}:/mnt", "busybox.sif", "env", cwd=WORK, env={"APPTAINER_BIND": f"{utmp}:/srv"}
        )
        env = env_of(r)
        path = os.path.join(WORK, "busybox.sif")
        for prefix in ("APPTAINER_", "SINGULARITY_"):
            assert env[prefix + "CONTAINER"] == path
            assert env[prefix + "NAME"] == "busybox.sif"
            assert env[prefix + "BIND"] == "/mnt,/srv"  # destinations: flag, then variable
        assert env["APPTAINER_COMMAND"] == "exec"
    env = env_of(hpcrun("exec", images["sif"], "env"))
    assert "APPTAINER_BIND" not in env  # none given: unset, as Apptainer's action script leaves it
    r = hpcrun("run", images["plain"], "-c", "echo $APPTAINER_COMMAND")
    assert r.stdout.strip() == "run", r.stderr


def test_env_option_splits_on_commas_as_apptainer(images):
    r = hpcrun("exec", "--env", "A=1,B=2", "--env", "C=x,y", "--env", '"D=1,2",E=3', images["plain"], "env")
    env = env_of(r)
    assert (env["A"], env["B"], env["C"], env["D"], env["E"]) == ("1", "2", "x,y", "1,2", "3")


def test_prepend_and_append_path_applied_once(images):
    for kind in ("sif", "plain"):  # with and without the image's environment scripts
        r = hpcrun(
            "exec",
            images[kind],
            "sh",
            "-c",
            'echo "$PATH"',
            env={"APPTAINERENV_PREPEND_PATH": "/pre", "APPTAINERENV_APPEND_PATH": "/app"},
        )
        assert r.returncode == 0, r.stderr
        parts = r.stdout.strip().split(":")
        assert parts[0] == "/pre" and parts[-1] == "/app" and parts.count("/pre") == parts.count("/app") == 1, parts


def test_env_values_are_evaluated_in_the_container_by_default(images, utmp):
    home = env_of(hpcrun("exec", images["plain"], "env"))["HOME"]
    for kind in ("sif", "plain"):
        r = hpcrun(
            "exec",
            "--env",
            "B=$IMAGE_VAR-b",
            images[kind],
            "sh",
            "-c",
            'echo "$A|$B"',
            env={"APPTAINERENV_A": "$HOME/x"},
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{home}/x|" + ("from_image-b" if kind == "sif" else "-b")


def test_env_file_is_read_as_apptainer_evaluates_it(images, utmp):
    (utmp / "e.env").write_text("# comment\nexport A=1 B=\"two words\"\nC=$A-${B}\nD='$HOME'\n")
    r = hpcrun("exec", "--env-file", str(utmp / "e.env"), images["plain"], "env")
    env = env_of(r)
    assert (env["A"], env["B"], env["C"]) == ("1", "two words", "1-two words")
    assert env["D"] == env["HOME"]  # literal $HOME from the file, evaluated in the container
    (utmp / "bad.env").write_text("A=$(id)\n")
    r = hpcrun("exec", "--env-file", str(utmp / "bad.env"), images["plain"], "true")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "line 1" in r.stderr, r.stderr


def run_as_script(image, *args):
    """./IMAGE ARGS, as a user runs it: the kernel starts `env run-singularity IMAGE ARGS`."""
    import subprocess
    from hpcrun_testlib import HPCRUN, as_user, user_env

    env = user_env({"PATH": os.path.dirname(HPCRUN) + ":/usr/bin:/bin"})
    return subprocess.run(
        as_user(["./" + os.path.basename(image), *args]),
        cwd=os.path.dirname(image),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_singularity2_image_runs(images, utmp):
    old = utmp / "old.img"
    with open(images["squashfs"], "rb") as f:
        old.write_bytes(b"#!/usr/bin/env run-singularity\n" + f.read())
    old.chmod(0o755)
    r = hpcrun("exec", str(old), "cat", "/.singularity.d/env/90-environment.sh")
    assert r.returncode == 0 and "IMAGE_VAR=from_image" in r.stdout, r.stderr
    r = run_as_script(str(old), "a", "b")
    assert (r.returncode, r.stdout) == (0, "runscript:a b\n"), r.stderr


def test_sif_is_written_executable_and_runs_as_a_script(images, bdir):
    out = bdir / "b.sif"
    r = hpcrun("build", str(out), images["sandbox"])
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o755
    r = run_as_script(str(out), "x")
    assert (r.returncode, r.stdout) == (0, "runscript:x\n"), r.stderr


def test_exec_docker_ref_runs_from_the_sif_cache(proxy):
    import test_pull

    env = test_pull.cache_env("refcache")
    ref = f"docker://{proxy}/test/busybox:v1"
    r = hpcrun("exec", ref, "sh", "-c", 'echo "$APPTAINER_CONTAINER"', env=env)
    assert r.returncode == 0, r.stderr
    assert test_pull.TokenProxy.blob_gets == 3
    top = os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "sif")
    sifs = [n for n in os.listdir(top) if n.endswith(".sif")]
    assert len(sifs) == 1 and r.stdout.strip() == os.path.join(top, sifs[0])
    assert hpcrun("cache", "clean", env=env).returncode == 0  # the layers go, the SIF stays
    r = hpcrun("exec", ref, "true", env=env)
    assert r.returncode == 0 and test_pull.TokenProxy.blob_gets == 3, "the second run must not pull"
    assert sorted(os.listdir(top)) == sorted([sifs[0], sifs[0][:-4] + ".lock"])


def test_concurrent_runs_of_one_ref_share_one_pull(registry):
    import test_pull
    from hpcrun_testlib import spawn

    env = test_pull.cache_env("refcache-race")
    procs = [spawn("exec", f"docker://{registry}/test/busybox:v1", "echo", "ok", env=env) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs) and [o for o, _ in outs] == ["ok\n"] * 3, outs
    top = os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "sif")
    assert len([n for n in os.listdir(top) if n.endswith(".sif")]) == 1
    assert not [n for n in os.listdir(top) if n.startswith(".")], os.listdir(top)  # no temp left


def test_library_and_shub_refs_refused_in_one_line(images):
    for ref, why in (("library://alpine:3", "library is not supported"), ("shub://a/b", "Singularity Hub")):
        r = hpcrun("exec", ref, "true")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert ref in r.stderr and why in r.stderr and "docker://" in r.stderr, r.stderr


def _retagged_layout(src, dst, greeting):
    """A copy of the OCI layout src whose image config says GREETING=greeting."""
    import hashlib
    import json
    import shutil

    shutil.copytree(src, dst)

    def blob(digest):
        with open(os.path.join(dst, "blobs", "sha256", digest[7:]), "rb") as f:
            return json.load(f)

    def put(obj):
        data = json.dumps(obj).encode()
        hexd = hashlib.sha256(data).hexdigest()
        with open(os.path.join(dst, "blobs", "sha256", hexd), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + hexd, "size": len(data)}

    with open(os.path.join(dst, "index.json")) as f:
        index = json.load(f)
    manifest = blob(index["manifests"][0]["digest"])
    config = blob(manifest["config"]["digest"])
    config["config"]["Env"] = ["PATH=/bin:/usr/bin", f"GREETING={greeting}"]
    manifest["config"].update(put(config))
    index["manifests"][0].update(put(manifest))
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump(index, f)


def test_moving_tag_is_resolved_again(registry, utmp):
    import subprocess
    import test_pull

    env = test_pull.cache_env("refcache-moving")
    ref = f"docker://{registry}/test/busybox:moving"
    layout = os.path.join(WORK, "registry-layout")  # what the registry fixture pushed as v1
    moved = str(utmp / "moved")
    _retagged_layout(layout, moved, "moved")
    for src, want in ((layout, "it's oci"), (moved, "moved")):
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{src}:v1", ref], check=True)
        r = hpcrun("exec", ref, "sh", "-c", 'echo "$GREETING"', env=env)
        assert (r.returncode, r.stdout.strip()) == (0, want), r.stderr
    top = os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "sif")
    assert len([n for n in os.listdir(top) if n.endswith(".sif")]) == 2
    r = hpcrun("inspect", ref, env=env)
    assert r.returncode == 0 and "test-image" in r.stdout, r.stderr


def test_pwd_follows_where_the_command_starts(images, utmp):
    # --contain: the host directory is not there, the command starts in the home (as Apptainer's)
    env = env_of(hpcrun("exec", "--contain", images["plain"], "env", cwd=str(utmp), env={"PWD": str(utmp)}))
    assert env["PWD"] == env["HOME"]
    r = hpcrun("exec", "--contain", images["plain"], "pwd", cwd=str(utmp))
    assert r.stdout.strip() == env["HOME"], r.stderr


def test_sif_cache_of_another_user_is_refused(registry, bdir):
    import pwd
    import test_pull
    from hpcrun_testlib import USER, user

    other = pwd.getpwnam(USER + "2")
    for name, owner, mode in (("planted", other, 0o755), ("open", user(), 0o777)):
        env = test_pull.cache_env("refcache-" + name)
        top = os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "sif")
        os.makedirs(top)
        for d in (os.path.dirname(os.path.dirname(top)), os.path.dirname(top)):
            os.chown(d, user().pw_uid, user().pw_gid)
        os.chown(top, owner.pw_uid, owner.pw_gid)
        os.chmod(top, mode)  # another user's, or open to all: a SIF could be swapped in
        r = hpcrun("exec", f"docker://{registry}/test/busybox:v1", "true", env=env)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert top in r.stderr and ("another user" in r.stderr or "writable by others" in r.stderr), r.stderr
