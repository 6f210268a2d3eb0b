"""`hpcrun sif list|header`: the same text Apptainer's `siftool list|header` prints."""

import uuid as uuidmod

from hpcrun.images import sif

HASHES = {1: "SHA-256", 2: "SHA-384", 3: "SHA-512", 4: "BLAKE2s-256", 5: "BLAKE2b-256"}
SBOM_FORMATS = {
    1: "cyclonedx-json",
    2: "cyclonedx-xml",
    3: "github-json",
    4: "spdx-json",
    5: "spdx-rdf",
    6: "spdx-tag-value",
    7: "spdx-yaml",
    8: "syft-json",
}
GO_ZERO_TIME = -62135596800
RULE = "-" * 78


def _int(extra, off=0):
    return int.from_bytes(extra[off : off + 4], "little", signed=True)


def type_text(d):
    name = sif.DATATYPES.get(d.datatype, f"Unknown ({d.datatype:#x})")
    if d.datatype == sif.PARTITION:
        return f"{name} ({sif.FSTYPES.get(d.fstype, '?')}/{sif.PARTTYPES.get(d.parttype, '?')}/{d.arch})"
    if d.datatype == 0x4005:
        return f"{name} ({HASHES.get(_int(d.extra), 'unknown')})"
    if d.datatype == 0x4009:
        return f"{name} ({SBOM_FORMATS.get(_int(d.extra), 'unknown')})"
    return name


def _group(raw):
    g = raw & 0x0FFFFFFF
    return str(g) if g else "NONE"


def _link(raw):
    if raw == 0:
        return "NONE"
    if raw & 0xF0000000:
        return f"{raw & 0x0FFFFFFF} (G)"
    return str(raw)


def list_rows(f):
    return [
        {
            "id": d.id,
            "group": d.groupid & 0x0FFFFFFF,
            "link": d.linkid,
            "start": d.offset,
            "end": d.offset + d.size,
            "type": type_text(d),
            "name": d.name,
        }
        for d in sorted(f.descriptors, key=lambda d: d.id)
    ]


def list_text(f):
    lines = [RULE, f"{'ID':<5}|{'GROUP':<8}|{'LINK':<8}|{'SIF POSITION (start-end)':<26}|TYPE", RULE]
    for d in sorted(f.descriptors, key=lambda d: d.id):
        lines.append(
            f"{d.id:<5}|{_group(d.groupid):<8}|{_link(d.linkid):<8}|"
            f"{f'{d.offset}-{d.offset + d.size}':<26}|{type_text(d)}"
        )
    return "\n".join(lines) + "\n"


def readable_size(n):
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.0f} {units[i]}"


def _time(t):
    """As Go's time.Unix(t).UTC() prints it. A time outside the years 1..9999 (a
    crafted or damaged header: Python's datetime cannot hold it) is printed as the raw
    number of seconds instead, marked, rather than guessed at or clamped."""
    import datetime

    try:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S %z UTC")
    except (OverflowError, OSError, ValueError):
        return f"{t} (seconds since 1970, out of range)"


def header_fields(f):
    fields = []
    if f.launch:
        fields.append(("Launch Script", f.launch.decode(errors="replace").rstrip("\n")))
    fields.append(("Version", f.version))
    fields.append(("Primary Architecture", f.arch))
    if any(f.uuid):
        fields.append(("ID", str(uuidmod.UUID(bytes=f.uuid))))
    if f.ctime != GO_ZERO_TIME:
        fields.append(("Created", _time(f.ctime)))
    if f.mtime != GO_ZERO_TIME:
        fields.append(("Modified", _time(f.mtime)))
    fields += [
        ("Descriptors Free", str(f.dfree)),
        ("Descriptors Total", str(f.dtotal)),
        ("Descriptors Offset", str(f.doffset)),
        ("Descriptors Size", readable_size(f.dsize)),
        ("Data Offset", str(f.data_offset)),
        ("Data Size", readable_size(f.data_size)),
    ]
    return fields


def header_dict(f):
    return dict(header_fields(f))


def header_text(f):
    width = max(len(k) for k, _ in header_fields(f)) + 2
    return "".join(f"{k + ':':<{width}}{v}\n" for k, v in header_fields(f))
