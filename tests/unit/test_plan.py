"""hpcrun.plan.build_plan: pure planning from options + config + host facts."""

import json
import os

import pytest
import yaml

from hpcrun import options
from hpcrun.errors import UsageError
from hpcrun.plan import Host, build_plan, expand_scratch, under

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "hpcrun.yaml")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture
def cfg():
    with open(CONF, encoding="utf-8") as f:
        return yaml.safe_load(f)


def host(cwd="/data/proj", env=None, existing=(), **kw):
    env = {"HOME": "/home/u", "USER": "u", "LANG": "C.UTF-8", "TERM": "xterm", "SECRET": "s", **(env or {})}
    exists = set(existing)
    return Host(
        1000,
        100,
        "u",
        "users",
        "/home/u",
        cwd,
        gecos="U Ser",
        shell="/bin/bash",
        env=env,
        existing=lambda p: p in exists,
        **kw,
    )


def plan(cfg, h=None, action="exec", image="/images/app.sif", args=("true",), env_files=(), **opts):
    o = options.defaults()
    for k, v in opts.items():
        assert k in o, k
        o[k] = v
    return build_plan(o, action, image, "sif", list(args), cfg, h or host(), env_files)


def by_dst(p):
    return {m.dst: m for m in p.mounts}


def names(p):
    return [m.name for m in p.mounts]


def test_default_mounts(cfg):
    p = plan(cfg)
    m = by_dst(p)
    for name, path in [
        ("proc", "/proc"),
        ("sys", "/sys"),
        ("dev", "/dev"),
        ("hosts", "/etc/hosts"),
        ("localtime", "/etc/localtime"),
        ("resolv", "/etc/resolv.conf"),
        ("tmp", "/tmp"),
        ("tmp", "/var/tmp"),
    ]:
        assert m[path].name == name and m[path].kind == "bind" and m[path].src == path
        assert m[path].optional is True
    assert m["/dev"].nodev is False and m["/proc"].nodev is True
    assert m["/home/u"].name == "home" and m["/home/u"].src == "/home/u" and m["/home/u"].kind == "bind"
    assert m["/data/proj"].name == "cwd" and m["/data/proj"].if_missing is True
    assert sorted(names(p)) == sorted(
        ["proc", "sys", "dev", "hosts", "localtime", "resolv", "tmp", "tmp", "home", "cwd"]
    )
    assert all(not x.readonly for x in p.mounts)


def test_plan_basics(cfg):
    p = plan(cfg, args=["ls", "-l"])
    assert p.action == "exec" and p.args == ["ls", "-l"] and p.image == "/images/app.sif"
    assert p.image_kind == "sif"
    assert (p.uid, p.gid, p.user, p.group, p.home) == (1000, 100, "u", "users", "/home/u")
    assert p.passwd_line == "u:x:1000:100:U Ser:/home/u:/bin/bash"
    assert p.group_line == "users:x:100:u"
    assert p.idmap == {"mode": "self", "uid": 1000, "gid": 100, "subuid": None, "subgid": None}
    assert p.cwd == "/data/proj" and p.pwd_given is False
    assert p.namespaces == {"pid": False, "ipc": False, "uts": False, "net": False}
    assert p.writable is False and p.unsquash is False and p.tmpfs_size == "64m"
    assert p.new_proc is False
    assert p.env["HOME"] == "/home/u" and p.env["PATH"] == DEFAULT_PATH
    assert p.env["HPCRUN_CONTAINER"] == "/images/app.sif" and p.env["HPCRUN_NAME"] == "app.sif"
    assert p.env["APPTAINER_NAME"] == "app.sif"
    assert "PS1" not in p.env
    d = p.to_dict()
    assert json.loads(json.dumps(d))["mounts"][0]["dst"] == "/proc"


def test_shell_sets_prompt(cfg):
    assert plan(cfg, action="shell").env["PS1"] == "hpcrun> "


def test_no_mount_home_tmp(cfg):
    p = plan(cfg, no_mount=["home,tmp"])
    dsts = by_dst(p)
    assert "/home/u" not in dsts and "/tmp" not in dsts and "/var/tmp" not in dsts
    assert "proc" in names(p) and "cwd" in names(p)
    p = plan(cfg, no_mount=["home", "tmp"])
    assert "home" not in names(p) and "tmp" not in names(p)


