"""The installed commands (hpcrun/scripts): one sh script under four names that runs
hpcrun-main as `python -IS`, and hpcrun-main finding its packages without site. Each test
lays out a virtual environment as pip would (bin/ with the scripts, hpcrun-main's first
line rewritten to the interpreter, lib/pythonX.Y/site-packages) around this checkout."""

import importlib
import os
import subprocess
import sys

import pytest

from hpcrun import __version__
from hpcrun.options import APPTAINER_VERSION

TREE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPTS = os.path.join(TREE, "hpcrun", "scripts")
PY = "python{}.{}".format(*sys.version_info[:2])


def make_venv(top, install="editable", system_site=False):
    """A venv at top. install: editable (a .pth naming the checkout), wheel (the package
    in site-packages), none. Returns the bin directory."""
    bindir = os.path.join(top, "bin")
    sp = os.path.join(top, "lib", PY, "site-packages")
    os.makedirs(bindir)
    os.makedirs(sp)
    os.symlink(os.path.realpath(sys.executable), os.path.join(bindir, "python3"))
    with open(os.path.join(top, "pyvenv.cfg"), "w") as f:
        f.write(f"home = {os.path.dirname(os.path.realpath(sys.executable))}\n")
        f.write(f"include-system-site-packages = {'true' if system_site else 'false'}\n")
    with open(os.path.join(SCRIPTS, "hpcrun-main")) as f:
        main = f.read().split("\n", 1)[1]
    with open(os.path.join(bindir, "hpcrun-main"), "w") as f:
        f.write(f"#!{bindir}/python3\n{main}")  # what pip does to `#!python`
    for name in ("hpcrun", "apptainer", "singularity", "run-singularity"):
        with open(os.path.join(SCRIPTS, "hpcrun")) as src, open(os.path.join(bindir, name), "w") as f:
            f.write(src.read())
    for name in ("hpcrun-main", "hpcrun", "apptainer", "singularity", "run-singularity"):
        os.chmod(os.path.join(bindir, name), 0o755)  # not python3: a link to the system's
    # a .pth file that site would run: the fast path never does
    with open(os.path.join(sp, "zz-marker.pth"), "w") as f:
        f.write(f"import os; open({os.path.join(top, 'site-ran')!r}, 'w').close()\n")
    for mod in ("yaml", "click"):  # the dependencies, as pip installs them beside hpcrun
        pkg = os.path.dirname(importlib.import_module(mod).__file__)
        os.symlink(pkg, os.path.join(sp, os.path.basename(pkg)))
    if install == "editable":
        with open(os.path.join(sp, f"__editable__.hpcrun-{__version__}.pth"), "w") as f:
            f.write(TREE + "\n")
    elif install == "wheel":
        os.symlink(os.path.join(TREE, "hpcrun"), os.path.join(sp, "hpcrun"))
    return bindir


def run(argv, **kw):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"), **kw.pop("env", {})}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, **kw)


@pytest.mark.parametrize("install", ["editable", "wheel"])
def test_commands_run_without_site_and_say_their_name(tmp_path, install):
    bindir = make_venv(str(tmp_path / "venv"), install)
    r = run([f"{bindir}/hpcrun", "--version"])
    assert (r.returncode, r.stdout, r.stderr) == (0, f"hpcrun version {__version__}\n", "")
    for name in ("apptainer", "singularity"):
        r = run([f"{bindir}/{name}", "--version"])
        assert r.stdout == f"apptainer version {APPTAINER_VERSION}+hpcrun.{__version__}\n", r.stderr
    r = run([f"{bindir}/apptainer", "exec", "--bogus", "x", "true"])
    assert r.stderr.startswith("apptainer: ") or "apptainer" in r.stderr.splitlines()[0], r.stderr
    assert not (tmp_path / "venv" / "site-ran").exists(), "site ran: the commands pay for it"


def test_run_singularity_runs_the_image(tmp_path):
    bindir = make_venv(str(tmp_path / "venv"))
    r = run([f"{bindir}/run-singularity", str(tmp_path / "missing.sif")])
    assert r.returncode == 252, r.stderr  # `run IMAGE`: the image is missing
    assert "missing.sif" in r.stderr


def test_a_link_to_a_command_finds_its_program(tmp_path):
    bindir = make_venv(str(tmp_path / "venv"))
    other = tmp_path / "local-bin"
    other.mkdir()
    os.symlink(f"{bindir}/singularity", other / "singularity")
    os.symlink(str(other / "singularity"), other / "apptainer")  # a link to a link
    for name in ("singularity", "apptainer"):
        r = run([str(other / name), "--version"])
        assert r.returncode == 0 and r.stdout.startswith("apptainer version "), r.stderr
    r = run(["singularity", "--version"], env={"PATH": f"{other}:/usr/bin:/bin"})  # found on PATH
    assert r.returncode == 0 and r.stdout.startswith("apptainer version "), r.stderr


def test_the_callers_python_variables_and_directory_change_nothing(tmp_path):
    """-I: a PYTHONPATH or current directory holding another `hpcrun` is not used."""
    bindir = make_venv(str(tmp_path / "venv"))
    fake = tmp_path / "fake" / "hpcrun"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit('the fake hpcrun ran')\n")
    env = {"PYTHONPATH": str(tmp_path / "fake"), "PYTHONSTARTUP": str(fake / "__init__.py")}
    r = run([f"{bindir}/hpcrun", "--version"], env=env, cwd=str(tmp_path / "fake"))
    assert (r.returncode, r.stdout) == (0, f"hpcrun version {__version__}\n"), r.stderr


def test_without_a_package_in_the_venv_site_finds_it(tmp_path):
    """The fallback: what only site knows (here a .pth with an import line) still works."""
    bindir = make_venv(str(tmp_path / "venv"), install="none")
    sp = tmp_path / "venv" / "lib" / PY / "site-packages"
    (sp / "finder.pth").write_text(f"import sys; sys.path.append({TREE!r})\n")
    r = run([f"{bindir}/hpcrun", "--version"])
    assert (r.returncode, r.stdout) == (0, f"hpcrun version {__version__}\n"), r.stderr
    assert (tmp_path / "venv" / "site-ran").exists()


def test_hpcrun_main_run_directly_works(tmp_path):
    bindir = make_venv(str(tmp_path / "venv"))
    r = run([f"{bindir}/hpcrun-main", "--version"])
    assert (r.returncode, r.stdout) == (0, f"hpcrun version {__version__}\n"), r.stderr


def test_a_missing_program_is_one_line(tmp_path):
    bindir = make_venv(str(tmp_path / "venv"))
    os.unlink(f"{bindir}/hpcrun-main")
    r = run([f"{bindir}/hpcrun", "--version"])
    assert r.returncode == 255
    assert r.stderr.startswith("hpcrun: error: cannot read ") and r.stderr.count("\n") == 1, r.stderr
