"""Issue 9 acceptance: the workflow tools that call Apptainer, run end to end as the test
user with `apptainer`/`singularity` on PATH: Snakemake, cwltool, spython, ReFrame (real
clients, installed by tests/setup-host.sh) and the command lines Nextflow generates (replayed:
Nextflow needs Java and a launcher from the internet). Every command runs inside an image
that only these tests build: /etc/os-release says ID=hpcrun-wf and /opt/wf-marker exists."""

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import textwrap

import pytest

from hpcrun_testlib import HPCRUN, WORK, as_user, make_rootfs, user_env
from test_build import _blob, write_oci_index
from test_pull import start_registry

VENV_BIN = os.path.dirname(HPCRUN)
MARKER = "made-for-workflow-tests"
OS_ID = "ID=hpcrun-wf"
LABEL = "hpcrun-wf-image"


def need_client(name):
    path = os.path.join(VENV_BIN, name)
    if not os.path.exists(path):  # setup-host.sh installs them: a missing one is a broken setup
        pytest.fail(f"{path} missing: run tests/setup-host.sh (it installs the workflow clients)")
    return path


def add_bash(root):
    """/bin/bash with its libraries: Snakemake, ReFrame and Nextflow run `bash -c`."""
    out = subprocess.run(["ldd", "/bin/bash"], capture_output=True, text=True, check=True).stdout
    libs = [w for line in out.splitlines() for w in line.split() if w.startswith("/")]
    for src in ["/bin/bash", *libs]:
        dst = root + src
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            os.unlink(dst)
        shutil.copy(os.path.realpath(src), dst)


def wf_rootfs(root):
    make_rootfs(root)
    add_bash(root)
    with open(os.path.join(root, "etc/os-release"), "w") as f:
        f.write(f'NAME="hpcrun workflow test"\n{OS_ID}\n')
    with open(os.path.join(root, "opt/wf-marker"), "w") as f:
        f.write(MARKER + "\n")
    with open(os.path.join(root, ".singularity.d/labels.json"), "w") as f:
        json.dump({"org.label-schema.name": LABEL}, f)


def oci_layout(path, root):
    """`root` as a one-layer OCI image without entrypoint (cwltool runs `apptainer run IMG cmd`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=".", filter=lambda ti: None if ".singularity.d" in ti.name else ti)
    layer = dict(_blob(path, gzip.compress(buf.getvalue())), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"], "Labels": {"name": LABEL}},
    }
    write_oci_index(path, json.dumps(cfg).encode(), [layer], "v1")


@pytest.fixture(scope="module")
def wf(images):
    """{'sandbox', 'sif', 'layout', 'path'}: the workflow image, and the PATH the clients get."""
    from hpcrun.images.sif import write_sif

    top = os.path.join(WORK, "wf")
    shutil.rmtree(top, ignore_errors=True)
    root, sqfs, sif, layout = (os.path.join(top, n) for n in ("rootfs", "wf.sqfs", "wf.sif", "layout"))
    wf_rootfs(root)
    subprocess.run(
        ["mksquashfs", root, sqfs, "-noappend", "-quiet", "-all-root", "-no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    write_sif(sif, sqfs)
    oci_layout(layout, root)
    # Until hpcrun installs `apptainer` and `singularity` itself (issue 9), stand-ins:
    # symlinks to hpcrun. Once the venv has the real commands, the clients find those in
    # VENV_BIN and these tests run the real thing.
    bin_dir = os.path.join(top, "bin")
    os.makedirs(bin_dir)
    for name in ("apptainer", "singularity"):
        if not os.path.exists(os.path.join(VENV_BIN, name)):
            os.symlink(HPCRUN, os.path.join(bin_dir, name))
    subprocess.run(["chmod", "-R", "a+rX", top], check=True)
    return {"sandbox": root, "sif": sif, "layout": layout, "path": f"{bin_dir}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"}


@pytest.fixture(scope="module")
def wf_registry(wf, images):
    """The loopback registry of test_pull with the workflow image as test/wf:v1."""
    proc, host = start_registry(os.path.join(WORK, "wf-registry"), images)
    try:
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{wf['layout']}:v1",
                f"docker://{host}/test/wf:v1",
            ],
            check=True,
        )
        yield host
    finally:
        proc.terminate()
        proc.wait(10)


def run_client(wf, argv, cwd, env=None, timeout=120):
    """A client as the test user, with apptainer/singularity on its PATH."""
    env = user_env({"PATH": wf["path"], "XDG_CACHE_HOME": os.path.join(str(cwd), ".cache"), **(env or {})})
    return subprocess.run(as_user(argv), env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


def write(path, text, mode=0o644):
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)


def shown(r):
    """The end of a client's output: where it says which apptainer command failed."""
    return f"rc={r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-4000:]}"


