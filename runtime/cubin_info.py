"""Per-kernel resources read from a cubin's ELF: registers and stack frame, as the driver will see them.

ptxas' ``-v`` report is text in NVRTC's program log; the cubin's ``.nv.info`` section holds the same facts
as attributes the CUDA driver reads at load time (``EIATTR_REGCOUNT``, ``EIATTR_FRAME_SIZE``). Reading them
from the binary does not depend on the log being complete: on the H200 machine NVRTC 13.0 once returned a log
without one kernel's ``Used N registers`` line (bench/RESULTS.md), which a log-only check took for a failure.

``.nv.info`` layout (the format cuobjdump ``-elf`` decodes): a sequence of records, each ``u8 format, u8
attribute`` then, for format ``EIFMT_SVAL`` (4), a ``u16`` payload size and the payload; every other format
carries its value in the next two bytes. The payload of ``REGCOUNT`` and ``FRAME_SIZE`` is ``u32 symbol
index, u32 value``; the symbol index points into ``.symtab``.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from sparsert.runtime.errors import DeviceError

EIFMT_SVAL = 0x04
EIATTR_FRAME_SIZE = 0x11
EIATTR_REGCOUNT = 0x2F


@dataclass(frozen=True)
class KernelResources:
    """What one function of a cubin needs per thread: ``registers`` and ``frame_bytes`` of local-memory stack
    frame (register spills live in the frame, so a frame of 0 bytes means no spills)."""

    registers: int
    frame_bytes: int


def nv_info_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(format, attribute, payload)`` for every record of one ``.nv.info`` section's bytes; for a format other
    than ``EIFMT_SVAL`` the payload is the two value bytes. Raises DeviceError on a truncated record."""
    records = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise DeviceError(f".nv.info: record header at byte {pos} runs past the section end ({len(data)})")
        fmt, attr, value = struct.unpack_from("<BBH", data, pos)
        pos += 4
        if fmt == EIFMT_SVAL:
            if pos + value > len(data):
                raise DeviceError(f".nv.info: attribute 0x{attr:02x} at byte {pos - 4} says {value} payload "
                                  f"bytes, the section has {len(data) - pos} left")
            records.append((fmt, attr, data[pos:pos + value]))
            pos += value
        else:
            records.append((fmt, attr, data[pos - 2:pos]))
    return records


def kernel_resources(cubin: bytes) -> dict[str, KernelResources]:
    """Registers and stack frame of every function in ``cubin`` (an ELF image from NVRTC or ptxas), keyed by
    mangled symbol name. A function with a register count but no frame record gets ``frame_bytes = 0``.
    Raises DeviceError if ``cubin`` is not a readable ELF image."""
    try:
        elf = ELFFile(io.BytesIO(cubin))
        symtab = elf.get_section_by_name(".symtab")
        info = elf.get_section_by_name(".nv.info")
        if symtab is None or info is None:
            raise DeviceError("cubin has no .symtab or .nv.info section")
        regs: dict[int, int] = {}
        frames: dict[int, int] = {}
        for fmt, attr, payload in nv_info_records(info.data()):
            if fmt == EIFMT_SVAL and attr in (EIATTR_REGCOUNT, EIATTR_FRAME_SIZE) and len(payload) >= 8:
                sym, value = struct.unpack_from("<II", payload)
                (regs if attr == EIATTR_REGCOUNT else frames)[sym] = value
        return {symtab.get_symbol(sym).name: KernelResources(registers=n, frame_bytes=frames.get(sym, 0))
                for sym, n in regs.items()}
    except (ELFError, struct.error, IndexError) as exc:
        raise DeviceError(f"cannot read kernel resources from the cubin ({len(cubin)} bytes): {exc}") from exc
