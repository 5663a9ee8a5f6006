"""The procd init scripts, /etc/init.d/spotfi-agent, and where their options are documented.

Each package installs its own script as /etc/init.d/spotfi-agent:
spotfi-agent.init (CPython) and spotfi-agent-mpy.init (MicroPython). The tests
that take the `init_env` fixture run for both. procd, rc.common and
validate_data exist only on OpenWrt, so dash sources the script after
procd_test_double.sh. Its functions record each procd call, and its
uci_load_validate reads options through uci_test_double and checks the
datatypes the script uses as validate_data does. logger is
logger_test_double, because this machine has no syslog socket.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from test_ucidefaults import install_test_doubles, read_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES_DIR = os.path.join(ROOT, "openwrt-feed", "net", "spotfi-agent", "files")
INIT_SCRIPT = os.path.join(FILES_DIR, "spotfi-agent.init")
MPY_INIT_SCRIPT = os.path.join(FILES_DIR, "spotfi-agent-mpy.init")
INIT_SCRIPTS = {"spotfi-agent": INIT_SCRIPT, "spotfi-agent-mpy": MPY_INIT_SCRIPT}
SHIPPED_CONFIG = os.path.join(FILES_DIR, "spotfi.config")
INSTALL_DOC = os.path.join(ROOT, "docs", "install-openwrt.md")
TOKEN = "tok-secret-81b7"

PROCD_TEST_DOUBLE = r'''
# procd_test_double.sh: records the procd calls of an init script, one line
# per call with tab-separated arguments, in $PROCD_TEST_DOUBLE_LOG.

procd_test_double_record() {
	{
		printf '%s' "$1"
		shift
		for argument in "$@"; do
			printf '\t%s' "$argument"
		done
		printf '\n'
	} >> "$PROCD_TEST_DOUBLE_LOG"
}

procd_open_instance() { procd_test_double_record open_instance "$@"; }
procd_set_param() { procd_test_double_record set_param "$@"; }
procd_append_param() { procd_test_double_record append_param "$@"; }
procd_close_instance() { procd_test_double_record close_instance "$@"; }
procd_add_reload_trigger() { procd_test_double_record reload_trigger "$@"; }
procd_add_validation() { procd_test_double_record validation "$@"; }

# The datatypes the init script uses, checked as validate_data checks them.
validate_data_test_double() {
	local datatype="$1"
	local value="$2"
	local bounds low high

	case "$datatype" in
		bool)
			case "$value" in
				0|1|on|off|true|false|yes|no|enabled|disabled) return 0 ;;
			esac
			return 1
			;;
		uinteger)
			case "$value" in
				''|*[!0-9]*) return 1 ;;
			esac
			return 0
			;;
		range\(*)
			case "$value" in
				''|*[!0-9]*) return 1 ;;
			esac
			bounds="${datatype#range(}"
			bounds="${bounds%)}"
			low="${bounds%,*}"
			high="${bounds#*,}"
			[ "$value" -ge "$low" ] && [ "$value" -le "$high" ]
			return
			;;
		or\(*)
			case "$datatype" in
				*\""$value"\"*) return 0 ;;
			esac
			return 1
			;;
		file)
			[ -f "$value" ]
			return
			;;
	esac
	return 0
}

# Like procd.sh: declares every option local, sets it from UCI or its
# default, then calls the callback with the section name and the status.
uci_load_validate() {
	local _package="$1"
	local _type="$2"
	local _name="$3"
	local _function="$4"
	local _spec _option _rest _datatype _default _value
	local _status=0
	shift 4
	for _spec in "$@"; do
		eval "local ${_spec%%:*}"
	done
	for _spec in "$@"; do
		_option="${_spec%%:*}"
		_rest="${_spec#*:}"
		_datatype="${_rest%%:*}"
		_default=""
		case "$_rest" in
			*:*) _default="${_rest#*:}" ;;
		esac
		_value="$(uci -q -c "$UCI_TEST_CONFIG_DIR" get "$_package.$_name.$_option")" || _value=""
		[ -n "$_value" ] || _value="$_default"
		if [ -n "$_value" ] && ! validate_data_test_double "$_datatype" "$_value"; then
			_status=1
		fi
		eval "$_option=\$_value"
	done
	[ -n "$_function" ] || return "$_status"
	"$_function" "$_name" "$_status"
}
'''

HARNESS = r'''
. "$PROCD_TEST_DOUBLE"
. "$INIT_SCRIPT"
"$@"
'''


class InitRun:
    """The outcome of one call into the init script: exit status, procd calls, logger calls."""

    def __init__(self, returncode, procd_calls, logger_calls, stderr):
        self.returncode = returncode
        self.procd_calls = procd_calls
        self.logger_calls = logger_calls
        self.stderr = stderr

    def params(self, name):
        return [call[2:] for call in self.procd_calls if call[:2] == ["set_param", name]]


@pytest.fixture(params=sorted(INIT_SCRIPTS))
def init_script(request):
    """The path of one package's init script."""
    return INIT_SCRIPTS[request.param]


