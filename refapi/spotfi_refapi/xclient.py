"""Terminal client for the reference API's WebSocket /x endpoint.

    python3 -m spotfi_refapi.xclient --url http://127.0.0.1:8080 ROUTER_ID
    python3 -m spotfi_refapi.xclient --url http://127.0.0.1:8080 --command 'uname -a' ROUTER_ID

Interactive mode puts the local terminal in raw mode and forwards keystrokes
and output; Ctrl-] ends the session. With --command it sends the command and
a newline, prints the output, and returns once the output has been idle for
--idle seconds or the remote shell exits.

Exit status: the remote shell's exit code when it reports one (1 when the
agent lost it), 0 after Ctrl-] or an idle --command, 1 on a session error,
2 on invalid arguments.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import urllib.parse

import aiohttp

ESCAPE_BYTE = b"\x1d"  # Ctrl-]
DEFAULT_IDLE = 2.0
DEFAULT_START_TIMEOUT = 20.0


class SessionError(Exception):
    """Raised when the API or the router reports an error for the session."""


def terminal_url(base_url, router_id, cols, rows):
    """Return the ws:// or wss:// URL of /x for an http(s):// or ws(s):// base URL."""
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError("invalid --url %r: expected http://host:port or https://host:port"
                         % base_url)
    query = {"routerId": router_id}
    if cols:
        query["cols"] = str(cols)
    if rows:
        query["rows"] = str(rows)
    path = parts.path.rstrip("/") + "/x"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path,
                                    urllib.parse.urlencode(query), ""))


def _control_message(text):
    """Parse a text frame, raising SessionError for error frames."""
    message = json.loads(text)
    if message.get("type") == "error":
        raise SessionError("%s: %s" % (message.get("code"), message.get("error")))
    return message


async def _open(session, url):
    try:
        return await session.ws_connect(url, autoping=True, heartbeat=30.0)
    except aiohttp.WSServerHandshakeError as error:
        reason = await _rejection_reason(session, url) or error.message
        raise SessionError("the API rejected the terminal (HTTP %d): %s"
                           % (error.status, reason)) from None
    except aiohttp.ClientError as error:
        raise SessionError("could not connect to %s: %s" % (url, error)) from None


async def _rejection_reason(session, url):
    """Return the API's JSON `error` for a refused /x request, or None.

    The WebSocket handshake error carries no body, so the same checks are
    asked for again with a plain GET, which never opens a session.
    """
    http_url = "http" + url[len("ws"):]
    try:
        async with session.get(http_url) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError):
        return None
    return body.get("error") if isinstance(body, dict) else None


async def _wait_started(socket, timeout):
    async def wait():
        async for frame in socket:
            if frame.type == aiohttp.WSMsgType.TEXT:
                message = _control_message(frame.data)
                if message.get("type") == "started":
                    return message
                if message.get("type") == "exit":
                    raise SessionError("the session ended before it started: %s"
                                       % message.get("reason"))
        raise SessionError("the API closed the WebSocket before the terminal started")

    try:
        return await asyncio.wait_for(wait(), timeout)
    except asyncio.TimeoutError:
        raise SessionError("the terminal did not start within %g s" % timeout) from None


async def run_command(url, command, idle, start_timeout, output):
    """Send `command` to a new session, copy its output and return the exit status."""
    async with aiohttp.ClientSession() as session:
        socket = await _open(session, url)
        async with socket:
            await _wait_started(socket, start_timeout)
            await socket.send_bytes(command.encode("utf-8") + b"\n")
            while True:
                try:
                    frame = await socket.receive(timeout=idle)
                except asyncio.TimeoutError:
                    return 0
                if frame.type == aiohttp.WSMsgType.BINARY:
                    output.write(frame.data)
                    output.flush()
                elif frame.type == aiohttp.WSMsgType.TEXT:
                    message = _control_message(frame.data)
                    if message.get("type") == "exit":
                        return _exit_status(message)
                else:
                    return 0


def _exit_status(message):
    """Return the shell's exit status, 1 when the agent lost it (-1), 0 when absent."""
    code = message.get("exitCode")
    if isinstance(code, bool) or not isinstance(code, int):
        return 0
    return code if 0 <= code <= 255 else 1


