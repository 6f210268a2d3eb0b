"""`hpcrun sif list|header|info|dump`: what Apptainer's `siftool` (apptainer/sif,
internal/app/siftool/info.go) prints, by its rules: which lines appear, Go's `%-Nd`
columns, its type names, Go's time and size formatting and text/tabwriter alignment.

Text from the image (launch script, object names) is raw bytes, as siftool prints
it: it is carried in str as surrogate escapes and written back byte for byte."""

import uuid as uuidmod

from hpcrun.errors import ImageError, UsageError
from hpcrun.images import sif

# Go's crypto.Hash names for SIF's hash types (pkg/sif getHashType)
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
CRYPT_FORMATS = {1: "OpenPGP", 2: "PEM"}
CRYPT_MESSAGES = {0x100: "Clear Signature", 0x200: "RSA-OAEP"}
SIGNATURE, CRYPT_MESSAGE, SBOM, OCI_INDEX, OCI_BLOB = 0x4005, 0x4008, 0x4009, 0x400A, 0x400B
GROUP_MASK = 0xF0000000
GO_ZERO_TIME = -62135596800  # time.Unix(s, 0).IsZero(): January 1, year 1
RULE = "-" * 78
ESCAPE = "\udcff"  # byte 0xff: text/tabwriter's Escape, honoured whatever the flags


def raw_text(b):
    return b.decode("utf-8", "surrogateescape")


def to_bytes(text):
    return text.encode("utf-8", "surrogateescape")


def _int(extra, off=0):
    return int.from_bytes(extra[off : off + 4], "little", signed=True)


def _arch(raw3):
    """archType.GoArch: one of the known 3-byte codes ("02\\0"), else "unknown"."""
    code = raw3[:3]
    return sif.ARCHES.get(code[:2].decode("ascii", "replace"), "unknown") if code[2:] == b"\0" else "unknown"


def datatype_name(d):
    return sif.DATATYPES.get(d.datatype, "Unknown")


def partition_meta(d):
    fs = sif.FSTYPES.get(_int(d.extra, 0), "Unknown")
    return fs, sif.PARTTYPES.get(_int(d.extra, 4), "Unknown"), _arch(d.extra[8:11])


def signature_meta(d):
    """(hash name, fingerprint or b"") or None where siftool fails: a hash it does not know."""
    ht = HASHES.get(_int(d.extra))
    if ht is None:
        return None
    fp = d.extra[4:24]
    return ht, b"" if fp == bytes(20) else fp


def crypt_meta(d):
    return CRYPT_FORMATS.get(_int(d.extra, 0), "Unknown"), CRYPT_MESSAGES.get(_int(d.extra, 4), "Unknown")


def sbom_meta(d):
    return SBOM_FORMATS.get(_int(d.extra), "unknown")


def oci_digest(d):
    """v1.Hash from the NUL-terminated "sha256:HEX" (go-containerregistry's rules), or None."""
    text = d.extra.split(b"\0", 1)[0].decode("ascii", "replace")
    parts = text.split(":")
    if len(parts) != 2 or parts[0] != "sha256":
        return None
    if len(parts[1]) != 64 or parts[1].strip("0123456789abcdef"):
        return None
    return text


def type_text(d):
    """The TYPE column: the type name, with its metadata for four types."""
    name = datatype_name(d)
    if d.datatype == sif.PARTITION:
        return "%s (%s/%s/%s)" % (name, *partition_meta(d))
    if d.datatype == SIGNATURE:
        meta = signature_meta(d)
        # siftool prints nothing here, not even the newline; the bare name keeps the table readable
        return f"{name} ({meta[0]})" if meta else name
    if d.datatype == CRYPT_MESSAGE:
        return "%s (%s/%s)" % (name, *crypt_meta(d))
    if d.datatype == SBOM:
        return f"{name} ({sbom_meta(d)})"
    return name


def group_id(d):
    return d.groupid & ~GROUP_MASK & 0xFFFFFFFF


def linked_id(d):
    """(id, is_group) as Descriptor.LinkedID: a group link has all four mask bits set."""
    return d.linkid & ~GROUP_MASK & 0xFFFFFFFF, d.linkid & GROUP_MASK == GROUP_MASK


def list_rows(f):
    rows = []
    for d in f.descriptors:
        link, is_group = linked_id(d)
        rows.append(
            {
                "id": d.id,
                "group": group_id(d),
                "link": link,
                "link_is_group": is_group,
                "start": d.offset,
                "end": d.offset + d.size,
                "type": type_text(d),
                "name": raw_text(d.name_bytes),
            }
        )
    return rows


