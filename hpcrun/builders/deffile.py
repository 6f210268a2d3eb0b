"""Apptainer definition files: parse, and build a root file system from one.

Header `Bootstrap:` agents: scratch, localimage, docker, oras, docker-archive, oci,
oci-archive (From: names the source), debootstrap (OSVersion:, MirrorURL:, Include:; made
with Debian's mmdebstrap). Sections: %setup (on the host, $APPTAINER_ROOTFS names the tree;
as root of the subuid mapping when the build unpacked with one, like %files),
%files (host paths relative to the current directory; `%files from STAGE` from an
earlier stage of a multi-stage file, see parse_all), %post (inside the image as root:
--fakeroot, through the caller's subuid range when there is one), %environment,
%runscript, %startscript, %labels, %help, %test,
%arguments (defaults for {{ NAME }}, overridden by --build-arg NAME=VALUE; one that no
{{ NAME }} uses fails the build). %post/%setup/%test take Apptainer's `-c SHELL` and
$APPTAINER_ENVIRONMENT/$APPTAINER_LABELS; labels() writes Apptainer's build labels."""

import json
import os
import re
import shutil
import subprocess
import sys

from hpcrun.builders import scif
from hpcrun.errors import ConfigError, ImageError, UsageError

SECTIONS = {"setup", "files", "post", "environment", "runscript", "startscript", "labels", "help", "test", "arguments"}
AGENTS = {"scratch", "localimage", "docker-archive", "oci", "oci-archive", "docker", "oras", "debootstrap"}
LATER = {"library", "shub", "yum", "zypper", "busybox", "arch"}


class Definition:
    """header: lower-case keys. sections: name -> body. args: name -> what follows %name
    on its line (`%post -c /bin/bash`). used: the {{ NAME }}s the text uses."""

    def __init__(self, header, sections, text, args=None, used=()):
        self.header, self.sections, self.text = header, sections, text
        self.args, self.used = args or {}, set(used)


def parse(text, path, build_args=()):
    args, used = {}, set()
    header, sections, current, section_args = {}, {}, None, {}
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        m = re.match(r"^%(\w+)(.*)$", line)
        if m:
            name = m.group(1).lower()
            if name in scif.SECTIONS:  # %apprun NAME...: kept as "apprun NAME"
                name = scif.section_key(name, m.group(2), f"{path}:{n}")
            elif name not in SECTIONS:
                raise UsageError(
                    f"{path}:{n}: unknown section %{name}",
                    f"known sections: {', '.join('%' + s for s in sorted(SECTIONS))}",
                )
            current = name
            sections.setdefault(name, [])
            section_args[name] = m.group(2).split("#")[0].strip()
            continue
        if current is None:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, colon, value = line.partition(":")
            if not colon:
                raise UsageError(f"{path}:{n}: header line is not 'Key: value'")
            header[key.strip().lower()] = value.strip()
        else:
            sections[current].append(line)
    sections = {k: "\n".join(v).strip("\n") for k, v in sections.items()}
    for line in sections.get("arguments", "").splitlines():
        if "=" in line:
            k, _, v = line.partition("=")
            args[k.strip()] = v.strip()
    for item in build_args:
        k, eq, v = item.partition("=")
        if not eq:
            raise UsageError(f"--build-arg {item!r}: not NAME=VALUE")
        args[k] = v

    def subst(s):
        def one(m):
            used.add(m.group(1))
            if m.group(1) not in args:
                raise UsageError(f"{path}: {{{{ {m.group(1)} }}}} has no value", "give --build-arg NAME=VALUE")
            return args[m.group(1)]

        return re.sub(r"\{\{\s*(\w+)\s*\}\}", one, s)

    header = {k: subst(v) for k, v in header.items()}
    sections = {k: subst(v) for k, v in sections.items()}
    agent = header.get("bootstrap", "").lower()
    if not agent:
        raise UsageError(f"{path}: no 'Bootstrap:' header")
    if agent in LATER:
        raise UsageError(
            f"{path}: Bootstrap: {agent} is not supported yet",
            "use localimage, docker, oras, docker-archive, oci, oci-archive, debootstrap or scratch",
        )
    if agent not in AGENTS:
        raise UsageError(f"{path}: unknown bootstrap agent {agent!r}", f"known: {', '.join(sorted(AGENTS))}")
    if agent == "debootstrap" and not header.get("osversion"):
        raise UsageError(f"{path}: Bootstrap: debootstrap needs an 'OSVersion:' header", "e.g. OSVersion: bookworm")
    if agent not in ("scratch", "debootstrap") and not header.get("from"):
        raise UsageError(f"{path}: Bootstrap: {agent} needs a 'From:' header")
    section_args = {k: subst(v) for k, v in section_args.items()}
    d = Definition(header, sections, subst(text), section_args, used)
    scif.attach(d, path)  # SCIF apps: %appinstall joins %post
    return d