@contextlib.contextmanager
def _raw_terminal(fd):
    """Put the terminal `fd` in raw mode and restore it on exit. Do nothing when it is not a tty."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_interactive(url, start_timeout):
    """Bridge the local terminal to a new session and return its exit status.

    The bridge runs until the shell exits or the user presses Ctrl-].
    """
    loop = asyncio.get_running_loop()
    stdin_fd = sys.stdin.fileno()
    stdout_fd = sys.stdout.fileno()
    keys = asyncio.Queue()

    async with aiohttp.ClientSession() as session:
        socket = await _open(session, url)
        async with socket:
            await _wait_started(socket, start_timeout)

            def on_input():
                data = os.read(stdin_fd, 4096)
                keys.put_nowait(data)

            def on_resize():
                size = shutil.get_terminal_size()
                asyncio.ensure_future(socket.send_json(
                    {"type": "resize", "cols": size.columns, "rows": size.lines}))

            with _raw_terminal(stdin_fd):
                loop.add_reader(stdin_fd, on_input)
                loop.add_signal_handler(signal.SIGWINCH, on_resize)
                sender = asyncio.create_task(_send_keys(socket, keys))
                try:
                    return await _copy_output(socket, stdout_fd, sender)
                finally:
                    sender.cancel()
                    loop.remove_reader(stdin_fd)
                    loop.remove_signal_handler(signal.SIGWINCH)


async def _send_keys(socket, keys):
    """Forward keystrokes until Ctrl-] or the end of input."""
    while True:
        data = await keys.get()
        if not data:
            return
        if ESCAPE_BYTE in data:
            before = data.split(ESCAPE_BYTE, 1)[0]
            if before:
                await socket.send_bytes(before)
            return
        await socket.send_bytes(data)


async def _copy_output(socket, stdout_fd, sender):
    receiver = asyncio.ensure_future(socket.receive())
    try:
        while True:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                return 0
            frame = receiver.result()
            if frame.type == aiohttp.WSMsgType.BINARY:
                os.write(stdout_fd, frame.data)
            elif frame.type == aiohttp.WSMsgType.TEXT:
                message = _control_message(frame.data)
                if message.get("type") == "exit":
                    return _exit_status(message)
            else:
                return 0
            receiver = asyncio.ensure_future(socket.receive())
    finally:
        receiver.cancel()


def build_argument_parser():
    parser = argparse.ArgumentParser(
        prog="python3 -m spotfi_refapi.xclient",
        description="Open a terminal on a router through the reference API. "
                    "Press Ctrl-] to leave an interactive session.")
    parser.add_argument("router_id", metavar="ROUTER_ID", help="the router to open a terminal on")
    parser.add_argument("--url", default="http://127.0.0.1:8080",
                        help="base URL of the reference API (default %(default)s)")
    parser.add_argument("--command", help="run this command instead of an interactive session")
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE,
                        help="with --command: seconds without output after which the client "
                             "exits (default %(default)s)")
    parser.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT,
                        help="seconds to wait for the router to start the terminal "
                             "(default %(default)s)")
    parser.add_argument("--cols", type=int, help="terminal columns (default: the local size)")
    parser.add_argument("--rows", type=int, help="terminal rows (default: the local size)")
    return parser


def main(argv=None):
    options = build_argument_parser().parse_args(argv)
    size = shutil.get_terminal_size()
    cols = options.cols or size.columns
    rows = options.rows or size.lines
    try:
        url = terminal_url(options.url, options.router_id, cols, rows)
    except ValueError as error:
        sys.stderr.write("xclient: error: %s\n" % error)
        return 2

    try:
        if options.command is not None:
            return asyncio.run(run_command(url, options.command, options.idle,
                                           options.start_timeout, sys.stdout.buffer))
        if not os.isatty(sys.stdin.fileno()):
            sys.stderr.write("xclient: error: standard input is not a terminal; "
                             "use --command for non-interactive use\n")
            return 2
        return asyncio.run(run_interactive(url, options.start_timeout))
    except SessionError as error:
        sys.stderr.write("\r\nxclient: error: %s\n" % error)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