def test_no_mount_by_path(cfg):
    p = plan(cfg, no_mount=["/etc/hosts,/var/tmp/"])
    dsts = by_dst(p)
    assert "/etc/hosts" not in dsts and "/var/tmp" not in dsts and "/tmp" in dsts


@pytest.mark.parametrize("name", ["homes", "TMP", "pts", "x/y"])
def test_no_mount_unknown_name(cfg, name):
    with pytest.raises(UsageError) as ei:
        plan(cfg, no_mount=[f"home,{name}"])
    assert name in ei.value.message


def test_config_mounts_false_skips(cfg):
    cfg["mounts"]["sys"] = False
    cfg["mounts"]["cwd"] = False
    p = plan(cfg)
    assert "sys" not in names(p) and "cwd" not in names(p) and "proc" in names(p)


@pytest.mark.parametrize("flag", ["contain", "containall"])
def test_contain(cfg, flag):
    p = plan(cfg, **{flag: True})
    tmpfs = {m.dst for m in p.mounts if m.kind == "tmpfs"}
    assert {"/tmp", "/var/tmp"} <= tmpfs
    binds = {m.dst for m in p.mounts if m.kind == "bind"}
    assert "/tmp" not in binds and "/var/tmp" not in binds
    assert "/home/u" not in binds and "/data/proj" not in binds
    assert "cwd" not in names(p)
    # home is an empty in-memory directory, as in Apptainer
    assert by_dst(p)["/home/u"].kind == "tmpfs"
    assert "proc" in names(p) and "dev" in names(p)


def test_contain_with_no_home_has_no_home_at_all(cfg):
    p = plan(cfg, contain=True, no_home=True)
    assert "/home/u" not in by_dst(p)


def test_contain_with_home_option_binds_it(cfg):
    p = plan(cfg, contain=True, home="/scratch/u/h:/home/u")
    m = by_dst(p)["/home/u"]
    assert (m.kind, m.src) == ("bind", "/scratch/u/h")


def test_cleanenv_keeps_term_and_proxies_as_apptainer(cfg):
    # internal/pkg/util/env/create.go alwaysPassKeys: TERM and the proxy variables
    h = host(env={"https_proxy": "http://proxy:3128", "NO_PROXY": "localhost"})
    p = plan(cfg, h, cleanenv=True)
    assert p.env["https_proxy"] == "http://proxy:3128" and p.env["NO_PROXY"] == "localhost"
    assert "SECRET" not in p.env


def test_containall(cfg):
    p = plan(cfg, containall=True)
    assert p.namespaces["pid"] and p.namespaces["ipc"]
    assert p.new_proc is True
    assert "SECRET" not in p.env and p.env["TERM"] == "xterm" and p.env["LANG"] == "C.UTF-8"


def test_no_home(cfg):
    p = plan(cfg, no_home=True)
    assert "home" not in names(p)
    assert p.env["HOME"] == "/home/u"


def test_home_option_src_dst(cfg):
    p = plan(cfg, home="/data/myhome:/home/other")
    m = by_dst(p)["/home/other"]
    assert (m.name, m.kind, m.src) == ("home", "bind", "/data/myhome")
    assert "/home/u" not in by_dst(p)
    assert p.env["HOME"] == "/home/other" and p.home == "/home/other"
    assert p.passwd_line.endswith(":/home/other:/bin/bash")


def test_home_option_src_only_relative(cfg):
    p = plan(cfg, home="h")
    m = by_dst(p)["/data/proj/h"]
    assert m.name == "home" and m.src == "/data/proj/h"
    assert p.env["HOME"] == "/data/proj/h"


def test_home_option_relative_destination(cfg):
    with pytest.raises(UsageError):
        plan(cfg, home="/data/h:rel")


def test_cwd_under_home_not_bound_separately(cfg):
    p = plan(cfg, host(cwd="/home/u/src/x"))
    assert "cwd" not in names(p)
    assert p.cwd == "/home/u/src/x"


@pytest.mark.parametrize("cwd", ["/usr/share", "/usr", "/etc/x", "/", "/var/lib/y", "/root"])
def test_cwd_in_system_dir_not_bound(cfg, cwd):
    p = plan(cfg, host(cwd=cwd))
    assert "cwd" not in names(p)
    assert p.cwd == cwd