def assert_ran_in_image(text):
    assert OS_ID in text.splitlines() and MARKER in text.splitlines(), text


# ---- Snakemake: container: + --sdm apptainer ----

SNAKE_RULE = """
rule {name}:
    output: "{name}.txt"
    container: "{image}"
    shell: "grep ^ID= /etc/os-release > {{output}}; cat /opt/wf-marker >> {{output}}"
"""


def snakefile(**images):
    """rule all + one rule per name=image, each writing NAME.txt from inside its image."""
    targets = ", ".join(f'"{name}.txt"' for name in images)
    return f"rule all:\n    input: {targets}\n" + "".join(SNAKE_RULE.format(name=n, image=i) for n, i in images.items())


def snakemake(wf, bdir):
    return run_client(
        wf, [need_client("snakemake"), "--cores", "1", "--sdm", "apptainer", "--snakefile", "Snakefile"], bdir
    )


def test_snakemake_local_sif(wf, bdir):
    write(bdir / "Snakefile", snakefile(local=wf["sif"]))
    r = snakemake(wf, bdir)
    assert r.returncode == 0, shown(r)
    assert_ran_in_image((bdir / "local.txt").read_text())


def test_snakemake_docker_image(wf, wf_registry, bdir):
    write(bdir / "Snakefile", snakefile(local=wf["sif"], remote=f"docker://{wf_registry}/test/wf:v1"))
    r = snakemake(wf, bdir)
    assert r.returncode == 0, shown(r)
    assert_ran_in_image((bdir / "local.txt").read_text())
    assert_ran_in_image((bdir / "remote.txt").read_text())


# ---- cwltool: DockerRequirement under --singularity ----

CWL_TOOL = """\
    cwlVersion: v1.2
    class: CommandLineTool
    requirements:
      DockerRequirement:
        dockerPull: {host}/test/wf:v1
    baseCommand: [cat]
    arguments: [/etc/os-release, /opt/wf-marker]
    inputs:
      extra:
        type: File
        inputBinding: {{position: 1}}
    outputs:
      out:
        type: stdout
    stdout: out.txt
"""


def test_cwltool_docker_requirement(wf, wf_registry, bdir):
    write(bdir / "tool.cwl", CWL_TOOL.format(host=wf_registry))
    write(bdir / "input.txt", "from-the-host-input\n")
    (bdir / "sifcache").mkdir()
    os.chmod(bdir / "sifcache", 0o777)
    r = run_client(
        wf,
        [
            need_client("cwltool"),
            "--singularity",
            "--outdir",
            str(bdir / "out"),
            "--tmpdir-prefix",
            str(bdir / "tmp") + "/",
            "--tmp-outdir-prefix",
            str(bdir / "tmpout") + "/",
            "tool.cwl",
            "--extra",
            str(bdir / "input.txt"),
        ],
        bdir,
        env={"CWL_SINGULARITY_CACHE": str(bdir / "sifcache")},
    )
    assert r.returncode == 0, shown(r)
    text = (bdir / "out" / "out.txt").read_text()
    assert_ran_in_image(text)
    assert "from-the-host-input" in text.splitlines(), text


# ---- spython: Singularity's Python client ----


def spython(wf, cwd, code):
    """Run `code` with spython's Client; it prints one JSON line that is returned decoded."""
    prog = "import json, sys\nfrom spython.main import Client\n" + textwrap.dedent(code)
    r = run_client(wf, [os.path.join(VENV_BIN, "python"), "-c", prog], cwd)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, shown(r)
    try:
        return json.loads(lines[-1])
    except ValueError:
        pytest.fail("spython printed no result:\n" + shown(r))