@pytest.fixture
def init_env(tmp_path, init_script):
    """A config dir holding the shipped /etc/config/spotfi, and a runner for init script functions."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    shutil.copy(SHIPPED_CONFIG, str(config_dir / "spotfi"))
    env = install_test_doubles(str(tmp_path / "doubles"))
    double_path = tmp_path / "procd_test_double.sh"
    double_path.write_text(PROCD_TEST_DOUBLE)
    harness_path = tmp_path / "harness.sh"
    harness_path.write_text(HARNESS)
    procd_log = tmp_path / "procd.log"
    env.update({
        "PROCD_TEST_DOUBLE": str(double_path),
        "PROCD_TEST_DOUBLE_LOG": str(procd_log),
        "INIT_SCRIPT": init_script,
        "UCI_TEST_CONFIG_DIR": str(config_dir),
    })

    def uci_set(*assignments):
        for assignment in assignments:
            subprocess.run(["uci", "-c", str(config_dir), "set", "spotfi.main." + assignment],
                           env=env, check=True, timeout=30)
        subprocess.run(["uci", "-c", str(config_dir), "commit", "spotfi"], env=env, check=True,
                       timeout=30)

    def run(*command):
        for path in (procd_log, env["LOGGER_TEST_DOUBLE_LOG"]):
            if os.path.exists(str(path)):
                os.unlink(str(path))
        result = subprocess.run(["sh", str(harness_path)] + list(command), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=60)
        procd_calls = []
        if procd_log.exists():
            procd_calls = [line.split("\t") for line in procd_log.read_text().splitlines()]
        return InitRun(result.returncode, procd_calls,
                       read_calls(env["LOGGER_TEST_DOUBLE_LOG"]), result.stderr)

    run.uci_set = uci_set
    run.config_dir = config_dir
    return run


def configure(init_env, *extra):
    init_env.uci_set("enabled=1", "token=" + TOKEN, "broker=mqtts://broker.example.net:8883",
                     *extra)


def test_init_header_declares_procd_service(init_script):
    with open(init_script) as handle:
        text = handle.read()

    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert re.search(r"^USE_PROCD=1$", text, re.MULTILINE)
    start = re.search(r"^START=(\d+)$", text, re.MULTILINE)
    assert start
    # rc.d links sort as text, so START stays two digits.
    assert 90 <= int(start.group(1)) <= 99


def test_init_skips_start_when_disabled(init_env):
    run = init_env("start_service")

    assert run.returncode == 0
    assert not [call for call in run.procd_calls if call[0] == "open_instance"]
    assert len(run.logger_calls) == 1
    message = run.logger_calls[0]
    assert message[:5] == ["-s", "-t", "spotfi-agent", "-p", "daemon.notice"]
    assert "disabled" in message[-1]
    assert "uci set spotfi.main.enabled=1" in message[-1]


def test_init_rejects_missing_token(init_env):
    init_env.uci_set("enabled=1", "broker=mqtt://127.0.0.1:1883")

    run = init_env("start_service")

    assert run.returncode != 0
    assert run.procd_calls == []
    assert len(run.logger_calls) == 1
    message = run.logger_calls[0]
    assert message[:5] == ["-s", "-t", "spotfi-agent", "-p", "daemon.err"]
    assert "token is empty" in message[-1]
    assert "uci set spotfi.main.token=" in message[-1]


def test_init_rejects_missing_broker(init_env):
    init_env.uci_set("enabled=1", "token=" + TOKEN)

    run = init_env("start_service")

    assert run.returncode != 0
    assert run.procd_calls == []
    assert "broker is empty" in run.logger_calls[0][-1]
    assert TOKEN not in repr(run.logger_calls)


def test_init_rejects_invalid_value(init_env):
    configure(init_env, "keepalive=5")

    run = init_env("start_service")

    assert run.returncode != 0
    assert run.procd_calls == []
    assert len(run.logger_calls) == 1
    assert "invalid value" in run.logger_calls[0][-1]
    assert "spotfi-agent check" in run.logger_calls[0][-1]


def test_init_builds_command_line(init_env):
    configure(init_env)

    run = init_env("start_service")

    assert run.returncode == 0, run.stderr
    assert run.logger_calls == []
    expected = [
        ["open_instance"],
        ["set_param", "command", "/usr/bin/spotfi-agent", "run"],
        ["set_param", "respawn", "3600", "5", "5"],
        ["set_param", "stdout", "1"],
        ["set_param", "stderr", "1"],
        ["set_param", "file", "/etc/config/spotfi"],
    ]
    # The host's own /etc/spotfi.env, if any, would be watched as well.
    if os.path.isfile("/etc/spotfi.env"):
        expected.append(["append_param", "file", "/etc/spotfi.env"])
    expected.append(["close_instance"])
    assert run.procd_calls == expected


def test_init_takes_respawn_from_uci(init_env):
    configure(init_env, "respawn_threshold=120", "respawn_timeout=10", "respawn_retry=0")

    run = init_env("start_service")

    assert run.params("respawn") == [["120", "10", "0"]]


def test_init_never_passes_token(init_env):
    configure(init_env)

    run = init_env("start_service")

    assert TOKEN not in repr(run.procd_calls)
    assert TOKEN not in run.stderr


def test_init_watches_certificate_files(init_env, tmp_path):
    certificate = tmp_path / "ca.crt"
    certificate.write_text("-----BEGIN CERTIFICATE-----\n")
    configure(init_env, "ca_file=%s" % certificate)

    run = init_env("start_service")

    assert ["append_param", "file", str(certificate)] in run.procd_calls


def test_init_rejects_missing_certificate(init_env, tmp_path):
    configure(init_env, "ca_file=%s" % (tmp_path / "missing.crt"))

    run = init_env("start_service")

    assert run.returncode != 0
    assert run.procd_calls == []


@pytest.mark.parametrize("init_script", [INIT_SCRIPT], ids=["spotfi-agent"])
def test_cpython_init_starts_paho_transport(init_env):
    configure(init_env, "transport=paho")

    run = init_env("start_service")

    assert run.returncode == 0, run.stderr
    assert ["set_param", "command", "/usr/bin/spotfi-agent", "run"] in run.procd_calls
    assert run.logger_calls == []


@pytest.mark.parametrize("init_script", [MPY_INIT_SCRIPT], ids=["spotfi-agent-mpy"])
def test_mpy_init_rejects_paho_transport(init_env):
    configure(init_env, "transport=paho")

    run = init_env("start_service")

    assert run.returncode != 0
    assert run.procd_calls == []
    assert len(run.logger_calls) == 1
    message = run.logger_calls[0]
    assert message[:5] == ["-s", "-t", "spotfi-agent", "-p", "daemon.err"]
    assert "transport is 'paho'" in message[-1]
    assert "uci set spotfi.main.transport=native" in message[-1]
    assert TOKEN not in repr(run.logger_calls)


def test_init_scripts_validate_alike():
    assert validation_text(MPY_INIT_SCRIPT) == validation_text(INIT_SCRIPT)
    assert service_triggers_text(MPY_INIT_SCRIPT) == service_triggers_text(INIT_SCRIPT)


def test_mpy_init_runs_micropython_entry_point():
    # The entry point of spotfi-agent-mpy execs /usr/bin/micropython.
    with open(MPY_INIT_SCRIPT) as handle:
        text = handle.read()

    assert re.search(r"^PROG=/usr/bin/spotfi-agent$", text, re.MULTILINE)
    assert 'procd_set_param command "$PROG" run' in text
    assert "/usr/bin/micropython" in text


def test_init_service_triggers(init_env):
    run = init_env("service_triggers")

    assert run.procd_calls == [
        ["reload_trigger", "spotfi"],
        ["validation", "validate_spotfi_section"],
    ]


def test_init_validation_without_section_sets_nothing(init_env):
    # procd_add_validation calls the function with no arguments.
    run = init_env("validate_spotfi_section")

    assert run.returncode == 0
    assert run.procd_calls == []
    assert run.logger_calls == []


# Options: the init script's validation, the shipped UCI file, the agent's
# own defaults and the table in docs/install-openwrt.md must agree.

def function_text(path, name):
    """Return the text of shell function `name` in the script at `path`."""
    with open(path) as handle:
        text = handle.read()
    body = text[text.index(name + "() {"):]
    return body[:body.index("\n}\n")]


def validation_text(path):
    return function_text(path, "validate_spotfi_section")


def service_triggers_text(path):
    return function_text(path, "service_triggers")


def validation_spec():
    """Return {option: (datatype, default or None)} from the init script's uci_load_validate call."""
    body = validation_text(INIT_SCRIPT)
    spec = {}
    for match in re.finditer(r"'([a-z_]+):([^':]+)(?::([^']*))?'", body):
        spec[match.group(1)] = (match.group(2), match.group(3))
    return spec


