"""SCIF apps in definition files, as Apptainer builds them (its
internal/pkg/build/apps/apps.go is the spec of the layout and of the variables).

`%appinstall NAME`, `%apprun NAME`, `%appenv NAME`, `%applabels NAME`, `%apphelp NAME`,
`%appfiles NAME`, `%apptest NAME`, `%appstart NAME` give, per app:

  /scif/apps/NAME/{bin,lib}            on PATH / LD_LIBRARY_PATH when the app is active
  /scif/apps/NAME/scif/env/01-base.sh  SCIF_APPNAME, SCIF_APPROOT, SCIF_APPDATA, ...
  /scif/apps/NAME/scif/env/90-environment.sh   %appenv
  /scif/apps/NAME/scif/{runscript,startscript,test,runscript.help,labels.json}
  /scif/data/NAME/{input,output}

and /.singularity.d/env/94-appsbase.sh with every app's SCIF_APP*_NAME. %appinstall
runs after %post, in the same script, in its app's root (with its 01-base.sh sourced).
%appfiles SRC [DST]: host paths (relative to the definition file, as %files) copied
under the app's root. Everything is written through inroot: the base image is hostile.
"""

import json
import os

from hpcrun.errors import ImageError, UsageError

SECTIONS = {"appinstall", "appfiles", "appenv", "apptest", "apphelp", "apprun", "appstart", "applabels"}
# section -> (file under the app's scif/, mode, a script: "#!/bin/sh" in front)
FILES = {
    "apprun": ("runscript", 0o755, True),
    "appstart": ("startscript", 0o755, True),
    "apptest": ("test", 0o755, True),
    "apphelp": ("runscript.help", 0o644, False),
}
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


def check_name(name, where):
    """An app name is one path component under /scif/apps (and a word in shell text)."""
    if not name or name.startswith(".") or not set(name) <= NAME_CHARS:
        raise UsageError(f"{where}: app name {name!r} is not valid", "use letters, digits and _ . + - (no leading .)")
    return name


def section_key(section, rest, where):
    """`%apprun NAME` -> the key "apprun NAME" the definition keeps its body under."""
    words = rest.split("#")[0].split()
    if not words:
        raise UsageError(f"{where}: %{section} needs an app name", f"e.g. %{section} myapp")
    return f"{section} {check_name(words[0], where)}"


def apps(d):
    """{name: {section: body}} in the order the apps first appear (Apptainer's AppOrder:
    %appinstall sections run in that order)."""
    out = {}
    for key, body in d.sections.items():
        section, _, name = key.partition(" ")
        if section in SECTIONS and name:
            out.setdefault(name, {})[section] = body
    return out


def attach(d, path):
    """After parsing: the apps' %appinstall joins %post (so the build runs it there)."""
    found = apps(d)
    d.appdir = os.path.dirname(path)
    if any("appinstall" in a for a in found.values()):
        d.sections["post"] = d.sections.get("post", "") + install_script(found)


def install_script(found):
    parts = []
    for name, sections in found.items():
        root = f"/scif/apps/{name}"
        parts.append(f"\ncd /\n. {root}/scif/env/01-base.sh\n\ncd {root}\n{sections.get('appinstall', '')}\n\ncd /\n")
    return "".join(parts)


def base_env(name):
    """01-base.sh: the active app's variables (Apptainer's names and values)."""
    root, data = f"/scif/apps/{name}", f"/scif/data/{name}"
    return (
        f'#!/bin/sh\n\nSCIF_APPNAME={name}\nSCIF_APPROOT="{root}"\nSCIF_APPMETA="{root}/scif"\n'
        f'SCIF_DATA="/scif/data"\nSCIF_APPDATA="{data}"\nSCIF_APPINPUT="{data}/input"\n'
        f'SCIF_APPOUTPUT="{data}/output"\n'
        "export SCIF_APPDATA SCIF_APPNAME SCIF_APPROOT SCIF_APPMETA SCIF_APPINPUT SCIF_APPOUTPUT SCIF_DATA\n"
    )


def global_env(name, sections):
    """This app's lines of 94-appsbase.sh (every app's paths, whichever is active)."""
    key = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    root = f"/scif/apps/{name}"
    names = ("APPDATA", "APPMETA", "APPROOT", "APPBIN", "APPLIB")
    values = (f"/scif/data/{name}", f"{root}/scif", root, f"{root}/bin", f"{root}/lib")
    text = f"## App Global Exports For: {key}\n\n"
    text += "".join(f"SCIF_{n}_{key}={v}\n" for n, v in zip(names, values))
    text += "\nexport " + " ".join(f"SCIF_{n}_{key}" for n in names) + "\n"
    for section, var, file in (
        ("appenv", "APPENV", "env/90-environment.sh"),
        (None, "APPLABELS", "labels.json"),  # always written
        ("apprun", "APPRUN", "runscript"),
        ("appstart", "APPSTART", "startscript"),
    ):
        if section is None or sections.get(section):
            text += f'export SCIF_{var}_{key}="{root}/scif/{file}"\n'
    return text


def write(d, root):
    """Every app of the definition into the tree (an inroot.Root); nothing without apps."""
    found = apps(d)
    if not found:
        return
    glob = ""
    for name, sections in found.items():
        _write_app(root, name, sections, getattr(d, "appdir", "."))
        glob += global_env(name, sections)
    root.write(".singularity.d/env/94-appsbase.sh", glob, 0o755)


def _write_app(root, name, sections, defdir):
    top, meta = f"scif/apps/{name}", f"scif/apps/{name}/scif"
    for sub in (f"{top}/bin", f"{top}/lib", f"{meta}/env", f"scif/data/{name}/input", f"scif/data/{name}/output"):
        os.close(root.makedirs(sub))
    root.write(f"{meta}/env/01-base.sh", base_env(name), 0o755)
    if sections.get("appenv"):
        root.write(f"{meta}/env/90-environment.sh", sections["appenv"] + "\n", 0o755)
    for section, (file, mode, script) in FILES.items():
        body = sections.get(section)
        if body:
            root.write(f"{meta}/{file}", f"#!/bin/sh\n\n{body}\n" if script else body + "\n", mode)
    _copy_files(root, name, sections.get("appfiles", ""), defdir)
    labels = {"SCIF_APP_NAME": name}
    for line in sections.get("applabels", "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            labels[key] = value.strip()
    root.write(f"{meta}/labels.json", json.dumps(labels, indent="\t", sort_keys=True), 0o644)


def _copy_files(root, name, text, defdir):
    """%appfiles SRC [DST]: as `cp -r SRC /scif/apps/NAME/DST` (into DST when it is a
    directory there), DST under the app's root even when absolute."""
    import stat

    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        src, _, dst = line.partition(" ")
        dst = dst.strip() or src
        host = os.path.join(defdir, src)
        if not os.path.exists(host):
            raise ImageError(f"%appfiles {name}: {src} does not exist", f"paths are relative to {defdir}")
        target = f"scif/apps/{name}/{dst}"
        st = root.lstat(target)
        if st is not None and stat.S_ISDIR(st.st_mode):
            target += "/" + os.path.basename(os.path.normpath(src))
        try:
            root.copy_in(host, target)
        except OSError as e:
            from hpcrun import inroot

            raise inroot.failure(e, f"%appfiles {name}: cannot copy {src} to {dst}") from None