def _list_line(d):
    gid = group_id(d)
    link, is_group = linked_id(d)
    group = "|%-7s " % "NONE" if gid == 0 else "|%-7d " % gid
    if link == 0:
        link_text = "|%-7s " % "NONE"
    elif is_group:
        link_text = "|%-3d (G) " % link
    else:
        link_text = "|%-7d " % link
    position = "%-26s " % f"|{d.offset}-{d.offset + d.size} "
    return f"{'%-4d ' % d.id}{group}{link_text}{position}|{type_text(d)}\n"


def list_text(f):
    """writeList: descriptors in table order (not sorted), Go's %-Nd columns."""
    title = "%-4s %-8s %-8s %-26s %s" % ("ID", "|GROUP", "|LINK", "|SIF POSITION (start-end)", "|TYPE")
    return f"{RULE}\n{title}\n{RULE}\n" + "".join(_list_line(d) for d in f.descriptors)


def readable_size(size):
    """readableSize: math.Round (half away from zero), K..E, negative sizes too."""
    if -1024 < size < 1024:
        return f"{size} B"
    div, exp, n = 1024, 0, abs(size) // 1024
    while n >= 1024:
        div, exp, n = div * 1024, exp + 1, n // 1024
    return f"{_go_round(float(size) / float(div)):.0f} {'KMGTPE'[exp]}iB"


def _go_round(x):
    import math

    r = float(math.trunc(x))
    return r + math.copysign(1.0, x) if abs(x - r) >= 0.5 else r


def go_time(t):
    """time.Unix(t, 0).UTC() as Go's %v prints it, for any int64 (Go wraps the
    seconds into its absolute range; years are proleptic Gregorian, '-0001', '12345')."""
    k = 9223372028715321600  # unixToInternal + internalToAbsolute
    t = (t + k) % (1 << 64) - k
    days, secs = divmod(t, 86400)
    year, month, day = _civil(days)
    sign = "-" if year < 0 else ""
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
    return f"{sign}{abs(year):04d}-{month:02d}-{day:02d} {clock} +0000 UTC"


def _civil(days):
    """Days since 1970-01-01 -> (year, month, day), any int (H. Hinnant's algorithm)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _launch(f):
    script = raw_text(f.launch)
    return script[:-1] if script.endswith("\n") else script  # strings.TrimSuffix: one newline


def header_fields(f):
    """writeHeader's lines: launch script, arch, ID and times only when set."""
    fields = []
    if f.launch:
        fields.append(("Launch Script", _launch(f)))
    fields.append(("Version", f.version))
    arch = _arch(f.arch_bytes)
    if arch != "unknown":
        fields.append(("Primary Architecture", arch))
    if any(f.uuid):
        fields.append(("ID", str(uuidmod.UUID(bytes=f.uuid))))
    if f.ctime != GO_ZERO_TIME:
        fields.append(("Created At", go_time(f.ctime)))
    if f.mtime != GO_ZERO_TIME:
        fields.append(("Modified At", go_time(f.mtime)))
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
    return tabwrite("".join(f"{k}:\t{v}\n" for k, v in header_fields(f)), padding=1)


def find_object(f, oid):
    """GetDescriptor(WithID(oid)), with its errors in its order."""
    if f.dfree == f.dtotal:
        raise ImageError(f"{f.path}: no objects in image")
    if oid == 0 and f.descriptors:
        raise ImageError(f"{f.path}: invalid object ID 0", "object IDs start at 1: see `sif list`")
    found = [d for d in f.descriptors if d.id == oid]
    if len(found) > 1:
        raise ImageError(f"{f.path}: multiple objects found with ID {oid}", "the descriptor table is corrupt")
    if not found:
        raise ImageError(f"{f.path}: object {oid} not found", "`sif list` shows the objects and their IDs")
    return found[0]


def parse_id(text):
    """strconv.ParseUint(text, 10, 32): decimal digits only, below 2**32."""
    if not (text.isascii() and text.isdigit()) or int(text) >= 1 << 32:
        raise UsageError(f"while converting id: invalid object ID {text!r}", "give a decimal number from `sif list`")
    return int(text)


def _id_text(oid, is_group=False):
    if oid == 0:
        return "NONE"
    return f"{oid} (G)" if is_group else str(oid)