def test_cwd_under_tmp_covered(cfg):
    p = plan(cfg, host(cwd="/tmp/job"))
    assert "cwd" not in names(p)


def test_cwd_similar_prefix_is_not_system(cfg):
    # /usrdata is not under /usr; /home/u2 is not under /home/u
    assert [m.src for m in plan(cfg, host(cwd="/usrdata")).mounts if m.name == "cwd"] == ["/usrdata"]
    assert [m.src for m in plan(cfg, host(cwd="/home/u2")).mounts if m.name == "cwd"] == ["/home/u2"]


def test_pwd_option_disables_cwd_bind(cfg):
    p = plan(cfg, pwd="/work")
    assert p.cwd == "/work" and p.pwd_given is True
    assert "cwd" not in names(p)


def test_scratch(cfg):
    h = host(env={"TMPDIR": "/local/job1", "SCRATCH": "/gpfs/u"}, existing={"/scratch", "/local/job1", "/gpfs/u"})
    p = plan(cfg, h)
    scratch = [m for m in p.mounts if m.name == "scratch"]
    assert [m.src for m in scratch] == ["/scratch", "/gpfs/u", "/local/job1"]
    assert all(m.src == m.dst and m.optional and m.kind == "bind" for m in scratch)


def test_scratch_nonexistent_and_unset_skipped(cfg):
    p = plan(cfg, host(env={}, existing={"/lustre"}))
    assert [m.src for m in p.mounts if m.name == "scratch"] == ["/lustre"]
    p = plan(cfg, host(env={"TMPDIR": "/nope"}, existing=set()))
    assert "scratch" not in names(p)


def test_scratch_tmpdir_under_tmp_is_covered(cfg):
    p = plan(cfg, host(env={"TMPDIR": "/tmp/job"}, existing={"/tmp/job"}))
    assert "scratch" not in names(p)


def test_scratch_skipped_by_no_mount(cfg):
    h = host(existing={"/scratch", "/lustre"})
    assert "scratch" not in names(plan(cfg, h, no_mount=["scratch"]))
    p = plan(cfg, h, no_mount=["/scratch"])
    assert [m.src for m in p.mounts if m.name == "scratch"] == ["/lustre"]


def test_expand_scratch():
    env = {"A": "/x/../y", "B": "", "C": "rel"}
    assert expand_scratch(["/s", "$A", "${A}", "$B", "$C", "$UNSET", "/s/"], env) == ["/s", "/y"]


def test_under():
    assert under("/a/b", "/a") and under("/a", "/a") and under("/a", "/")
    assert not under("/ab", "/a") and not under("/a", "/a/b")


def test_fakeroot_with_subids(cfg):
    h = host(cwd="/home/u/proj", subuid=(100000, 65536), subgid=(200000, 65536))
    p = plan(cfg, h, fakeroot=True)
    assert (p.uid, p.gid, p.user, p.group, p.home) == (0, 0, "root", "root", "/root")
    assert p.env["HOME"] == "/root" and p.env["USER"] == "root" and p.env["LOGNAME"] == "root"
    assert p.idmap == {"mode": "subid", "uid": 1000, "gid": 100, "subuid": (100000, 65536), "subgid": (200000, 65536)}
    home = by_dst(p)["/root"]
    assert (home.kind, home.src) == ("bind", "/home/u")
    assert p.cwd == "/root/proj"
    assert p.passwd_line is None and p.group_line is None


@pytest.mark.parametrize("subuid,subgid", [(None, None), ((100000, 65536), None), (None, (1, 2))])
def test_fakeroot_without_subids(cfg, subuid, subgid):
    p = plan(cfg, host(subuid=subuid, subgid=subgid), fakeroot=True)
    assert p.uid == 0 and p.idmap["mode"] == "root"
    assert p.cwd == "/data/proj"


