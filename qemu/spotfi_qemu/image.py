"""Build the QEMU stand-in router image from Debian packages.

The image is a kernel plus one initramfs. The initramfs contains a small /init
and, under /rom, a root tree assembled from `dpkg-deb -x` of the packages in
qemu/packages.txt (busybox, Debian's CPython 3.11 and the libraries it
loads), ptyprocess, and the stand-in scripts under qemu/rootfs/. At boot /init
lays an overlayfs over /rom whose upper layer lives on a virtio disk, as
OpenWrt lays its /overlay over /rom.

Outputs go to <build dir>/image/ and are rebuilt only when a builder input
changes (this package's sources, qemu/packages.txt, qemu/rootfs/,
requirements/agent.txt): the hash of those inputs is kept in image/stamp.

The builder needs an x86-64 Debian host with apt-get and dpkg-deb, because it
runs the unpacked busybox and python3.11 to list applets and precompile the
standard library.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile

from spotfi_qemu import elf
from spotfi_qemu.cpio import CpioWriter

QEMU_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(QEMU_DIR)
DEFAULT_BUILD_DIR = os.path.join(QEMU_DIR, "build")
PACKAGES_FILE = os.path.join(QEMU_DIR, "packages.txt")
ROOTFS_DIR = os.path.join(QEMU_DIR, "rootfs")
AGENT_REQUIREMENTS = os.path.join(REPO_DIR, "requirements", "agent.txt")

# Modules of this package that shape the image; the controller is not one.
BUILDER_SOURCES = ("image.py", "elf.py", "cpio.py")
KERNEL_META_PREFIX = "linux-image-"
STATIC_BUSYBOX_PACKAGE = "busybox-static"
PYTHON_VERSION = "3.11"
MULTIARCH = "x86_64-linux-gnu"
LIBRARY_DIRS = ("lib/" + MULTIARCH, "usr/lib/" + MULTIARCH)

# Kernel modules insmod-ed by /init; their dependencies are added from .modinfo.
KERNEL_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_console", "overlay")

OVERLAY_DISK_SIZE = 64 * 1024 * 1024

# Paths removed from the unpacked packages: documentation, tools of the
# package managers, and parts of the standard library that need a display,
# a compiler or a test suite. Extension modules whose libraries are not in
# the image are found and removed by _drop_unloadable_extensions.
PRUNED_PATHS = (
    "usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/info",
    "usr/share/locale", "usr/share/binfmts", "usr/share/bug", "usr/share/initramfs-tools",
    "usr/share/pixmaps", "usr/share/applications", "usr/share/python3",
    "usr/lib/%s/gconv" % MULTIARCH, "usr/lib/%s/engines-3" % MULTIARCH,
    "usr/lib/%s/ossl-modules" % MULTIARCH, "usr/libexec", "usr/sbin", "sbin",
    "usr/lib/%s/audit" % MULTIARCH, "etc/ca-certificates", "etc/ca-certificates.conf",
    "lib/%s/libmemusage.so" % MULTIARCH, "lib/%s/libpcprofile.so" % MULTIARCH,
    "lib/%s/libc_malloc_debug.so.0" % MULTIARCH, "lib/%s/libthread_db.so.1" % MULTIARCH,
)
PRUNED_STDLIB = (
    "test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3",
    "pydoc_data", "distutils", "_distutils_system_mod.py", "sqlite3", "curses", "venv",
    "__phello__", "__hello__.py", "antigravity.py", "this.py",
)
PRUNED_EXTENSIONS = re.compile(r"^(_test|_ctypes_test|_xxtestfuzz|xxlimited|_xxsubinterpreters)")
KEPT_BINARIES = ("usr/bin/python%s" % PYTHON_VERSION,)


class BuildError(Exception):
    """Raised when the stand-in image cannot be built; the message names the step that failed."""


class ImagePaths:
    """Files of one built image."""

    def __init__(self, directory):
        self.directory = directory
        self.kernel = os.path.join(directory, "vmlinuz")
        self.initramfs = os.path.join(directory, "initramfs.cpio.gz")
        self.overlay_template = os.path.join(directory, "overlay.img")
        self.busybox = os.path.join(directory, "busybox")
        self.manifest = os.path.join(directory, "manifest.json")
        self.stamp = os.path.join(directory, "stamp")

    def exists(self):
        return all(os.path.exists(path) for path in (
            self.kernel, self.initramfs, self.overlay_template, self.busybox, self.manifest,
            self.stamp))

    def read_manifest(self):
        with open(self.manifest) as handle:
            return json.load(handle)


def inputs_hash():
    """Return the SHA-256 of everything the image is built from."""
    digest = hashlib.sha256()
    package_dir = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join(package_dir, name) for name in BUILDER_SOURCES]
    sources += [PACKAGES_FILE, AGENT_REQUIREMENTS]
    for directory, subdirs, files in sorted(os.walk(ROOTFS_DIR)):
        subdirs.sort()
        sources += [os.path.join(directory, name) for name in sorted(files)]
    for path in sources:
        digest.update(os.path.relpath(path, REPO_DIR).encode() + b"\0")
        # Only the execute bit: git keeps no other mode bits, and umasks differ.
        digest.update(b"x\0" if os.stat(path).st_mode & stat.S_IXUSR else b"-\0")
        with open(path, "rb") as handle:
            digest.update(handle.read() + b"\0")
    return digest.hexdigest()


def build_image(build_dir=DEFAULT_BUILD_DIR, force=False, log=None):
    """Build the image under `build_dir`/image unless a build of the same inputs is there.

    Returns the ImagePaths of the image. Downloaded packages stay cached in
    `build_dir`/debs and `build_dir`/wheels between builds.
    """
    log = log or _log_stderr
    os.makedirs(build_dir, exist_ok=True)
    image = ImagePaths(os.path.join(build_dir, "image"))
    with _build_lock(build_dir):
        expected = inputs_hash()
        if not force and image.exists() and _read_text(image.stamp).strip() == expected:
            return image
        started = time.monotonic()
        log("building the QEMU stand-in image in %s" % image.directory)
        _Builder(build_dir, log).build(image, expected)
        log("built the QEMU stand-in image in %.1f s" % (time.monotonic() - started))
    return image


@contextlib.contextmanager
def _build_lock(build_dir):
    with open(os.path.join(build_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class _Builder:
    """One run of the image build in a scratch directory that replaces the old image at the end."""

    def __init__(self, build_dir, log):
        self.build_dir = build_dir
        self.log = log
        self.debs_dir = os.path.join(build_dir, "debs")
        self.wheels_dir = os.path.join(build_dir, "wheels")
        self.work_dir = os.path.join(build_dir, "work")
        self.rom = os.path.join(self.work_dir, "rom")
        self.manifest = {"packages": {}, "dropped_extensions": {}}

    def build(self, image, stamp):
        shutil.rmtree(self.work_dir, ignore_errors=True)
        os.makedirs(self.rom)
        started = time.monotonic()

        packages = self._fetch_packages(read_package_list(PACKAGES_FILE))
        kernel_deb = static_deb = None
        for name, deb in packages:
            if name.startswith(KERNEL_META_PREFIX):
                kernel_deb = deb
            elif name == STATIC_BUSYBOX_PACKAGE:
                static_deb = deb
            else:
                _run(["dpkg-deb", "-x", deb, self.rom])
        if kernel_deb is None or static_deb is None:
            raise BuildError("%s must name a %s* kernel package and %s"
                             % (PACKAGES_FILE, KERNEL_META_PREFIX, STATIC_BUSYBOX_PACKAGE))
        static_root = os.path.join(self.work_dir, "static")
        _run(["dpkg-deb", "-x", static_deb, static_root])
        self.static_busybox = os.path.join(static_root, "bin", "busybox")

        self._prune()
        self._make_ca_bundle()
        self._add_python_packages()
        self._link_busybox_applets()
        kernel = self._add_kernel(kernel_deb)
        self._add_rootfs_files()
        self._drop_unloadable_extensions()
        self._precompile_python()

        staging = os.path.join(self.work_dir, "image")
        os.makedirs(staging)
        staged = ImagePaths(staging)
        shutil.copy2(kernel, staged.kernel)
        shutil.copy2(self.static_busybox, staged.busybox)
        self._write_initramfs(staged.initramfs)
        self._make_overlay_template(staged.overlay_template)

        self.manifest.update({
            "stamp": stamp,
            "build_seconds": round(time.monotonic() - started, 1),
            "initramfs_bytes": os.path.getsize(staged.initramfs),
            "kernel_bytes": os.path.getsize(staged.kernel),
            "rom_bytes": _tree_size(self.rom),
        })
        with open(staged.manifest, "w") as handle:
            json.dump(self.manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
        with open(staged.stamp, "w") as handle:
            handle.write(stamp + "\n")

        # Swap the finished image in, then drop the scratch tree.
        shutil.rmtree(image.directory, ignore_errors=True)
        os.rename(staging, image.directory)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # Packages

    def _fetch_packages(self, names):
        """Download missing .deb files into the cache; return [(list name, deb path)]."""
        os.makedirs(self.debs_dir, exist_ok=True)
        resolved = []
        for name in names:
            if name.startswith(KERNEL_META_PREFIX):
                resolved.append((name, _resolve_kernel_package(name)))
            else:
                resolved.append((name, name))
        missing = [real for _name, real in resolved if not self._cached_deb(real)]
        if missing:
            self.log("downloading %d Debian packages" % len(missing))
            _apt_download(missing, self.debs_dir)

        result = []
        for name, real in resolved:
            deb = self._cached_deb(real)
            if deb is None:
                raise BuildError("apt-get download did not leave a .deb for %s in %s"
                                 % (real, self.debs_dir))
            fields = _run(["dpkg-deb", "-f", deb, "Package", "Version"]).splitlines()
            self.manifest["packages"][real] = fields[1].split(":", 1)[1].strip()
            result.append((name, deb))
        return result

    def _cached_deb(self, package):
        found = sorted(glob.glob(os.path.join(self.debs_dir, "%s_*.deb" % glob.escape(package))))
        return found[-1] if found else None

    # Root tree

    def _prune(self):
        for relative in PRUNED_PATHS:
            _remove(os.path.join(self.rom, relative))
        stdlib = os.path.join(self.rom, "usr", "lib", "python" + PYTHON_VERSION)
        for relative in PRUNED_STDLIB:
            _remove(os.path.join(stdlib, relative))
        for path in glob.glob(os.path.join(stdlib, "config-*")):
            _remove(path)
        dynload = os.path.join(stdlib, "lib-dynload")
        for name in os.listdir(dynload):
            if PRUNED_EXTENSIONS.match(name):
                _remove(os.path.join(dynload, name))

        # Debian's libc6 and python packages bring tools the image does not use.
        for directory in ("bin", "usr/bin"):
            full = os.path.join(self.rom, directory)
            for name in os.listdir(full) if os.path.isdir(full) else ():
                relative = directory + "/" + name
                if relative not in KEPT_BINARIES and name != "busybox":
                    _remove(os.path.join(full, name))

    def _make_ca_bundle(self):
        source = os.path.join(self.rom, "usr", "share", "ca-certificates")
        certificates = sorted(glob.glob(os.path.join(source, "*", "*.crt")))
        if not certificates:
            raise BuildError("no certificates under %s; is ca-certificates in %s?"
                             % (source, PACKAGES_FILE))
        certs_dir = os.path.join(self.rom, "etc", "ssl", "certs")
        os.makedirs(certs_dir, exist_ok=True)
        with open(os.path.join(certs_dir, "ca-certificates.crt"), "wb") as bundle:
            for path in certificates:
                with open(path, "rb") as handle:
                    bundle.write(handle.read().rstrip(b"\n") + b"\n")
        _remove(source)

    def _add_python_packages(self):
        """Add ptyprocess at the path OpenWrt's python3 packages use, and make Debian's python see it."""
        site_packages = os.path.join(self.rom, "usr", "lib", "python" + PYTHON_VERSION,
                                     "site-packages")
        os.makedirs(site_packages)
        os.symlink("python" + PYTHON_VERSION, os.path.join(self.rom, "usr", "bin", "python3"))

        # Debian's site.py searches dist-packages only; a .pth line adds
        # OpenWrt's site-packages, where the agent's ipk installs its modules.
        dist_packages = os.path.join(self.rom, "usr", "lib", "python3", "dist-packages")
        os.makedirs(dist_packages, exist_ok=True)
        with open(os.path.join(dist_packages, "openwrt-site-packages.pth"), "w") as handle:
            handle.write("/usr/lib/python%s/site-packages\n" % PYTHON_VERSION)

        for requirement in read_agent_requirements(AGENT_REQUIREMENTS):
            wheel = self._download_wheel(requirement)
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site_packages)
            self.manifest["packages"]["pypi:" + requirement] = os.path.basename(wheel)

    def _download_wheel(self, requirement):
        name = requirement.split("==", 1)[0]
        pattern = os.path.join(self.wheels_dir, "%s-*.whl" % name.replace("-", "_"))
        version = requirement.split("==", 1)[1] if "==" in requirement else None
        for wheel in sorted(glob.glob(pattern)):
            if version is None or os.path.basename(wheel).split("-")[1] == version:
                return wheel
        self.log("downloading the %s wheel" % requirement)
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--no-deps", "--only-binary=:all:", "--dest", self.wheels_dir, requirement])
        found = sorted(glob.glob(pattern))
        if not found:
            raise BuildError("pip download %s left no wheel matching %s; the image takes only "
                             "pure-Python wheels" % (requirement, pattern))
        return found[-1]

    def _link_busybox_applets(self):
        """Link every busybox applet to /bin/busybox, as `busybox --install -s` would in the guest."""
        busybox = os.path.join(self.rom, "bin", "busybox")
        for applet in self._run_staged([busybox, "--list-full"]).split():
            link = os.path.join(self.rom, applet)
            if os.path.lexists(link):
                continue
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink("/bin/busybox", link)

    def _add_kernel(self, deb):
        unpacked = os.path.join(self.work_dir, "kernel")
        _run(["dpkg-deb", "-x", deb, unpacked])
        kernels = glob.glob(os.path.join(unpacked, "boot", "vmlinuz-*"))
        module_roots = glob.glob(os.path.join(unpacked, "lib", "modules", "*"))
        if len(kernels) != 1 or len(module_roots) != 1:
            raise BuildError("%s contains %d kernels and %d module trees; expected one of each"
                             % (deb, len(kernels), len(module_roots)))
        version = os.path.basename(module_roots[0])
        self.manifest["kernel"] = version

        load_order = _module_load_order(module_roots[0], KERNEL_MODULES)
        target_root = os.path.join(self.rom, "lib", "modules", version)
        for relative in load_order:
            target = os.path.join(target_root, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(module_roots[0], relative), target)
        with open(os.path.join(target_root, "standin.load"), "w") as handle:
            handle.write("".join(relative + "\n" for relative in load_order))
        self.manifest["modules"] = load_order
        return kernels[0]

    def _add_rootfs_files(self):
        """Copy qemu/rootfs/rom over the unpacked tree; these files replace applet links."""
        source_root = os.path.join(ROOTFS_DIR, "rom")
        for directory, _subdirs, files in os.walk(source_root):
            relative = os.path.relpath(directory, source_root)
            target_dir = os.path.normpath(os.path.join(self.rom, relative))
            os.makedirs(target_dir, exist_ok=True)
            for name in files:
                target = os.path.join(target_dir, name)
                _remove(target)
                shutil.copy2(os.path.join(directory, name), target)

        # OpenWrt keeps /var in RAM as a link to /tmp.
        for relative in ("dev", "proc", "sys", "tmp", "root", "overlay", "rom", "mnt",
                         "etc/config", "etc/rc.d", "etc/uci-defaults", "usr/lib/opkg/info"):
            os.makedirs(os.path.join(self.rom, relative), exist_ok=True)
        os.symlink("tmp", os.path.join(self.rom, "var"))
        os.chmod(os.path.join(self.rom, "tmp"), 0o1777)
        os.chmod(os.path.join(self.rom, "root"), 0o700)

    def _drop_unloadable_extensions(self):
        """Check every kept ELF file's libraries; drop extension modules whose libraries are missing."""
        available = set()
        for relative in LIBRARY_DIRS:
            directory = os.path.join(self.rom, relative)
            available.update(os.listdir(directory) if os.path.isdir(directory) else ())
        dynload = os.path.join("usr", "lib", "python" + PYTHON_VERSION, "lib-dynload")

        unresolved = []
        for path in _regular_files(self.rom):
            if path.endswith(".ko") or not elf.is_elf(path):
                continue
            missing = [name for name in elf.needed_libraries(path) if name not in available]
            if not missing:
                continue
            relative = os.path.relpath(path, self.rom)
            if relative.startswith(dynload + os.sep):
                os.remove(path)
                self.manifest["dropped_extensions"][os.path.basename(path)] = missing
            else:
                unresolved.append("%s needs %s" % (relative, ", ".join(missing)))
        if unresolved:
            raise BuildError("shared libraries missing from the image: %s; add the Debian "
                             "packages that ship them to %s"
                             % ("; ".join(unresolved), PACKAGES_FILE))

    def _precompile_python(self):
        """Compile the stdlib with the image's own interpreter, so the guest never writes .pyc files."""
        python = os.path.join(self.rom, "usr", "bin", "python" + PYTHON_VERSION)
        lib_dir = os.path.join(self.rom, "usr", "lib", "python" + PYTHON_VERSION)
        self._run_staged([python, "-E", "-m", "compileall", "-q", "-j", "0", "-s", self.rom,
                          "-p", "/", "--invalidation-mode", "unchecked-hash", lib_dir],
                         env={"PYTHONHOME": os.path.join(self.rom, "usr")})

    def _run_staged(self, argv, env=None):
        """Run a binary of the image on the host through the image's own loader and libraries."""
        loader = os.path.join(self.rom, "lib", MULTIARCH, "ld-linux-x86-64.so.2")
        library_path = ":".join(os.path.join(self.rom, relative) for relative in LIBRARY_DIRS)
        environment = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
        environment.update(env or {})
        return _run([loader, "--library-path", library_path] + argv, env=environment)

    # Outputs

    def _write_initramfs(self, path):
        with CpioWriter(path) as archive:
            for directory in ("dev", "proc", "sys", "overlay", "newroot", "rom"):
                archive.add_directory(directory)
            archive.add_char_device("dev/console", 5, 1)
            with open(os.path.join(ROOTFS_DIR, "init"), "rb") as handle:
                archive.add_file("init", handle.read(), 0o755)
            # The first stage runs before /rom's shared libraries can be found.
            archive.add_directory("bin")
            with open(self.static_busybox, "rb") as handle:
                archive.add_file("bin/busybox", handle.read(), 0o755)
            archive.add_tree(self.rom, "rom")

    def _make_overlay_template(self, path):
        mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin")
        if mke2fs is None:
            raise BuildError("mke2fs is not installed; run `apt-get install e2fsprogs`")
        with open(path, "wb") as handle:
            handle.truncate(OVERLAY_DISK_SIZE)
        _run([mke2fs, "-q", "-F", "-t", "ext4", "-L", "overlay", "-m", "0", path])


