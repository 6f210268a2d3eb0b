"""Gather facts about the caller for the planner (the impure half of planning)."""

import os
import pwd

from hpcrun.plan import Host


def subid_range(path, user, uid):
    """First `user:start:count` (or `uid:start:count`) line of /etc/subuid-style file."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)):
                    start, count = int(parts[1]), int(parts[2])
                    if count > 0:
                        return (start, count)
    except (OSError, ValueError):
        pass
    return None


def gather(env=None):
    env = dict(os.environ if env is None else env)
    uid, gid = os.getuid(), os.getgid()
    try:
        pw = pwd.getpwuid(uid)
        user, home, gecos, shell = pw.pw_name, pw.pw_dir, pw.pw_gecos, pw.pw_shell
    except KeyError:
        user, home, gecos, shell = env.get("USER", f"user{uid}"), env.get("HOME", "/"), "", "/bin/sh"
    try:
        import grp

        group = grp.getgrgid(gid).gr_name
    except (KeyError, ImportError):
        group = f"group{gid}"
    home = env.get("HOME") or home
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = home
    return Host(
        uid,
        gid,
        user,
        group,
        home,
        cwd,
        gecos=gecos.replace(":", " "),
        shell=shell or "/bin/sh",
        env=env,
        subuid=subid_range("/etc/subuid", user, uid),
        subgid=subid_range("/etc/subgid", user, uid),
        existing=os.path.isdir,
    )