def info_fields(f, d):
    """writeInfo's lines; raises where siftool fails (unknown hash, bad OCI digest)."""
    fields = [("Data Type", datatype_name(d)), ("ID", str(d.id)), ("Group ID", _id_text(group_id(d)))]
    fields += [("Linked ID", _id_text(*linked_id(d))), ("Offset", str(d.offset)), ("Size", str(d.size))]
    if d.ctime != GO_ZERO_TIME:
        fields.append(("Created At", go_time(d.ctime)))
    if d.mtime != GO_ZERO_TIME:
        fields.append(("Modified At", go_time(d.mtime)))
    if d.name_bytes:
        fields.append(("Name", raw_text(d.name_bytes)))
    return fields + _type_fields(f, d)


def _type_fields(f, d):
    if d.datatype == sif.PARTITION:
        return list(zip(("Filesystem Type", "Partition Type", "Architecture"), partition_meta(d)))
    if d.datatype == SIGNATURE:
        meta = signature_meta(d)
        if meta is None:
            raise ImageError(f"{f.path}: object {d.id}: hash algorithm unsupported ({_int(d.extra)})")
        return [("Hash Type", meta[0])] + ([("Entity", meta[1].hex().upper())] if meta[1] else [])
    if d.datatype == CRYPT_MESSAGE:
        return list(zip(("Format Type", "Message Type"), crypt_meta(d)))
    if d.datatype == SBOM:
        return [("Format", sbom_meta(d))]
    if d.datatype in (OCI_INDEX, OCI_BLOB):
        digest = oci_digest(d)
        if digest is None:
            raise ImageError(f"{f.path}: object {d.id}: cannot parse its OCI digest")
        return [("Digest", digest)]
    return []


def info_text(f, oid):
    d = find_object(f, oid)
    return tabwrite("".join(f"\t{k}:\t{v}\n" for k, v in info_fields(f, d)), padding=2)


def tabwrite(text, padding):
    """Go's text/tabwriter (minwidth 0, tabwidth 0, pad ' ', no flags) over `text`:
    '\\t'/'\\v' end a cell, '\\n'/'\\f' a line; a column's width is its widest cell
    plus padding within a block of consecutive lines that have it; a line of one
    cell or a '\\f' flushes; 0xff...0xff is escaped text (counted without the 0xffs)."""
    out, lines = [], [[]]
    cell, adjust, escaped = [], 0, False
    for ch in text:
        if escaped:
            cell.append(ch)
            if ch == ESCAPE:
                escaped, adjust = False, adjust - 2
        elif ch in "\t\v\n\f":
            lines[-1].append(("".join(cell), len(cell) + adjust))
            cell, adjust = [], 0
            if ch in "\n\f":
                ncells = len(lines[-1])
                lines.append([])
                if ch == "\f" or ncells == 1:
                    _tab_format(out, lines, 0, len(lines), [], padding)
                    lines = [[]]
        else:
            cell.append(ch)
            escaped = ch == ESCAPE
    if cell:
        lines[-1].append(("".join(cell), len(cell) + adjust - (2 if escaped else 0)))
    _tab_format(out, lines, 0, len(lines), [], padding)
    return "".join(out)


def _tab_format(out, lines, line0, line1, widths, padding):
    column, this = len(widths), line0
    while this < line1:
        if column >= len(lines[this]) - 1:  # the last cell of a line is in no column
            this += 1
            continue
        _tab_lines(out, lines, line0, this, widths)  # the lines before this column's block
        line0, width = this, 0
        while this < line1 and column < len(lines[this]) - 1:
            width = max(width, lines[this][column][1] + padding)
            this += 1
        _tab_format(out, lines, line0, this, widths + [width], padding)
        line0 = this
    _tab_lines(out, lines, line0, line1, widths)


def _tab_lines(out, lines, line0, line1, widths):
    for i in range(line0, line1):
        for j, (text, width) in enumerate(lines[i]):
            out.append(text)
            if j < len(widths):
                out.append(" " * (widths[j] - width))
        if i + 1 < len(lines):  # the last buffered line has no newline
            out.append("\n")


def dump(path, oid, out=None):
    """Copy object oid's bytes to out (stdout's binary stream); 141 when the reader
    went away, as a Go program killed by SIGPIPE."""
    import os
    import sys

    from hpcrun.images.detect import open_file

    out = out or sys.stdout.buffer
    fd = open_file(path, dirs=False, what="SIF file")
    try:
        d = find_object(sif.SifFile(path, fd), oid)
        pos, end = d.offset, d.offset + d.size
        while pos < end:
            chunk = os.pread(fd, min(1 << 20, end - pos), pos)
            if not chunk:
                raise ImageError(f"{path}: truncated SIF file (object {oid} ends at byte {end})")
            out.write(chunk)
            pos += len(chunk)
        out.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no second error at exit
        return 141
    finally:
        os.close(fd)
    return 0