def read_package_list(path):
    names = []
    with open(path) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    return names


def read_agent_requirements(path):
    """Return the `name==version` lines of requirements/agent.txt."""
    requirements = []
    with open(path) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                requirements.append(line)
    return requirements


def _module_load_order(module_root, names):
    """Return module paths relative to `module_root`, each after the modules it depends on."""
    by_name = {}
    for path in _regular_files(os.path.join(module_root, "kernel")):
        if path.endswith(".ko"):
            by_name[os.path.basename(path)[:-3].replace("-", "_")] = path
    order = []

    def visit(name, chain):
        if name in chain:
            raise BuildError("kernel modules depend on each other in a cycle: %s"
                             % " -> ".join(chain + [name]))
        path = by_name.get(name)
        if path is None:
            raise BuildError("kernel module %s is not in %s; the kernel may build it in or "
                             "have dropped it" % (name, module_root))
        relative = os.path.relpath(path, module_root)
        if relative in order:
            return
        for dependency in elf.module_info(path).get("depends", [""])[0].split(","):
            if dependency:
                visit(dependency.replace("-", "_"), chain + [name])
        order.append(relative)

    for name in names:
        visit(name, [])
    return order


def _resolve_kernel_package(name):
    """Return the versioned package a kernel meta package such as linux-image-cloud-amd64 depends on."""
    if re.match(r"linux-image-[0-9]", name):
        return name
    output = _apt(["apt-cache", "depends", "--no-recommends", "--no-suggests", name])
    for line in output.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise BuildError("apt-cache depends %s lists no linux-image-* dependency:\n%s" % (name, output))


