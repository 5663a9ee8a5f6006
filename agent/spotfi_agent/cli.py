"""Command line: `spotfi-agent run | check | info`.

Exit status: 0 on success, 1 when `check` cannot connect, 2 for invalid
settings or usage (nothing is connected then).
"""

import os
import sys

from spotfi_agent import __version__
from spotfi_agent import log as logging_setup
from spotfi_agent.compat import process_environment

USAGE = """usage: spotfi-agent [--root DIR] [--log-level LEVEL] [--transport NAME] COMMAND

Connects this router to the SpotFi cloud over MQTT.

commands:
  run      connect and serve metrics, RPC and the terminal until SIGTERM
  check    validate the settings and try one connection to the broker
  info     print the resolved settings and where each came from (token masked)

options:
  --root DIR         prefix for every system path read (/etc, /sys, /proc);
                     default / or $SPOTFI_ROOT
  --log-level LEVEL  debug, info, warning or error; overrides option log_level
  --transport NAME   native or paho; overrides option transport
  --version          print the version and exit
  -h, --help         print this help and exit
"""

COMMANDS = ("run", "check", "info")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Raised for an unknown command or option."""


def parse_arguments(argv):
    """Return (command, options dict) from argv (without the program name)."""
    options = {"root": None, "log_level": None, "transport": None}
    command = None
    index = 0
    while index < len(argv):
        argument = argv[index]
        index += 1
        if argument in ("-h", "--help"):
            return "help", options
        if argument == "--version":
            return "version", options
        if argument.startswith("--"):
            name, has_value, value = argument[2:].partition("=")
            key = name.replace("-", "_")
            if key not in options:
                raise UsageError("unknown option %s" % argument)
            if not has_value:
                if index >= len(argv):
                    raise UsageError("option --%s needs a value" % name)
                value = argv[index]
                index += 1
            options[key] = value
            continue
        if command is not None:
            raise UsageError("unexpected argument %r after command %s" % (argument, command))
        if argument not in COMMANDS:
            raise UsageError("unknown command %r; use one of: %s" % (argument, ", ".join(COMMANDS)))
        command = argument
    if command is None:
        raise UsageError("missing command; use one of: %s" % ", ".join(COMMANDS))
    return command, options


def load(options):
    """Load settings with command-line overrides; raises config.ConfigError."""
    from spotfi_agent import config

    root = options["root"] or os.getenv("SPOTFI_ROOT") or "/"
    overrides = {}
    for name in ("log_level", "transport"):
        if options[name]:
            overrides[name] = (options[name], "command line --%s" % name.replace("_", "-"))
    return config.load_settings(root=root, environ=process_environment(), overrides=overrides)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    try:
        command, options = parse_arguments(argv)
    except UsageError as error:
        sys.stderr.write("spotfi-agent: %s (see spotfi-agent --help)\n" % error)
        return EXIT_USAGE
    if command == "help":
        sys.stdout.write(USAGE)
        return EXIT_OK
    if command == "version":
        sys.stdout.write("spotfi-agent %s\n" % __version__)
        return EXIT_OK

    from spotfi_agent.config import ConfigError

    logging_setup.configure(options["log_level"] or "info")
    try:
        settings = load(options)
    except ConfigError as error:
        sys.stderr.write("spotfi-agent: %s\n" % error)
        return EXIT_USAGE
    if command == "run":
        logging_setup.configure(settings.log_level)
    else:
        # check and info print one result; log lines would only bury it.
        logging_setup.configure(options["log_level"] or "warning")

    if command == "info":
        from spotfi_agent.config import describe
        for line in describe(settings):
            sys.stdout.write(line + "\n")
        return EXIT_OK
    if command == "check":
        from spotfi_agent.check import check_connection
        return check_connection(settings)
    return run(settings)


def run(settings):
    from spotfi_agent.agent import Agent
    from spotfi_agent.transport import TransportError

    try:
        agent = Agent(settings)
    except TransportError as error:
        sys.stderr.write("spotfi-agent: %s\n" % error)
        return EXIT_USAGE
    return agent.run()
