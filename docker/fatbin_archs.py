"""The GPU code a CUDA library holds: `sm_XY` machine code and `compute_XY` PTX, read from its
`.nv_fatbin` section.

`cuobjdump --list-elf` says the same, but NVIDIA ships cuobjdump in no PyPI wheel, and the CUDA
image's compiler comes from those wheels (docker/cuda_toolkit.py); this reads the fat binary's
entry headers, which stay uncompressed when the code inside them is compressed. Standard library
only, so docker/build_mamba_ssm.sh can prove which architectures its kernel really holds.

Layout (little-endian): the section is a run of fat binaries, each a 16-byte header (magic
0xBA55ED50, version u16, header size u16, payload size u64) then entries, each starting with
kind u16 (1: PTX, 2: ELF machine code), version u16, header size u32, padded payload size u32,
..., and the SM version (e.g. 90) as the u32 at byte 28 of the entry header.

    python fatbin_archs.py LIBRARY.so     # prints e.g. "compute_90 sm_80 sm_90"
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KINDS = {1: "compute", 2: "sm"}
_SM_OFFSET = 28


class NotAFatBinary(ValueError):
    """The file is no 64-bit little-endian ELF, or it has no readable .nv_fatbin section."""


def fatbin_section(data: bytes) -> bytes:
    """The `.nv_fatbin` section of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NotAFatBinary("not a 64-bit little-endian ELF file")
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    # Elf64_Shdr: name u32, type u32, flags u64, addr u64, offset u64, size u64, ...
    sections = [struct.unpack_from("<I20xQQ", data, section_offset + i * entry_size) for i in range(count)]
    names_offset = sections[names_index][1]
    for name_index, offset, size in sections:
        start = names_offset + name_index
        if data[start : data.index(b"\0", start)] == b".nv_fatbin":
            return data[offset : offset + size]
    raise NotAFatBinary("no .nv_fatbin section (no GPU code in this library)")


def archs(section: bytes) -> set[str]:
    """`sm_XY` / `compute_XY` of every entry of every fat binary in the section."""
    found: set[str] = set()
    position = 0
    while position + 16 <= len(section):
        magic, _, header_size, payload_size = struct.unpack_from("<IHHQ", section, position)
        if magic != FATBIN_MAGIC:
            if any(section[position:]):
                raise NotAFatBinary(f"no fat binary header at byte {position} of .nv_fatbin")
            break  # zero padding at the end of the section
        entry, end = position + header_size, position + header_size + payload_size
        while entry < end:
            kind, _, entry_header, padded = struct.unpack_from("<HHII", section, entry)
            (sm,) = struct.unpack_from("<I", section, entry + _SM_OFFSET)
            if kind in KINDS:
                found.add(f"{KINDS[kind]}_{sm}")
            entry += entry_header + padded
        position = end
    if not found:
        raise NotAFatBinary("the .nv_fatbin section holds no entry")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: fatbin_archs.py LIBRARY", file=sys.stderr)
        return 2
    try:
        print(" ".join(sorted(archs(fatbin_section(Path(argv[0]).read_bytes())))))
    except (NotAFatBinary, struct.error, OSError) as error:
        print(f"fatbin_archs.py: {argv[0]}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