STAGE_START = re.compile(r"(?mi)^bootstrap:")  # Apptainer's parser.All splits stages there


def parse_all(text, path, build_args=()):
    """The stages of a definition file, in order (Apptainer's parser.All and MakeAllDefs):
    each starts at a line beginning `Bootstrap:` (what precedes the second belongs to the
    first); each is parsed alone with its own %arguments; the last one becomes OUT and
    carries the whole file as its text (FullRaw) and every stage's used {{ NAME }}."""
    starts = [m.start() for m in STAGE_START.finditer(text)][1:]
    bounds = [0] + starts + [len(text)]
    stages, line = [], 0
    for chunk in (text[a:b] for a, b in zip(bounds, bounds[1:])):
        # blank lines in front keep parse()'s line numbers those of the file
        d = parse("\n" * line + chunk, path, build_args)
        d.text = d.text[line:]
        line += chunk.count("\n")
        d.stage = d.header.get("stage", "")
        d.file_blocks = file_blocks(d.text, path)
        stages.append(d)
    _check_stages(stages, path)
    last = stages[-1]
    last.text = "".join(d.text for d in stages)
    last.used = set().union(*(d.used for d in stages))
    return stages


def _check_stages(stages, path):
    """Every `%files from NAME` names an earlier stage (Apptainer looks up every stage,
    but a later one's tree is not built yet: refused here, not copied from nothing)."""
    seen = []
    for d in stages:
        for name, _pairs in d.file_blocks:
            if name is not None and name not in seen:
                hint = f"earlier stages: {', '.join(seen)}" if seen else "name one with a 'Stage: NAME' header"
                raise UsageError(f"{path}: %files from {name}: stage {name} was not found", hint)
        if d.stage in seen:
            raise UsageError(f"{path}: two stages named {d.stage}", "give each 'Stage:' its own name")
        if d.stage:
            seen.append(d.stage)


FILE_WORD = re.compile(r'"([^"]*)"|(\S+)')  # a word, or a "quoted path" (Apptainer's fileSplitter)


def file_blocks(text, path):
    """[(stage name or None for the host, [(src, dst)])] from every %files section of a
    stage's text, in order; `%files from NAME` copies from stage NAME's tree. dst is ""
    when the line names only the source (the same path in the image)."""
    blocks, current = [], None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)(.*)$", line)
        if m:
            current = None
            if m.group(1).lower() == "files":
                current = (_files_from(m.group(2).split("#")[0].split(), path), [])
                blocks.append(current)
            continue
        line = line.strip()
        if current is None or not line or line.startswith("#"):
            continue
        words = [w or q for q, w in FILE_WORD.findall(line)]
        current[1].append((words[0], words[1] if len(words) > 1 else ""))
    return blocks


def _files_from(args, path):
    if not args:
        return None
    if len(args) == 2 and args[0] == "from":
        return args[1]
    raise UsageError(f"{path}: %files {' '.join(args)}: not understood", "write %files, or %files from STAGE")


def source_of(d, defdir):
    """The `hpcrun build` source string for the bootstrap agent, or None for scratch."""
    agent, frm = d.header["bootstrap"].lower(), d.header.get("from", "")
    if agent == "scratch":
        return None
    if agent in ("docker", "oras"):
        # Apptainer's conveyorPacker_oci: Namespace:, then Registry:, put in front of From:
        for key in ("namespace", "registry"):
            frm = f"{d.header[key]}/{frm}" if d.header.get(key) and "://" not in frm else frm
        return frm if "://" in frm else f"{agent}://{frm}"
    path = frm if agent == "oci" and ":" in frm and not os.path.exists(os.path.join(defdir, frm)) else frm
    if not os.path.isabs(path.split(":")[0]):
        path = os.path.join(defdir, path)
    return path if agent == "localimage" else f"{agent}:{path}"