def test_user_binds_from_options_and_env(cfg):
    h = host(env={"HPCRUN_BIND": "/e1:/mnt/e1:ro", "APPTAINER_BIND": "/e2,rel:/r"})
    binds = ["/o1", "/o2:/mnt/o2:ro"]  # APPTAINER_BIND is appended by options.apply_env
    options.apply_env(options.OPTIONS, "exec", {"bind": binds}, h.env, None)
    p = plan(cfg, h, bind=binds)
    user = [(m.src, m.dst, m.readonly) for m in p.mounts if m.name == "user"]
    assert user == [  # shallowest destination first, else in the order given
        ("/o1", "/o1", False),
        ("/e2", "/e2", False),
        ("/data/proj/rel", "/r", False),
        ("/o2", "/mnt/o2", True),
        ("/e1", "/mnt/e1", True),
    ]
    assert all(m.kind == "bind" and not m.optional for m in p.mounts if m.name == "user")
    # the bind variables themselves are not passed into the container; Apptainer's
    # APPTAINER_BIND there lists the destinations (for nested containers)
    assert "HPCRUN_BIND" not in p.env
    assert p.env["APPTAINER_BIND"] == p.env["SINGULARITY_BIND"] == "/o1,/mnt/o2,/e2,/r,/mnt/e1"  # bind order


def test_bad_user_bind(cfg):
    with pytest.raises(UsageError):
        plan(cfg, bind=["/a:rel"])
    with pytest.raises(UsageError):
        plan(cfg, host(env={"HPCRUN_BIND": "/a:/b:bad"}))


def test_pid_and_namespaces(cfg):
    p = plan(cfg, pid=True)
    assert p.namespaces == {"pid": True, "ipc": False, "uts": False, "net": False}
    assert p.new_proc is True
    assert plan(cfg, pid=True, no_mount=["proc"]).new_proc is False
    assert plan(cfg, ipc=True, net=True, uts=True).namespaces == {"pid": False, "ipc": True, "uts": True, "net": True}


def test_hostname_implies_uts(cfg):
    p = plan(cfg, hostname="node1")
    assert p.hostname == "node1" and p.namespaces["uts"] is True


def test_env_options_and_files(cfg):
    p = build_plan(
        {**options.defaults(), "env": ["A=1", "B=2"]},
        "exec",
        "/i/x",
        "squashfs",
        ["t"],
        cfg,
        host(env={"HPCRUN_ENV_A": "0", "C": "host"}),
        [{"B": "file", "D": "file"}],
    )
    assert p.env["A"] == "1" and p.env["B"] == "2" and p.env["D"] == "file" and p.env["C"] == "host"
    assert p.forced == {"A": "1", "B": "2", "D": "file"}


def test_bad_env_option(cfg):
    with pytest.raises(UsageError):
        plan(cfg, env=["1BAD=x"])


def test_fuse_never_and_unsquash(cfg):
    assert plan(cfg, unsquash=True).unsquash is True
    cfg["fuse"] = "never"
    assert plan(cfg).unsquash is True


def test_image_name_from_directory(cfg):
    o = options.defaults()
    p = build_plan(o, "run", "/images/rootfs/", "sandbox", [], cfg, host())
    assert p.env["HPCRUN_NAME"] == "rootfs"


# --- node-level sharing ---------------------------------------------------------------


def test_sharing_is_automatic_in_slurm_steps_only(cfg):
    assert not plan(cfg).share
    assert plan(cfg, host(env={"SLURM_STEP_ID": "0"})).share
    assert not plan(cfg, host(env={"SLURM_JOB_ID": "7"})).share  # a batch script, not a step
    assert not plan(cfg, host(env={"SLURM_STEP_ID": "0"}), no_sharens=True).share
    assert plan(cfg, sharens=True).share
    assert not plan(cfg, sharens=True, unsquash=True).share  # an extracted tree is per process
    assert plan({**cfg, "share": "always"}).share
    assert not plan({**cfg, "share": "never"}, host(env={"SLURM_STEP_ID": "0"})).share


def test_share_key_ignores_what_each_task_may_differ_in(cfg):
    from hpcrun.plan import share_key

    ident = (1, 2, 3, 4, 0)
    a = plan(cfg, host(env={"SLURM_PROCID": "0"}), args=("a",), env=["X=1"], sharens=True)
    b = plan(cfg, host(env={"SLURM_PROCID": "1"}), action="run", args=("b", "c"), pid=True)
    assert share_key(a, ident) == share_key(b, ident)
    assert share_key(a, ident) != share_key(a, (1, 2, 3, 5, 0))  # image replaced
    for other in (
        plan(cfg, bind=["/data:/mnt"]),
        plan(cfg, fakeroot=True),
        plan(cfg, writable_tmpfs=True),
        plan(cfg, net=True),
        plan(cfg, no_mount=["tmp"]),
        plan(cfg, host(cwd="/other")),
    ):
        assert share_key(other, ident) != share_key(a, ident)


