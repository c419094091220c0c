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
            phoff, shoff = fields[5], fields[6]
            phentsize, phnum, shentsize, shnum, shstrndx = fields[9:14]
            f.seek(phoff)
            phdrs = f.read(phentsize * phnum)
            interp = any(
                _PHDR.unpack_from(phdrs, i * phentsize)[0] == PT_INTERP
                for i in range(phnum)
                if (i + 1) * phentsize <= len(phdrs)
            )
            if _has_go_section(f, shoff, shentsize, shnum, shstrndx):
                return "go"
    except (OSError, struct.error):
        return None
    return "dynamic" if interp else "static"


def _has_go_section(f: BinaryIO, shoff: int, shentsize: int, shnum: int, shstrndx: int) -> bool:
    if not shoff or not shnum or shstrndx >= shnum or shentsize < _SHDR.size:
        return False
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    strtab = _SHDR.unpack_from(table, shstrndx * shentsize)
    f.seek(strtab[4])
    names = f.read(min(strtab[5], 1 << 16))
    return any(name in names for name in GO_SECTIONS)


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