def _apt_download(packages, directory):
    # APT::Sandbox::User=root: the _apt user may not write into the build directory.
    command = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root"] + packages
    _apt(command, cwd=directory)


def _apt(command, cwd=None):
    """Run an apt command; when the package lists are missing, run apt-get update once and retry."""
    try:
        return _run(command, cwd=cwd)
    except BuildError as error:
        if "Unable to locate package" not in str(error) and "has no installation candidate" \
                not in str(error) and "No packages found" not in str(error):
            raise
    if os.geteuid() != 0:
        raise BuildError("%s failed and the package lists may be stale; run `apt-get update` "
                         "as root and build again" % " ".join(command))
    _run(["apt-get", "update", "-q"])
    return _run(command, cwd=cwd)


def _run(command, cwd=None, env=None):
    try:
        completed = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as error:
        raise BuildError("cannot run %s: %s" % (command[0], error)) from None
    output = completed.stdout.decode("utf-8", "replace")
    errors = completed.stderr.decode("utf-8", "replace")
    # apt-cache depends exits 0 and reports an unknown package only on stderr.
    if completed.returncode != 0 or "No packages found" in errors:
        raise BuildError("%s failed with exit status %d:\n%s%s"
                         % (" ".join(command), completed.returncode, output[-2000:],
                            errors[-2000:]))
    return output


def _regular_files(root):
    for directory, _subdirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                yield path


def _tree_size(root):
    return sum(os.path.getsize(path) for path in _regular_files(root))


def _remove(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _read_text(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def _log_stderr(message):
    sys.stderr.write("qemu-image: %s\n" % message)
    sys.stderr.flush()