def debootstrap(d, work, idmap, quiet):
    """Bootstrap: debootstrap -> a root file system tarball in work, made by mmdebstrap
    (minbase variant, as Apptainer's debootstrap). Unprivileged it runs in its unshare mode,
    through the same subuid range; the builder then unpacks the tarball keeping owners."""
    if not shutil.which("mmdebstrap"):
        raise ConfigError("Bootstrap: debootstrap needs mmdebstrap", "install the mmdebstrap package")
    if idmap and idmap["mode"] != "subid":
        import pwd

        raise ConfigError(
            f"Bootstrap: debootstrap needs a range for {pwd.getpwuid(os.getuid()).pw_name} in "
            "/etc/subuid and /etc/subgid",
            "ask your administrator for one, or build as root",
        )
    tarball = os.path.join(work, "debootstrap.tar")
    include = ",".join(p for p in re.split(r"[\s,]+", d.header.get("include", "")) if p)
    args = ["mmdebstrap", "--variant=minbase", "--mode=" + ("unshare" if idmap else "root")]
    args += (["--include=" + include] if include else []) + (["--quiet"] if quiet else [])
    args += [d.header["osversion"], tarball, d.header.get("mirrorurl") or "http://deb.debian.org/debian"]
    try:
        _script("Bootstrap: debootstrap (mmdebstrap)", args, dict(os.environ), work)
    except ImageError as e:  # an image problem (252), whatever mmdebstrap's own code
        raise ImageError(e.message, e.hint) from None
    return tarball


SECTION_FILES = (
    ("environment", "env/90-environment.sh", 0o644),
    ("runscript", "runscript", 0o755),
    ("startscript", "startscript", 0o755),
    ("help", "runscript.help", 0o644),
    ("test", "test", 0o755),
)


def setup(d, rootfs, defdir, script):
    """%setup: the definition's own script (written at script, outside the tree), on the
    host, with $APPTAINER_ROOTFS (as Apptainer runs it: only build definition files you
    trust)."""
    if d.sections.get("setup"):
        env = dict(os.environ, **section_env(rootfs, host=True))
        _script("%setup", section_argv(d, "setup", script), env, defdir)


def files(d, root, defdir, note=None):
    """%files SRC [DST]: host paths copied into the tree through inroot, so links the base
    image planted are never written through. SRC is read as Apptainer's `cp -r` does:
    relative to the current directory, shell globs expanded; a path found only next to the
    definition file (hpcrun's old rule) is taken from there, with a note."""
    for pattern, dst in host_files(d):
        for src, given in _host_sources(pattern, defdir, note or (lambda msg: None)):
            target = _target(root, dst or given, given)
            try:
                root.copy_in(src, target)
            except OSError as e:
                from hpcrun import inroot

                raise inroot.failure(e, f"%files: cannot copy {given} to {target}") from None


def _host_sources(pattern, defdir, note):
    """[(host path, the path as the definition gives it)] for one %files source."""
    import glob

    cwd = os.getcwd()
    for base in (cwd, defdir):
        if glob.has_magic(pattern):
            # no match: the name itself, as the shell leaves an unmatched word
            found = sorted(glob.glob(pattern, root_dir=base)) or [pattern]
        else:
            found = [pattern]
        found = [g for g in found if os.path.exists(os.path.join(base, g))]
        if found:
            if base != cwd:
                note(f"%files: {pattern} is read from {defdir}, not the current directory (Apptainer's rule)")
            return [(os.path.join(base, g), g) for g in found]
    raise ImageError(f"%files: {pattern} does not exist", f"relative paths are read from the current directory {cwd}")


def _target(root, dst, src):
    """Where cp -r puts src at dst: a dst ending in / is made as a directory; into an
    existing directory src goes by its own name (nothing there is replaced by a file)."""
    try:
        if dst.endswith("/"):
            os.close(root.makedirs(dst))
        if _is_dir(root, dst):
            return dst.rstrip("/") + "/" + os.path.basename(src.rstrip("/"))
    except OSError as e:
        from hpcrun import inroot

        raise inroot.failure(e, f"%files: cannot make {dst}") from None
    return dst


