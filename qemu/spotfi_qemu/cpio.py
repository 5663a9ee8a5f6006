"""Write a gzip-compressed cpio archive in the "newc" format the kernel unpacks as initramfs.

Entries are written with uid and gid 0 whatever user runs the build, so the
image does not depend on the builder running as root. Hard links are stored as
separate files, which costs space but keeps the writer simple.
"""

import gzip
import os
import stat

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Append directories, files, symlinks and device nodes to a gzip-compressed newc archive."""

    def __init__(self, path, compresslevel=6):
        self._file = gzip.open(path, "wb", compresslevel=compresslevel)
        self._inode = 300000
        self._names = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self._file is None:
            return
        self._write_entry(_TRAILER, 0, b"", nlink=1)
        self._file.close()
        self._file = None

    def add_directory(self, name, mode=0o755, mtime=0):
        self._write_entry(name, stat.S_IFDIR | mode, b"", nlink=2, mtime=mtime)

    def add_file(self, name, data, mode=0o644, mtime=0):
        self._write_entry(name, stat.S_IFREG | mode, data, mtime=mtime)

    def add_symlink(self, name, target, mtime=0):
        self._write_entry(name, stat.S_IFLNK | 0o777, target.encode(), mtime=mtime)

    def add_char_device(self, name, major, minor, mode=0o600):
        self._write_entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def add_tree(self, source, prefix):
        """Add the contents of directory `source` under archive directory `prefix`, parents first."""
        for directory, subdirs, files in os.walk(source):
            subdirs.sort()
            relative = os.path.relpath(directory, source)
            base = prefix if relative == "." else prefix + "/" + relative
            # os.walk lists symlinks to directories among subdirs; store them as links.
            for name in list(subdirs):
                if os.path.islink(os.path.join(directory, name)):
                    subdirs.remove(name)
                    files.append(name)
            for name in subdirs:
                info = os.lstat(os.path.join(directory, name))
                self.add_directory(base + "/" + name, stat.S_IMODE(info.st_mode), int(info.st_mtime))
            for name in sorted(files):
                self._add_path(os.path.join(directory, name), base + "/" + name)

    def _add_path(self, path, name):
        info = os.lstat(path)
        mtime = int(info.st_mtime)
        if stat.S_ISLNK(info.st_mode):
            self.add_symlink(name, os.readlink(path), mtime)
        elif stat.S_ISREG(info.st_mode):
            with open(path, "rb") as handle:
                self.add_file(name, handle.read(), stat.S_IMODE(info.st_mode), mtime)
        else:
            raise ValueError("cannot archive %s: only files, directories and symlinks are "
                             "supported" % path)

    def _write_entry(self, name, mode, data, nlink=1, mtime=0, rdev=(0, 0)):
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError("duplicate cpio entry %r" % name)
        self._names.add(name)
        self._inode += 1
        encoded_name = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded_name), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._file.write(header + encoded_name + _padding(len(header) + len(encoded_name)))
        self._file.write(data + _padding(len(data)))


def _padding(length):
    return b"\0" * (-length % 4)
