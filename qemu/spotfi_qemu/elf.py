"""Read the few ELF facts the image builder checks: DT_NEEDED and .modinfo.

Only 64-bit little-endian files are handled, which is every x86-64 binary,
shared library and kernel module in the image.
"""

import struct

ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1
_PT_DYNAMIC = 2
_DT_NEEDED = 1
_DT_STRTAB = 5


class ElfError(Exception):
    """Raised when a file is not a 64-bit little-endian ELF file."""


def is_elf(path):
    with open(path, "rb") as handle:
        return handle.read(4) == ELF_MAGIC


def _read_header(data, path):
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ElfError("%s is not a 64-bit little-endian ELF file" % path)
    # Fields of Elf64_Ehdr after e_ident: type, machine, version, entry,
    # phoff, shoff, flags, ehsize, phentsize, phnum, shentsize, shnum, shstrndx.
    return struct.unpack_from("<HHIQQQIHHHHHH", data, 16)


def needed_libraries(path):
    """Return the DT_NEEDED sonames of an executable or shared library."""
    with open(path, "rb") as handle:
        data = handle.read()
    header = _read_header(data, path)
    phoff, phentsize, phnum = header[4], header[8], header[9]

    loads = []
    dynamic = None
    for index in range(phnum):
        p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + index * phentsize)
        if p_type == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return []

    needed_offsets = []
    strtab_vaddr = None
    offset, size = dynamic
    for entry in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, entry)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            needed_offsets.append(value)
        elif tag == _DT_STRTAB:
            strtab_vaddr = value

    # DT_STRTAB contains a virtual address. The PT_LOAD segment that maps it
    # gives the file offset.
    strtab = None
    for vaddr, file_offset, filesz in loads:
        if vaddr <= strtab_vaddr < vaddr + filesz:
            strtab = strtab_vaddr - vaddr + file_offset
    if strtab is None:
        raise ElfError("%s: DT_STRTAB 0x%x lies in no PT_LOAD segment" % (path, strtab_vaddr))
    return [_c_string(data, strtab + name) for name in needed_offsets]


def module_info(path):
    """Return the key=value strings of a kernel module's .modinfo section as a dict of lists."""
    with open(path, "rb") as handle:
        data = handle.read()
    header = _read_header(data, path)
    shoff, shentsize, shnum, shstrndx = header[5], header[10], header[11], header[12]

    sections = []
    for index in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize)
        sections.append((name, offset, size))
    names_offset = sections[shstrndx][1]

    info = {}
    for name, offset, size in sections:
        if _c_string(data, names_offset + name) != ".modinfo":
            continue
        for item in data[offset:offset + size].split(b"\0"):
            if b"=" in item:
                key, value = item.decode("utf-8", "replace").split("=", 1)
                info.setdefault(key, []).append(value)
    return info


def _c_string(data, offset):
    end = data.index(b"\0", offset)
    return data[offset:end].decode("utf-8", "replace")