def test_expand_scratch_with_a_path_after_the_variable():
    env = {"P": "/var/spool/slurmd/pmix.7.0", "Q": "/q"}
    assert expand_scratch(["$P/..", "${Q}/sub", "${Q", "$UNSET/.."], env) == ["/var/spool/slurmd", "/q/sub"]


def test_pmix_steps_share_one_container(cfg):
    """Two steps of a job differ in PMIX_SERVER_TMPDIR; its parent is bound, so their
    containers are the same."""
    from hpcrun.plan import share_key

    steps = [
        host(
            env={"SLURM_STEP_ID": str(i), "PMIX_SERVER_TMPDIR": f"/spool/pmix.7.{i}", "PMIX_SYSTEM_TMPDIR": "/tmp"},
            existing={"/spool", "/tmp"},
        )
        for i in (0, 1)
    ]
    a, b = (plan(cfg, h) for h in steps)
    assert "/spool" in [m.src for m in a.mounts]
    assert share_key(a, (1,)) == share_key(b, (1,))


def test_container_variables_and_no_eval(cfg):
    o = options.defaults()
    o["no_eval"] = True  # cli9's option; the plan reads it with opts.get
    p = build_plan(o, "shell", "rel/app.sif", "sif", [], cfg, host(env={"PWD": "/x", "OLDPWD": "/y"}))
    assert p.no_eval and p.env["APPTAINER_NO_EVAL"] == p.env["SINGULARITY_NO_EVAL"] == "1"
    assert p.env["APPTAINER_CONTAINER"] == "/data/proj/rel/app.sif" and p.env["SINGULARITY_NAME"] == "app.sif"
    assert p.env["APPTAINER_COMMAND"] == "shell" and p.env["PWD"] == p.cwd and "OLDPWD" not in p.env
    q = plan(cfg)  # without the option (before cli9's merge) values are evaluated
    assert not q.no_eval and "APPTAINER_NO_EVAL" not in q.env and "APPTAINER_BIND" not in q.env


def test_user_binds_shallowest_destination_first(cfg):
    """Apptainer sorts its user binds by destination depth (mount_linux.go, sortedMount):
    -B A:/mnt/sub -B B:/mnt shows A at /mnt/sub, on top of B. Scratch directories come
    before them (ScratchTag < UserbindsTag), so a bind can go inside one."""
    p = plan(cfg, bind=["/a:/mnt/sub/x", "/b:/mnt/sub", "/c:/mnt", "/d:/"], scratch=["/scratch"])
    order = [(m.name, m.dst) for m in p.mounts if m.name in ("user", "scratchdir")]
    assert order == [
        ("scratchdir", "/scratch"),
        ("user", "/"),
        ("user", "/mnt"),
        ("user", "/mnt/sub"),
        ("user", "/mnt/sub/x"),
    ]
    assert p.env["APPTAINER_BIND"] == "/mnt/sub/x,/mnt/sub,/mnt,/"  # as given


@pytest.mark.parametrize("cwd", ["/home/x", "/home/x/sub"])
def test_cwd_in_custom_home_destination_not_bound(cfg, cwd):
    """--home SRC:DST run from DST (or below): the working directory is not bound over
    the home (Apptainer: CWD is not mounted where it is already mounted)."""
    p = plan(cfg, host(cwd=cwd), home="/data/h:/home/x")
    assert "cwd" not in names(p)
    assert by_dst(p)["/home/x"].src == "/data/h"
    assert p.cwd == cwd
    assert [m.dst for m in plan(cfg, host(cwd="/home/xy"), home="/data/h:/home/x").mounts if m.name == "cwd"] == [
        "/home/xy"
    ]


# --- --contain and friends (issue 10), as Apptainer's e2e tables have them -----------