def test_spython_version_and_execute(wf, bdir):
    need_client("spython")
    out = spython(
        wf,
        bdir,
        f"""\
        v = Client.version()
        r = Client.execute({wf["sif"]!r}, ["cat", "/opt/wf-marker"], return_result=True)
        print(json.dumps({{"version": v, "exec": r}}))
    """,
    )
    # what cwltool's parser wants of `--version`; spython returns the failed result (a dict) on errors
    assert isinstance(out["version"], str) and re.match(r"(.+) version ([0-9.]+)", out["version"]), out
    assert out["exec"]["return_code"] == 0, out
    assert MARKER in "".join(out["exec"]["message"]), out


def test_spython_inspect(wf, bdir):
    out = spython(wf, bdir, f"print(json.dumps(Client.inspect({wf['sif']!r})))")
    attrs = out.get("attributes", out) if isinstance(out, dict) else {}
    labels = attrs.get("labels") or {}
    assert labels.get("org.label-schema.name") == LABEL, out
    assert "runscript" in (attrs.get("runscript") or ""), out


def test_spython_build_from_sandbox_and_docker(wf, wf_registry, bdir):
    out = spython(
        wf,
        bdir,
        f"""\
        a = Client.build(recipe={wf["sandbox"]!r}, image={str(bdir / "a.sif")!r}, sudo=False)
        b = Client.build(recipe="docker://{wf_registry}/test/wf:v1", image={str(bdir / "b.sif")!r}, sudo=False)
        print(json.dumps([a, b]))
    """,
    )
    for name in ("a.sif", "b.sif"):
        assert (bdir / name).exists(), f"spython build made no {name}: {out}"
        r = run_client(wf, ["apptainer", "exec", str(bdir / name), "cat", "/etc/os-release", "/opt/wf-marker"], bdir)
        assert r.returncode == 0, shown(r)
        assert_ran_in_image(r.stdout)


def test_spython_instance(wf, bdir):
    """Instances come later in issue 9: until then this fails, saying so."""
    out = spython(
        wf,
        bdir,
        f"""\
        inst = Client.instance({wf["sif"]!r}, name="wf9inst", start=True)
        listed = [i.name for i in Client.instances(quiet=True) or []] if inst else []
        r = Client.execute(inst, ["cat", "/opt/wf-marker"], return_result=True) if inst else None
        stopped = inst.stop() if inst else None
        print(json.dumps({{"started": bool(inst), "listed": listed, "exec": r, "stopped": stopped}}))
    """,
    )
    assert out["started"] and "wf9inst" in out["listed"], (
        f"`apptainer instance start/list` does not work yet (issue 9, instances): {out}"
    )
    assert out["exec"]["return_code"] == 0 and MARKER in "".join(out["exec"]["message"]), out
    assert out["stopped"] == 0, out


# ---- ReFrame: a containerized check ----

RFM_CONFIG = """\
    site_configuration = {
        'systems': [{
            'name': 'wfsys', 'descr': 'hpcrun workflow tests', 'hostnames': ['.*'],
            'partitions': [{
                'name': 'local', 'scheduler': 'local', 'launcher': 'local', 'environs': ['wfenv'],
                'container_platforms': [{'type': 'Apptainer'}],
            }],
        }],
        'environments': [{'name': 'wfenv', 'cc': 'cc', 'cxx': '', 'ftn': ''}],
    }
"""

RFM_CHECK = """\
    import reframe as rfm
    import reframe.utility.sanity as sn


    @rfm.simple_test
    class WfContainerCheck(rfm.RunOnlyRegressionTest):
        valid_systems = ['*']
        valid_prog_environs = ['*']
        container_platform = 'Apptainer'

        @run_before('run')
        def set_image(self):
            self.container_platform.image = {sif!r}
            self.container_platform.command = "bash -c 'grep ^ID= /etc/os-release; cat /opt/wf-marker; pwd'"

        @sanity_function
        def from_the_container(self):
            return sn.all([sn.assert_found(r'^{os_id}$', self.stdout),
                           sn.assert_found(r'^{marker}$', self.stdout),
                           sn.assert_found(r'^/rfm_workdir$', self.stdout)])
"""


