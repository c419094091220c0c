"""What a program file is, as far as forcing cares: privileged, static, Go, a script.

Forcing through seccomp sets no_new_privs, under which a setuid or file-capability
program starts without its extra privileges; the preload strategy cannot reach a
statically linked program, nor Go's own system calls. Reading the file first lets
`mptcpkit run` say so instead of failing silently. Pure reads, no side effects.
"""

from __future__ import annotations

import os
import stat
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import BinaryIO

PT_INTERP = 3
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr (little-endian)
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
GO_SECTIONS = (b".go.buildinfo", b".note.go.buildid", b".gopclntab")


def privilege(
    path: str,
    *,
    euid: int | None = None,
    egid: int | None = None,
    groups: tuple[int, ...] | None = None,
) -> str | None:
    """Why exec'ing `path` gains privileges (setuid, setgid, file capabilities), or None.

    Only what no_new_privs would take away from the caller (by default this process)
    counts: a setuid root program run by root gains nothing, nor does a file
    capability for root.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        return None
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    groups = tuple(os.getgroups()) if groups is None else groups
    if st.st_mode & stat.S_ISUID and st.st_uid != euid:
        return f"setuid (owner uid {st.st_uid})"
    setgid = st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP
    if setgid and st.st_gid != egid and st.st_gid not in groups:
        return f"setgid (group {st.st_gid})"
    if euid != 0:
        try:
            os.getxattr(path, "security.capability")
        except OSError:
            return None
        return "file capabilities"
    return None


def elf_kind(path: str) -> str | None:
    """'static', 'go' or 'dynamic' for a 64-bit little-endian ELF file; None otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(_EHDR.size)
            if len(head) < _EHDR.size or head[:6] != b"\x7fELF\x02\x01":
                return None
            fields = _EHDR.unpack(head)
            phoff, phentsize, phnum = fields[5], fields[9], fields[10]
            f.seek(phoff)
            phdrs = f.read(phentsize * phnum)
            interp = any(
                _PHDR.unpack_from(phdrs, i * phentsize)[0] == PT_INTERP
                for i in range(phnum)
                if (i + 1) * phentsize <= len(phdrs)
            )
            if any(name in _sections(f) for name in GO_SECTIONS):
                return "go"
    except (OSError, struct.error):
        return None
    return "dynamic" if interp else "static"


def _sections(f: BinaryIO) -> dict[bytes, tuple[int, int]]:
    """{section name: (file offset, size)} of an ELF64 little-endian file."""
    f.seek(0)
    fields = _EHDR.unpack(f.read(_EHDR.size))
    shoff, shentsize, shnum, shstrndx = fields[6], fields[11], fields[12], fields[13]
    if not shoff or not shnum or shstrndx >= shnum or shentsize < _SHDR.size:
        return {}
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    headers = [_SHDR.unpack_from(table, i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    f.seek(strtab[4])
    names = f.read(min(strtab[5], 1 << 16))
    out = {}
    for h in headers:
        end = names.find(b"\0", h[0])
        out[names[h[0] : end if end >= 0 else None]] = (h[4], h[5])
    return out


def go_version(path: str) -> tuple[int, int] | None:
    """(major, minor) of the Go toolchain that built `path`, from its build info
    (the `.go.buildinfo` section, inline-string format of Go 1.18+); None otherwise."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x7fELF\x02\x01":
                return None
            where = _sections(f).get(b".go.buildinfo")
            if where is None:
                return None
            f.seek(where[0])
            head = f.read(64)
    except (OSError, struct.error):
        return None
    if not head.startswith(b"\xff Go buildinf:") or not head[15] & 2:
        return None
    length, pos, shift = 0, 32, 0
    while pos < len(head):  # uvarint length, then the version string
        byte = head[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    version = head[pos : pos + length].decode(errors="replace")
    parts = version.removeprefix("go").split(".")
    try:
        return int(parts[0]), int(parts[1].split("rc")[0].split("beta")[0])
    except (IndexError, ValueError):
        return None


def shebang(path: str) -> str | None:
    """The interpreter named on a script's `#!` line, or None."""
    try:
        with open(path, "rb") as f:
            line = f.readline(256)
    except OSError:
        return None
    if not line.startswith(b"#!"):
        return None
    words = line[2:].split()
    return os.fsdecode(words[0]) if words else None