def test_contain_dev_is_minimal(cfg):
    """e2e/config/config.go MountDevMinimal: --contain gives a tmpfs /dev (launcher
    fills it), not the host's; without --contain /dev is the host's."""
    dev = by_dst(plan(cfg, contain=True))["/dev"]
    assert (dev.name, dev.kind, dev.src, dev.nodev) == ("dev", "tmpfs", ("devpts",), False)
    assert by_dst(plan(cfg))["/dev"].kind == "bind"
    # --containall has its own IPC namespace: /dev/mqueue too
    assert by_dst(plan(cfg, containall=True))["/dev"].src == ("devpts", "mqueue")


def test_contain_no_mount_devpts_and_dev(cfg):
    """actionNoMount devpts/dev with testContained."""
    assert by_dst(plan(cfg, contain=True, no_mount=["devpts"]))["/dev"].src == ()
    assert "/dev" not in by_dst(plan(cfg, contain=True, no_mount=["dev"]))


def test_contain_device_binds_get_mount_points(cfg):
    p = plan(cfg, contain=True, bind=["/dev/nvidia0", "/data/x:/mnt"])
    assert by_dst(p)["/dev"].src == ("devpts", ("/dev/nvidia0", "/dev/nvidia0"))
    assert by_dst(p)["/dev/nvidia0"].nodev is False and by_dst(p)["/mnt"].nodev is True


@pytest.mark.parametrize("how", [{"no_mount": ["tmp"]}, {"no_mount": ["home,tmp"]}, "config"])
def test_contain_honours_no_mount_tmp(cfg, how):
    """actionNoMount tmp with testContained: no mount on /tmp or /var/tmp (the image's)."""
    if how == "config":
        cfg["mounts"]["tmp"] = False
        how = {}
    p = plan(cfg, contain=True, **how)
    assert "/tmp" not in by_dst(p) and "/var/tmp" not in by_dst(p)


def test_contain_honours_no_mount_home(cfg):
    """actionNoMount home with testContained: no mount on the home directory."""
    assert "/home/u" not in by_dst(plan(cfg, contain=True, no_mount=["home"]))
    assert "/home/u" not in by_dst(plan(cfg, contain=True, no_mount=["/home/u"]))
    assert "/var/tmp" not in by_dst(plan(cfg, contain=True, no_mount=["/var/tmp"]))


def test_workdir_with_contain(cfg):
    """actionExecMultiProfile WorkdirContain*: DIR/tmp, DIR/var_tmp, DIR/home bound, the
    launcher makes them (plan.workdir); a relative DIR is from the working directory."""
    p = plan(cfg, contain=True, workdir="wd")
    m = by_dst(p)
    for dst, src in (
        ("/tmp", "/data/proj/wd/tmp"),
        ("/var/tmp", "/data/proj/wd/var_tmp"),
        ("/home/u", "/data/proj/wd/home"),
    ):
        assert (m[dst].kind, m[dst].src) == ("bind", src)
    made = (("tmp", 0o1777, "/tmp"), ("var_tmp", 0o1777, "/var/tmp"), ("home", 0o700, "/home/u"))
    assert p.workdir == ("/data/proj/wd", made)


def test_workdir_without_contain_changes_nothing(cfg):
    """actionExecMultiProfile WorkdirOnly: the host's /tmp, nothing made."""
    p = plan(cfg, workdir="/w")
    assert p.workdir is None and by_dst(p)["/tmp"].src == "/tmp"


def test_workdir_and_custom_home_or_no_mount(cfg):
    p = plan(cfg, contain=True, workdir="/w", home="/h:/home/u", no_mount=["tmp"])
    assert (by_dst(p)["/home/u"].src, p.workdir) == ("/h", None)


def test_scratch_in_workdir(cfg):
    """ScratchWorkdirBind / relWorkdirScratch: -S DIR is WORKDIR/scratch/DIR, else tmpfs."""
    p = plan(cfg, workdir="/w", scratch=["/s1,/a/b"])
    m = by_dst(p)
    assert (m["/s1"].kind, m["/s1"].src, m["/a/b"].src) == ("bind", "/w/scratch/s1", "/w/scratch/a/b")
    assert p.workdir == ("/w", (("scratch/s1", 0o750, "/s1"), ("scratch/a/b", 0o750, "/a/b")))
    assert by_dst(plan(cfg, scratch=["/s1"]))["/s1"].kind == "tmpfs"