def _blocks(d):
    blocks = getattr(d, "file_blocks", None)  # set by parse_all
    return file_blocks(d.text, "%files") if blocks is None else blocks


def host_files(d):
    return [pair for name, pairs in _blocks(d) if name is None for pair in pairs]


def stage_files(d):
    """[(stage name, src, dst)] of the `%files from NAME` sections."""
    return [(name, src, dst) for name, pairs in _blocks(d) if name is not None for src, dst in pairs]


def files_from(d, root, stage_roots):
    """%files from NAME: copy from an earlier stage's tree (an inroot.Root in stage_roots),
    as Apptainer's CopyFromStage: SRC resolved inside that tree (its links followed there,
    never out of it), DST inside this one; an existing directory DST receives SRC by name;
    DST ending in / is made as a directory."""
    for name, src, dst in stage_files(d):
        dst = _target(root, dst or src, src)
        try:
            root.copy_from(stage_roots[name], src, dst)
        except FileNotFoundError:
            raise ImageError(f"%files from {name}: {src} does not exist in stage {name}") from None
        except OSError as e:
            from hpcrun import inroot

            raise inroot.failure(e, f"%files from {name}: cannot copy {src} to {dst}") from None


def _is_dir(root, path):
    from hpcrun.inroot import O_PATH

    try:
        os.close(root.resolve(path, O_PATH | os.O_DIRECTORY))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def shebang(d, section):
    """(first line, body) of a script section, as Apptainer writes it: a `#!` first line
    of the body is kept, else #!/bin/sh; `%runscript ARGS` adds ARGS to it, and
    `-c SHELL` makes SHELL the interpreter."""
    body, line = d.sections[section], "#!/bin/sh"
    if body.strip().startswith("#!"):
        first, _, body = body.strip().partition("\n")
        line = first.strip()
    args = d.args.get(section, "")
    if args.startswith("-c ") and args[3:].strip():
        line = "#!" + args[3:].strip()
    elif args:
        line += " " + args
    return line, body


def metadata(d, root, only=None):
    """%environment, %runscript, %startscript, %help, %test and the definition itself
    into /.singularity.d, through inroot (labels come after %post: see labels()).
    only: the --section names to write (None: all)."""
    for section, name, mode in SECTION_FILES:
        if section in d.sections and (only is None or section in only):
            if section == "help":
                text = d.sections[section] + "\n"
            elif section == "environment":
                text = _environment(root, d.sections[section])
            else:
                first, body = shebang(d, section)
                text = f"{first}\n\n{body}\n"
            root.write(f".singularity.d/{name}", text, mode)
    root.write(".singularity.d/Singularity", d.text if d.text.endswith("\n") else d.text + "\n")
    scif.write(d, root)  # SCIF apps: /scif/apps/NAME, /scif/data/NAME


def _environment(root, body):
    """%environment as Apptainer's insertEnvScript writes it: appended to the base image's
    90-environment.sh (its variables stay), else a new script."""
    import stat

    path = ".singularity.d/env/90-environment.sh"
    st = root.lstat(path)
    if st is not None and stat.S_ISREG(st.st_mode):
        old = root.read(path, 1 << 20, "the base image's 90-environment.sh").decode(errors="replace")
        return old + "\n" + body + "\n"
    return "#!/bin/sh\n\n" + body + "\n"


LABELS_FILE = ".build.labels"  # where %post appends `KEY VALUE` lines ($APPTAINER_LABELS)
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def labels(d, root, reproducible=False, own=True):
    """labels.json as Apptainer's assembler writes it: the base image's labels, then the
    lines %post appended to $APPTAINER_LABELS, then the build labels (replacing the
    base's), then %labels (unless own is False: --section without labels)."""
    labels = {}
    try:
        old = root.read(".singularity.d/labels.json", 1 << 20, "the base image")
        labels = json.loads(old) if old else {}
    except (ValueError, OSError):
        pass
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    st = root.lstat(LABELS_FILE)
    if st is not None:
        import stat

        text = root.read(LABELS_FILE, 1 << 20, "$APPTAINER_LABELS") if stat.S_ISREG(st.st_mode) else b""
        root.remove(LABELS_FILE)
        labels.update(_label_lines(text.decode(errors="replace")))
    labels.update(build_labels(d, reproducible))
    labels.update(_label_lines(d.sections.get("labels", "") if own else ""))
    root.write(".singularity.d/labels.json", json.dumps(labels, indent="\t", sort_keys=True))