def shipped_options():
    """Return {option: (value, commented out)} from the shipped UCI file."""
    options = {}
    with open(SHIPPED_CONFIG) as handle:
        for line in handle:
            match = re.match(r"^\s*(#\s*)?(option|list) ([a-z_]+) '([^']*)'\s*$", line)
            if match:
                options[match.group(3)] = (match.group(4), bool(match.group(1)))
    return options


def test_shipped_config_has_every_option():
    assert sorted(shipped_options()) == sorted(validation_spec())


def test_shipped_config_sets_only_required_options():
    active = {name: value for name, (value, commented) in shipped_options().items()
              if not commented}

    assert active == {"enabled": "0", "token": "", "broker": ""}


def test_shipped_config_comments_show_defaults():
    spec = validation_spec()

    for name, (value, commented) in shipped_options().items():
        default = spec[name][1]
        if commented and default is not None:
            assert value == default, name


def test_shipped_config_documents_every_option():
    with open(SHIPPED_CONFIG) as handle:
        lines = [line.strip() for line in handle if line.strip()]
    option_line = re.compile(r"^(#\s*)?(option|list) ")

    for index, line in enumerate(lines):
        if not option_line.match(line):
            continue
        previous = index - 1
        while previous >= 0 and option_line.match(lines[previous]):
            previous -= 1
        assert lines[previous].startswith("#"), "no comment above %r" % line


