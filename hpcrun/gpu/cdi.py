"""CDI (Container Device Interface) devices: --device VENDOR/CLASS=NAME|all.

Spec files (JSON or YAML, cdiVersion 0.3 to 0.8) from /etc/cdi and /var/run/cdi (config
`cdi_dirs`, or --cdi-dirs; a later directory's device of the same name wins). Of a
device's and its spec's containerEdits, hpcrun applies what an unprivileged user can:
env; deviceNodes, bound from the host (hostPath, else path), never made; bind and tmpfs
mounts; nvidia-ctk's update-ldcache hook as LD_LIBRARY_PATH folders. Other hooks,
additionalGIDs, intelRdt and netDevices are not applied: one note line says which.
"""

import os

from hpcrun.errors import UsageError
from hpcrun.gpu import Setup

VERSIONS = ((0, 3), (0, 8))  # oldest and newest cdiVersion read
SUFFIXES = (".json", ".yaml", ".yml")


def version_ok(text):
    try:
        major, minor = (int(x) for x in str(text).split(".")[:2])
    except ValueError:
        return False
    return VERSIONS[0] <= (major, minor) <= VERSIONS[1]


def check_spec(spec):
    """A problem with a parsed spec as text, None if it is usable."""
    if not isinstance(spec, dict):
        return "not a mapping"
    if not version_ok(spec.get("cdiVersion")):
        return f"cdiVersion {spec.get('cdiVersion')!r} is not one of 0.3 to 0.8"
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind.count("/") != 1 or not all(kind.split("/")):
        return f"kind {kind!r} is not VENDOR/CLASS"
    devices = spec.get("devices")
    if not isinstance(devices, list) or not all(
        isinstance(d, dict) and isinstance(d.get("name"), str) for d in devices
    ):
        return "devices must be a list of mappings with a name"
    for edits in [spec.get("containerEdits")] + [d.get("containerEdits") for d in devices]:
        if edits is not None and not isinstance(edits, dict):
            return "containerEdits must be a mapping"
    return None


def index(specs):
    """specs: [(source, parsed spec)] in rising priority -> ({qualified name: (device,
    spec edits)}, notes for the specs skipped)."""
    devices, notes = {}, []
    for source, spec in specs:
        problem = check_spec(spec)
        if problem:
            notes.append(f"CDI spec {source}: {problem}: skipped")
            continue
        for d in spec["devices"]:
            devices[f"{spec['kind']}={d['name']}"] = (d, spec.get("containerEdits") or {}, source)
    return devices, notes


def resolve(requests, devices):
    """--device values (comma lists) -> the qualified names, in order. `KIND=all` is the
    spec's own device named all when it has one, else every device of KIND."""
    out = []
    for item in requests:
        for name in (n.strip() for n in item.split(",")):
            if not name:
                continue
            kind, eq, dev = name.partition("=")
            if not eq or kind.count("/") != 1 or not dev:
                raise UsageError(
                    f"--device {name!r}: not a CDI device name", "use VENDOR/CLASS=NAME, e.g. nvidia.com/gpu=0"
                )
            if name in devices:
                picked = [name]
            elif dev == "all":
                picked = sorted(k for k in devices if k.partition("=")[0] == kind)
            else:
                picked = []
            if not picked:
                known = ", ".join(sorted(devices)[:8]) or "none: no CDI spec found"
                raise UsageError(f"--device {name}: no such CDI device", f"known: {known}")
            out += [p for p in picked if p not in out]
    return out


def _path(value, what):
    if not isinstance(value, str) or not value.startswith("/"):
        raise UsageError(f"CDI {what} {value!r}: not an absolute path", "fix the CDI spec")
    return os.path.normpath(value)


def apply_edits(edits, s, skipped, exists):
    """Add one containerEdits mapping to Setup s; skipped collects what is not applied."""
    for e in edits.get("env") or ():
        key, eq, value = str(e).partition("=")
        if eq and key:
            s.env[key] = value
    for node in edits.get("deviceNodes") or ():
        dst = _path(node.get("path"), "device node path")
        src = _path(node.get("hostPath") or dst, "device node hostPath")
        if not exists(src):
            raise UsageError(f"CDI device node {src} does not exist on this host", "regenerate the CDI spec")
        s.bind(src, dst, readonly=False, device=True)
    for m in edits.get("mounts") or ():
        opts = [str(o) for o in m.get("options") or ()]
        kind = m.get("type") or ("bind" if {"bind", "rbind"} & set(opts) else "")
        dst = _path(m.get("containerPath"), "mount containerPath")
        if kind == "tmpfs":
            s.tmpfs.append(dst)
        elif kind in ("bind", "rbind", "none") or {"bind", "rbind"} & set(opts):
            s.bind(_path(m.get("hostPath"), "mount hostPath"), dst, readonly="ro" in opts)
        else:
            skipped.append(f"mount of type {kind or '?'} at {dst}")
    for h in edits.get("hooks") or ():
        args = [str(a) for a in h.get("args") or ()]
        if "update-ldcache" in args:  # nvidia-ctk: run ldconfig on these folders -> the loader's path
            s.ld_dirs += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--folder"]
        else:
            skipped.append("hook " + " ".join([os.path.basename(str(h.get("path", "?")))] + args[1:3]))
    for key, what in (
        ("additionalGIDs", "additional groups"),
        ("intelRdt", "Intel RDT"),
        ("netDevices", "network devices"),
    ):
        if edits.get(key):
            skipped.append(what)


def setup(names, devices, exists):
    """The Setup for the resolved qualified names (pure, given `exists`)."""
    s, skipped, kinds = Setup(), [], []
    for name in names:
        dev, spec_edits, source = devices[name]
        if source not in kinds:  # a spec's own edits once, with its first device
            kinds.append(source)
            apply_edits(spec_edits, s, skipped, exists)
        apply_edits(dev.get("containerEdits") or {}, s, skipped, exists)
    if skipped:
        uniq = list(dict.fromkeys(skipped))
        more = f" and {len(uniq) - 4} more" if len(uniq) > 4 else ""
        s.notes.append(f"CDI: not applied (needs privilege or a runtime hook): {'; '.join(uniq[:4])}{more}")
    return s


def load_dir(d):
    """[(path, parsed)] of the spec files in d, by name; unreadable ones as (path, None)."""
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(SUFFIXES))
    except OSError:
        return []
    out = []
    for n in names:
        path = os.path.join(d, n)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(16 << 20)
            if n.endswith(".json"):
                import json

                out.append((path, json.loads(text)))
            else:
                import yaml

                out.append((path, yaml.safe_load(text)))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            out.append((path, f"unreadable: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}"))
        except Exception as e:  # yaml.YAMLError
            out.append((path, f"malformed YAML: {str(e).splitlines()[0]}"))
    return out


def discover(requests, dirs):
    specs, notes = [], []
    for d in dirs:
        for path, spec in load_dir(d):
            if isinstance(spec, str):
                notes.append(f"CDI spec {path}: {spec}: skipped")
            else:
                specs.append((path, spec))
    devices, skipped_specs = index(specs)
    s = setup(resolve(requests, devices), devices, os.path.exists)
    s.notes[:0] = notes + skipped_specs
    return s