def _label_lines(text):
    out = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            out[key] = value.strip()
    return out


def build_labels(d, reproducible=False):
    """Apptainer's addBuildLabels: schema version, build date (SOURCE_DATE_EPOCH, or the
    epoch for --reproducible, else now), help, the header, the architecture."""
    import time

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = time.gmtime(int(epoch)) if epoch.isdigit() else time.gmtime(0) if reproducible else time.localtime()
    zone = "UTC" if epoch.isdigit() or reproducible else time.strftime("%Z", when)
    out = {
        "org.label-schema.schema-version": "1.0",
        "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%S", when) + _offset(when, zone),
        # Go's time format as Apptainer builds it: no zero padding
        "org.label-schema.build-date": f"{time.strftime('%A', when)}_{when.tm_mday}_{time.strftime('%B', when)}_"
        f"{when.tm_year}_{when.tm_hour}:{when.tm_min}:{when.tm_sec}_{zone}",
    }
    if d.sections.get("help"):
        out["org.label-schema.usage"] = "/.singularity.d/runscript.help"
        out["org.label-schema.usage.apptainer.runscript.help"] = "/.singularity.d/runscript.help"
    for key, value in d.header.items():
        out["org.label-schema.usage.singularity.deffile." + key] = value
    arch = GO_ARCH.get(os.uname().machine, os.uname().machine)
    out["org.opencontainers.image.architecture"] = out["org.label-schema.build-arch"] = arch
    return out


def _offset(when, zone):
    if zone == "UTC" or not when.tm_gmtoff:
        return "Z"
    m = abs(when.tm_gmtoff) // 60
    return f"{'+' if when.tm_gmtoff > 0 else '-'}{m // 60:02d}:{m % 60:02d}"


ENV_FILE = "/.singularity.d/env/91-environment.sh"  # what %post appends exports to
POST_SCRIPT = ".post.script"  # where %post's script lies in the tree while it runs


def section_env(rootfs, host=False):
    """$APPTAINER_ENVIRONMENT, $APPTAINER_LABELS, $APPTAINER_ROOTFS and their SINGULARITY_
    twins, as Apptainer gives %setup (host=True: the same container paths) and %post."""
    out = {"ENVIRONMENT": ENV_FILE, "ROOTFS": rootfs}
    if not host:
        out["LABELS"] = "/" + LABELS_FILE
    return {p + k: v for k, v in out.items() for p in ("APPTAINER_", "SINGULARITY_")}


def section_argv(d, section, script):
    """Apptainer's getSectionScriptArgs: /bin/sh -e [ARGS] SCRIPT, and `-c SHELL [ARGS]`
    becomes -c 'SHELL [ARGS] SCRIPT'."""
    params = d.args.get(section, "").split()
    if "-c" in params:
        i = params.index("-c")
        if i + 1 >= len(params):
            raise UsageError(f"%{section} -c: no shell named", f"e.g. %{section} -c /bin/bash")
        return ["/bin/sh", "-e"] + params[:i] + ["-c", " ".join(params[i + 1 :] + [script])]
    return ["/bin/sh", "-e"] + params + [script]


def run_in_image(section, rootfs, argv, writable, env=None):
    """Run a section's script as root inside the tree with hpcrun itself (a child process:
    the runtime takes over the process it runs in). %post writes the tree in place."""
    args = [sys.executable, "-m", "hpcrun", "exec", "--contain", "--pwd", "/", "--fakeroot", "--quiet"]
    args += ["--writable"] if writable else []
    for k, v in (env or {}).items():
        args += ["--env", f"{k}={v}"]
    args += [rootfs] + argv
    _script(section, args, dict(os.environ), "/")


def _script(section, argv, env, cwd):
    from hpcrun.runtime.idmap import dies_with_us

    sys.stdout.flush()
    proc = subprocess.run(argv, env=env, cwd=cwd, preexec_fn=dies_with_us())
    if proc.returncode != 0:
        raise ImageError(
            f"{section} failed with exit code {proc.returncode}",
            "see its output above",
            code=proc.returncode if 0 < proc.returncode < 251 else None,
        )
