"""A small pure-Python reader for CUDA cubins (ELF), so no cuobjdump is needed.

Reads what fa4aot checks and records: the target SM (``e_flags`` and the ptxas command line in
``.note.nv.tkinfo``), the toolkit version, the kernel symbols, and per kernel the parameter table
(``EIATTR_KPARAM_INFO``: ordinal, offset, size), the parameter buffer size
(``EIATTR_CBANK_PARAM_SIZE``), the required block size (``EIATTR_REQNTID``) and the register count
(``EIATTR_REGCOUNT``). Any malformed input raises :class:`CubinError`; nothing is trusted.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from fa4aot.core.errors import CorruptArtifactError

EM_CUDA = 190
SHT_SYMTAB = 2
SHT_NOTE = 7
STT_FUNC = 2

# .nv.info attribute codes (EIATTR_*) and formats (EIFMT_*)
EIFMT_NVAL, EIFMT_BVAL, EIFMT_HVAL, EIFMT_SVAL = 1, 2, 3, 4
EIATTR_REGCOUNT = 0x2F
EIATTR_KPARAM_INFO = 0x17
EIATTR_CBANK_PARAM_SIZE = 0x19
EIATTR_REQNTID = 0x10
EIATTR_MAX_THREADS = 0x05


class CubinError(CorruptArtifactError):
    """The bytes are not a cubin fa4aot can read."""


@dataclass(frozen=True)
class KernelParam:
    ordinal: int
    offset: int
    size: int


@dataclass
class KernelInfo:
    """What the cubin says about one kernel."""

    name: str
    params: list[KernelParam] = field(default_factory=list)
    cbank_param_size: int | None = None
    reqntid: tuple[int, int, int] | None = None
    max_threads: tuple[int, int, int] | None = None
    registers: int | None = None

    def param_table(self) -> list[list[int]]:
        """[[ordinal, offset, size], ...] sorted by ordinal (the form stored in metadata)."""
        return [[p.ordinal, p.offset, p.size] for p in sorted(self.params, key=lambda p: p.ordinal)]


@dataclass
class Cubin:
    """A parsed cubin."""

    sm: int
    arch: str
    abi_version: int
    toolkit: str | None
    kernels: dict[str, KernelInfo]


def _u(fmt: str, data: bytes, off: int) -> tuple:
    try:
        return struct.unpack_from("<" + fmt, data, off)
    except struct.error:
        raise CubinError(f"truncated cubin (read {fmt} at offset {off} of {len(data)})") from None


def _cstr(data: bytes, off: int) -> str:
    end = data.find(b"\0", off)
    if off < 0 or off >= len(data) or end < 0:
        raise CubinError("string table entry out of range")
    return data[off:end].decode("utf-8", "replace")


def parse(data: bytes) -> Cubin:
    """Parse cubin bytes; raises :class:`CubinError` on anything malformed or truncated."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise CubinError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise CubinError("not a 64-bit little-endian ELF")
    abi_version = data[8]
    (e_machine,) = _u("H", data, 0x12)
    if e_machine != EM_CUDA:
        raise CubinError(f"ELF machine {e_machine} is not CUDA ({EM_CUDA})")
    (e_flags,) = _u("I", data, 0x30)
    (e_shoff,) = _u("Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = _u("HHH", data, 0x3A)
    if e_shentsize != 64 or e_shnum == 0 or e_shstrndx >= e_shnum:
        raise CubinError("bad section header table")
    if e_shoff + e_shnum * 64 > len(data):
        raise CubinError("truncated cubin (section headers past the end)")
    sections = []
    for i in range(e_shnum):
        name, typ, _flags, _addr, off, size, link, info, _align, entsize = _u("IIQQQQIIQQ", data, e_shoff + i * 64)
        if typ != 8 and off + size > len(data):  # SHT_NOBITS occupies no file bytes
            raise CubinError(f"truncated cubin (section {i} past the end)")
        sections.append((name, typ, off, size, link, info, entsize))
    shstr_off = sections[e_shstrndx][2]
    named = [(_cstr(data, shstr_off + s[0]), s) for s in sections]

    # Function symbols; the kernels (entry points) among them are those with .nv.info.<name>.
    symbols: list[str] = []
    functions: set[str] = set()
    kernels: dict[str, KernelInfo] = {}
    for sname, s in named:
        if s[1] != SHT_SYMTAB or sname != ".symtab":
            continue
        strtab = sections[s[4]]
        for j in range(s[3] // 24):
            st_name, st_info, _other, _shndx, _value, _size = _u("IBBHQQ", data, s[2] + j * 24)
            nm = _cstr(data, strtab[2] + st_name) if st_name else ""
            symbols.append(nm)
            if st_info & 0xF == STT_FUNC and nm:
                functions.add(nm)

    regcounts: dict[int, int] = {}
    for sname, s in named:
        if sname == ".nv.info":
            for attr, val in _nv_info(data[s[2] : s[2] + s[3]]):
                if attr == EIATTR_REGCOUNT and isinstance(val, bytes) and len(val) >= 8:
                    sym, regs = struct.unpack_from("<II", val)
                    regcounts[sym] = regs
        elif sname.startswith(".nv.info."):
            kname = sname[len(".nv.info.") :]
            if kname not in functions:
                raise CubinError(f"{sname} names no function symbol")
            k = kernels.setdefault(kname, KernelInfo(kname))
            for attr, val in _nv_info(data[s[2] : s[2] + s[3]]):
                if attr == EIATTR_KPARAM_INFO and isinstance(val, bytes) and len(val) >= 12:
                    _index, ordinal, offset, flags = struct.unpack_from("<IHHI", val)
                    k.params.append(KernelParam(ordinal, offset, (flags >> 18) & 0x3FFF))
                elif attr == EIATTR_CBANK_PARAM_SIZE and isinstance(val, int):
                    k.cbank_param_size = val
                elif attr == EIATTR_REQNTID and isinstance(val, bytes) and len(val) >= 12:
                    k.reqntid = struct.unpack_from("<III", val)  # type: ignore[assignment]
                elif attr == EIATTR_MAX_THREADS and isinstance(val, bytes) and len(val) >= 12:
                    k.max_threads = struct.unpack_from("<III", val)  # type: ignore[assignment]
    if not kernels:
        raise CubinError("no kernels (no .nv.info.<kernel> section)")
    for idx, regs in regcounts.items():
        if idx < len(symbols) and symbols[idx] in kernels:
            kernels[symbols[idx]].registers = regs

    toolkit = None
    ptxas_arch = None
    for sname, s in named:
        if sname == ".note.nv.tkinfo":
            text = data[s[2] : s[2] + s[3]].decode("latin-1")
            m = re.search(r"release (\d+\.\d+)", text)
            toolkit = m.group(1) if m else None
            m = re.search(r"-arch (sm_\d+[af]?)", text)
            ptxas_arch = m.group(1) if m else None

    sm = (e_flags >> 8) & 0xFF if abi_version >= 8 else e_flags & 0xFF
    arch = ptxas_arch or f"sm_{sm}"
    if int(re.sub(r"\D", "", arch)) != sm:
        raise CubinError(f"ELF flags say sm_{sm} but ptxas ran with -arch {arch}")
    return Cubin(sm=sm, arch=arch, abi_version=abi_version, toolkit=toolkit, kernels=kernels)


def _nv_info(blob: bytes) -> list[tuple[int, int | bytes | None]]:
    """Decode an .nv.info section into (attribute, value) pairs."""
    out: list[tuple[int, int | bytes | None]] = []
    pos = 0
    while pos + 4 <= len(blob):
        fmt, attr = blob[pos], blob[pos + 1]
        if fmt == EIFMT_SVAL:
            (size,) = struct.unpack_from("<H", blob, pos + 2)
            if pos + 4 + size > len(blob):
                raise CubinError("truncated .nv.info attribute")
            out.append((attr, blob[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        elif fmt in (EIFMT_HVAL, EIFMT_BVAL):
            (val,) = struct.unpack_from("<H", blob, pos + 2)
            out.append((attr, val))
            pos += 4
        elif fmt == EIFMT_NVAL:
            out.append((attr, None))
            pos += 4
        else:
            raise CubinError(f"unknown .nv.info format {fmt}")
    return out