def test_reframe_containerized_check(wf, bdir):
    write(bdir / "config.py", RFM_CONFIG)
    write(bdir / "check.py", RFM_CHECK.format(sif=wf["sif"], os_id=OS_ID, marker=MARKER))
    r = run_client(
        wf,
        [need_client("reframe"), "-C", "config.py", "-c", "check.py", "-r", "--prefix", str(bdir / "rfm")],
        bdir,
        env={"RFM_REPORT_FILE": str(bdir / "report.json"), "TMPDIR": str(bdir)},
    )  # its log file
    stage_out = ""
    for dirpath, _, files in os.walk(bdir / "rfm"):
        for name in files:
            if name.endswith((".out", ".err")):
                stage_out += f"--- {name}\n" + open(os.path.join(dirpath, name)).read()
    assert r.returncode == 0, shown(r) + "\n" + stage_out[-3000:]
    with open(bdir / "report.json") as f:  # not the summary line: ReFrame colours it on some terminals
        cases = json.load(f)["runs"][0]["testcases"]
    assert [c["result"] for c in cases] == ["pass"], shown(r)


# ---- Nextflow: the command lines it generates, replayed ----


def nextflow_launch(img, workdir, env_exports='SINGULARITYENV_X="1" '):
    """BashWrapperBuilder + SingularityBuilder (nextflow-io/nextflow 2aad02f, see its
    BashWrapperBuilderTest): the launch line of .command.run, env vars then the run command."""
    return (
        'set +u; env - PATH="$PATH" ${TMP:+SINGULARITYENV_TMP="$TMP"} ${TMPDIR:+SINGULARITYENV_TMPDIR="$TMPDIR"} '
        '${NXF_TASK_WORKDIR:+SINGULARITYENV_NXF_TASK_WORKDIR="$NXF_TASK_WORKDIR"} '
        + env_exports
        + f"singularity exec --no-home --pid -B {workdir} {img} "
        f'/bin/bash -c "cd \\"$NXF_TASK_WORKDIR\\"; /bin/bash -ue {workdir}/.command.sh"'
    )


def test_nextflow_pull(wf, wf_registry, bdir):
    """SingularityCache.groovy: `singularity pull --name TMP URL`, in the cache directory."""
    cache = bdir / "singularity"
    cache.mkdir()
    os.chmod(cache, 0o777)
    img = cache / f"{wf_registry.replace(':', '-')}-test-wf-v1.img"
    write(
        bdir / "pull.sh",
        f"cd {cache}\nsingularity pull  --name {img.name}.pulling "
        f"docker://{wf_registry}/test/wf:v1 > /dev/null && mv {img.name}.pulling {img.name}\n",
    )
    r = run_client(wf, ["bash", str(bdir / "pull.sh")], bdir)
    assert r.returncode == 0 and img.exists(), shown(r)
    r = run_client(wf, ["singularity", "exec", str(img), "cat", "/etc/os-release", "/opt/wf-marker"], bdir)
    assert r.returncode == 0, shown(r)
    assert_ran_in_image(r.stdout)


def test_nextflow_task(wf, bdir):
    """A task's .command.run launch line on a pulled image (a local SIF here)."""
    workdir = bdir / "work" / "ab" / "cdef"
    workdir.mkdir(parents=True)
    for d in (bdir / "work", bdir / "work" / "ab", workdir):
        os.chmod(d, 0o777)
    write(
        workdir / ".command.sh",
        """\
        #!/bin/bash -ue
        grep ^ID= /etc/os-release > out.txt
        cat /opt/wf-marker >> out.txt
        echo "X=$X" >> out.txt
        echo "PWD=$PWD" >> out.txt
        echo "pids=$(ls /proc | grep -c '^[0-9]')" >> out.txt
    """,
        0o755,
    )
    write(
        workdir / ".command.run",
        f"""\
        #!/bin/bash
        set -e
        cd {workdir}
        export NXF_TASK_WORKDIR="$PWD"
        {nextflow_launch(wf["sif"], workdir)}
    """,
        0o755,
    )
    r = run_client(wf, ["bash", str(workdir / ".command.run")], bdir)
    assert r.returncode == 0, shown(r)
    lines = (workdir / "out.txt").read_text().splitlines()
    assert_ran_in_image("\n".join(lines))
    assert "X=1" in lines and f"PWD={workdir}" in lines, lines
    # --pid: the task sees only its own processes (bash, the command substitution's ls/grep)
    pids = int([line for line in lines if line.startswith("pids=")][0][5:])
    assert pids < 10, lines
    # a failing task: its status comes back through singularity
    write(workdir / ".command.sh", "#!/bin/bash -ue\nexit 3\n", 0o755)
    r = run_client(wf, ["bash", str(workdir / ".command.run")], bdir)
    assert r.returncode == 3, shown(r)