def agent_options():
    sys.path.insert(0, os.path.join(ROOT, "agent"))
    from spotfi_agent import config
    return {option.name: option for option in config.OPTIONS}


def test_validation_matches_agent_options():
    spec = validation_spec()
    options = agent_options()

    assert sorted(set(spec) - {"respawn_threshold", "respawn_timeout", "respawn_retry"}) == \
        sorted(options)
    for name, option in options.items():
        datatype, default = spec[name]
        if option.kind == "int":
            if option.maximum is None:
                assert option.minimum == 0, name
                assert datatype == "uinteger", name
            else:
                assert datatype == "range(%d,%d)" % (option.minimum, option.maximum), name
            assert default == str(option.default), name
        elif option.kind == "bool":
            assert datatype == "bool", name
            assert default == ("1" if option.default else "0"), name
        elif option.kind == "choice":
            assert datatype == "or(%s)" % ",".join('"%s"' % c for c in option.choices), name
            assert default == option.default, name
        elif option.default is not None:
            assert default == option.default, name


def doc_option_rows():
    """Return {option: default} from the options table of docs/install-openwrt.md."""
    rows = {}
    with open(INSTALL_DOC) as handle:
        for line in handle:
            match = re.match(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]*) \|", line)
            if match:
                rows[match.group(1)] = match.group(2).strip()
    return rows


def test_install_doc_table_lists_every_option():
    rows = doc_option_rows()
    spec = validation_spec()

    assert sorted(rows) == sorted(spec)
    for name, (datatype, default) in spec.items():
        if default is not None:
            assert rows[name] == "`%s`" % default, name
