#!/bin/sh
# shellcheck shell=dash
#
# Command line of spotfi-agent on MicroPython: run, check and info (see
# `spotfi-agent --help`). A shebang line passes at most one argument to the
# interpreter and MicroPython needs four here, hence this wrapper. The
# modules are in /usr/lib/micropython, which is on MicroPython's default
# path; a MICROPYPATH set in the environment replaces that path.
#
# The agent runs idle in a 512 KB heap; 2 MB leaves room for bursts of RPC
# requests and for large MQTT messages. exec keeps the process id, so
# procd's signals reach MicroPython.
exec /usr/bin/micropython -X heapsize=2M -m spotfi_agent "$@"
