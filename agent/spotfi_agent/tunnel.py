"""Terminal sessions over MQTT (the x-tunnel): one shell on its own PTY per session id.

Messages arrive on `x/in` and replies leave on `x/out` or the session's
`responseTopic`, all at QoS 0; docs/protocol.md ("Terminal (x-tunnel)") is the
contract. Terminal bytes are never decoded: output goes out base64-encoded
exactly as the PTY returned it, in order, numbered by `seq` per session.

The runtime-specific part (forking onto a PTY, signals, reaping) sits behind
the adapter in spotfi_agent.ptyspawn, so another runtime can bring its own.
"""

import binascii

from spotfi_agent import jsoncodec
from spotfi_agent.compat import MICROPYTHON
from spotfi_agent.log import get_logger

log = get_logger(__name__)


def _load_spawner():
    """Import the PTY adapter on the first x-start: ptyprocess costs about 0.8 MB of RSS."""
    try:
        from spotfi_agent import ptyspawn
    except ImportError:  # a runtime without the CPython PTY modules
        return None
    return ptyspawn

DEFAULT_COLS = 80
DEFAULT_ROWS = 24
MAX_DIMENSION = 1000
MAX_SESSION_ID_LENGTH = 200
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# Output: bytes read per readable event at most, the batch size that is sent
# at once, and how long a smaller batch waits for more (seconds).
READ_SIZE = 65536
BATCH_SIZE = 32768
BATCH_DELAY = 0.003

# Backpressure: PTY reads pause while the MQTT client has more than this
# many unsent bytes, and resume when a poll finds the buffer drained.
OUTGOING_LIMIT = 1048576
RESUME_POLL = 0.01

# Input that the PTY does not take at once waits here, up to this many bytes.
MAX_PENDING_INPUT = 1048576

# Ending: seconds between SIGHUP and SIGKILL, how often a running shell is
# checked for exit, and how long output may keep coming after the shell exited.
KILL_GRACE = 2.0
EXIT_POLL = 0.5
DRAIN_QUIET = 1.0
DRAIN_MAX = 10.0

# Session states, in the order a session passes through them.
RUNNING = "running"
DRAINING = "draining"  # the shell exited or the output ended: reading what is left
ENDED = "ended"  # x-exit sent, the PTY closed, the shell not yet reaped
CLOSED = "closed"

_MESSAGE_TYPES = ("x-start", "x-data", "x-resize", "x-stop")

# Rejected requests are logged up to this many times per minute.
_LOG_REJECTIONS_PER_MINUTE = 10


class RequestError(Exception):
    """Raised when a terminal message cannot be served; the manager replies with x-error."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class TunnelManager:
    """All terminal sessions of one router.

    `context` provides loop, router_id, topics, settings, publish() and
    outgoing_bytes. `spawner` is the PTY adapter (spotfi_agent.ptyspawn by
    default): a module or object with spawn(argv, env, cwd, rows, cols),
    user_account() and SpawnError.
    """

    def __init__(self, context, spawner=None):
        self.context = context
        self.loop = context.loop
        self.router_id = context.router_id
        self.topics = context.topics
        self.spawner = spawner
        self._spawner_loaded = spawner is not None
        self._sessions = {}
        self._ending = []
        self._log_window_start = None
        self._logged_rejections = 0
        self._suppressed_rejections = 0

    @property
    def session_count(self):
        """Sessions whose shell runs or whose output is still being read."""
        return len(self._sessions)

    @property
    def ending_count(self):
        """Sessions already ended whose shell has not been reaped yet."""
        return len(self._ending)

    def handle(self, payload):
        """Serve one message received on x/in."""
        message = None
        session_id = None
        reply_topic = self.topics.x_out
        try:
            message = _parse(payload)
            reply_topic = self._reply_topic(message.get("responseTopic"))
            session_id = _session_id(message)
            self._dispatch(message, session_id, reply_topic)
        except RequestError as error:
            session = self._sessions.get(session_id) if session_id is not None else None
            if session is not None and message is not None and "responseTopic" not in message:
                reply_topic = session.reply_topic
            self.send_error(reply_topic, session_id, error.code, error.message)

    def close_all(self, reason):
        """End every session with x-exit `reason` ("shutdown" when the agent stops)."""
        for session in list(self._sessions.values()):
            session.end(reason)

    # Requests.

    def _dispatch(self, message, session_id, reply_topic):
        kind = message.get("type")
        if not isinstance(kind, str) or kind not in _MESSAGE_TYPES:
            raise RequestError("invalid_request", "unknown message type %r: expected one of %s"
                               % (kind, ", ".join(_MESSAGE_TYPES)))
        if kind == "x-start":
            self._start(message, session_id, reply_topic)
            return

        session = self._sessions.get(session_id)
        if session is None:
            if not self.context.settings.tunnel:
                raise RequestError("disabled", _disabled_text())
            raise RequestError("unknown_session",
                               "no terminal session %r on router %s; start one with x-start"
                               % (session_id, self.router_id))
        if kind == "x-data":
            session.write_input(_decode_data(message.get("data")))
        elif kind == "x-resize":
            rows = _dimension(message, "rows", None)
            cols = _dimension(message, "cols", None)
            session.resize(rows, cols)
        else:
            session.end("stopped")

    def _start(self, message, session_id, reply_topic):
        settings = self.context.settings
        if not settings.tunnel:
            raise RequestError("disabled", _disabled_text())
        if settings.tunnel_max_sessions <= 0:
            raise RequestError("disabled", "terminal sessions are disabled on router %s: "
                               "tunnel_max_sessions is 0; set it to 1 or more to allow them"
                               % self.router_id)
        if session_id in self._sessions:
            raise RequestError("invalid_request",
                               "terminal session %r already runs; choose a new sessionId "
                               "or stop this one with x-stop" % session_id)
        rows = _dimension(message, "rows", DEFAULT_ROWS)
        cols = _dimension(message, "cols", DEFAULT_COLS)
        if len(self._sessions) >= settings.tunnel_max_sessions:
            raise RequestError("limit", "router %s already runs %d terminal sessions, the "
                               "maximum (tunnel_max_sessions); stop one with x-stop first"
                               % (self.router_id, len(self._sessions)))

        child = self._spawn_shell(session_id, rows, cols)
        session = TerminalSession(self, session_id, reply_topic, child, rows, cols)
        self._sessions[session_id] = session
        log.info("router %s: terminal session %s started: pid %d, %dx%d, replies on %s",
                 self.router_id, session_id, child.pid, cols, rows, reply_topic)
        self.publish(reply_topic, {"type": "x-started", "sessionId": session_id,
                                   "pid": child.pid, "cols": cols, "rows": rows})
        session.start()

    def _spawn_shell(self, session_id, rows, cols):
        shell = self.context.settings.tunnel_shell
        if not shell:
            raise RequestError("spawn_failed", "no shell configured: set the option "
                               "tunnel_shell to an installed shell such as /bin/ash")
        if not self._spawner_loaded:
            self.spawner = _load_spawner()
            self._spawner_loaded = True
        if self.spawner is None:
            raise RequestError("spawn_failed", "%s, so terminal sessions cannot start; set "
                               "tunnel to 0" % _no_pty_reason())
        user, home = self.spawner.user_account()
        env = {
            "TERM": "xterm-256color",
            "HOME": home,
            "PATH": DEFAULT_PATH,
            "SHELL": shell,
            "USER": user,
            "LOGNAME": user,
        }
        # A login shell reads /etc/profile, as over SSH: on OpenWrt that sets
        # PS1 and PATH and prints the banner.
        argv = [shell, "-l"]
        try:
            return self.spawner.spawn(argv, env, home, rows, cols)
        except self.spawner.SpawnError as error:
            text = str(error)
            if getattr(error, "bad_program", False):
                text += "; set the option tunnel_shell to an installed shell such as /bin/ash"
        except Exception as error:
            log.exception("router %s: terminal session %s: starting %s failed",
                          self.router_id, session_id, shell)
            text = "cannot start %s: %s" % (shell, error)
        raise RequestError("spawn_failed", text)

    def _reply_topic(self, topic):
        # NOTE: only the JSON field redirects terminal replies. The agent passes
        # MQTT 5 properties to RPC only, so an x/in message's Response Topic
        # property is ignored and replies carry no Correlation Data.
        if topic is None:
            return self.topics.x_out
        # Topics the agent subscribes to are left out, because a reply there
        # would come back to the agent as a request.
        if (self.topics.is_own(topic) or self.topics.is_go_era_reply(topic)) and \
                topic not in (self.topics.x_in, self.topics.rpc_request):
            return topic
        self._log_rejection("router %s: responseTopic %r is neither under %s nor "
                            "spotfi/api/<instance>/x/out; replying on %s", self.router_id, topic,
                            self.topics.prefix, self.topics.x_out)
        return self.topics.x_out

    # Replies.

    def publish(self, topic, message):
        self.context.publish(topic, jsoncodec.dumps(message), 0, False)

    def send_error(self, topic, session_id, code, text):
        reply = {"type": "x-error", "code": code, "error": text}
        if session_id is not None:
            reply["sessionId"] = session_id
        self._log_rejection("router %s: terminal request for session %s rejected (%s): %s",
                            self.router_id, session_id, code, text)
        self.publish(topic, reply)

    def _log_rejection(self, text, *args):
        # A client that keeps sending bad messages must not flood the log.
        now = self.loop.time()
        if self._log_window_start is None or now - self._log_window_start >= 60:
            if self._suppressed_rejections:
                log.warning("router %s: %d more terminal requests rejected or redirected "
                            "in the last minute", self.router_id, self._suppressed_rejections)
            self._log_window_start = now
            self._logged_rejections = 0
            self._suppressed_rejections = 0
        if self._logged_rejections < _LOG_REJECTIONS_PER_MINUTE:
            self._logged_rejections += 1
            log.warning(text, *args)
        else:
            self._suppressed_rejections += 1

    # Called by sessions.

    def session_ended(self, session):
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        if session.state == ENDED and session not in self._ending:
            self._ending.append(session)

    def session_reaped(self, session):
        if session in self._ending:
            self._ending.remove(session)


class TerminalSession:
    """One shell on a PTY, its output stream and its lifecycle (RUNNING to CLOSED)."""

    def __init__(self, manager, session_id, reply_topic, child, rows, cols):
        self.manager = manager
        self.loop = manager.loop
        self.session_id = session_id
        self.reply_topic = reply_topic
        self.child = child
        self.rows = rows
        self.cols = cols
        self.state = RUNNING

        # Output: a batch not yet sent, and the seq of the next x-data.
        self._seq = 0
        self._batch = bytearray()
        self._batch_timer = None
        self._reading = False
        self._paused = False
        self._output_ended = False
        self._data_prefix = ('{"type":"x-data","sessionId":%s,"data":"'
                             % jsoncodec.dumps(session_id)).encode()

        # Input the PTY has not taken yet.
        self._pending_input = bytearray()
        self._writing = False

        # Timing of idle checks, exit checks and the end.
        now = self.loop.time()
        self._last_activity = now
        self._last_output = now
        self._idle_timer = None
        self._exit_timer = None
        self._kill_timer = None
        self._killed = False
        self._drain_deadline = None
        self._poll_delay = 0.001

    def start(self):
        self._add_reader()
        self._exit_timer = self.loop.call_later(EXIT_POLL, self._check_exit)
        timeout = self.manager.context.settings.tunnel_idle_timeout
        if timeout > 0:
            self._idle_timer = self.loop.call_later(timeout, self._check_idle)

    # Input.

    def write_input(self, data):
        """Write `data` to the PTY now, or queue it for the writer callback without blocking."""
        if self.state not in (RUNNING, DRAINING) or not data:
            return
        self._last_activity = self.loop.time()
        if not self._pending_input:
            written = self._write(data)
            if written is None or written == len(data):
                return
            data = data[written:]
        if len(self._pending_input) + len(data) > MAX_PENDING_INPUT:
            raise RequestError("limit", "terminal session %s does not read its input: %d bytes "
                               "wait already, the maximum is %d; %d bytes were dropped"
                               % (self.session_id, len(self._pending_input),
                                  MAX_PENDING_INPUT, len(data)))
        self._pending_input += data
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.child.fd, self._on_writable)

    def _write(self, data):
        """Return the bytes written, or None when the PTY no longer takes input."""
        try:
            return self.child.write(data)
        except OSError as error:
            # EIO means no process has the terminal open any more, so the exit
            # check ends the session soon.
            log.info("router %s: terminal session %s: input dropped: %s",
                     self.manager.router_id, self.session_id, error)
            self._pending_input = bytearray()
            return None

    def _on_writable(self):
        written = self._write(self._pending_input)
        if written:
            self._pending_input = self._pending_input[written:]
        if not self._pending_input:
            self._remove_writer()

    def resize(self, rows, cols):
        if self.state not in (RUNNING, DRAINING):
            return
        try:
            self.child.set_size(rows, cols)
        except OSError as error:
            log.info("router %s: terminal session %s: resize to %dx%d failed: %s",
                     self.manager.router_id, self.session_id, cols, rows, error)
            return
        self.rows = rows
        self.cols = cols

    # Output.

    def _on_readable(self):
        if self.manager.context.outgoing_bytes > OUTGOING_LIMIT:
            self._pause()
            return
        total = 0
        while total < READ_SIZE:
            try:
                data = self.child.read(READ_SIZE - total)
            except OSError as error:
                log.warning("router %s: terminal session %s: reading the PTY failed: %s",
                            self.manager.router_id, self.session_id, error)
                data = b""
            if data is None:
                break
            if not data:
                self._on_output_end()
                return
            total += len(data)
            self._batch += data
            if len(self._batch) >= BATCH_SIZE:
                self._send_batch()
        if total:
            now = self.loop.time()
            self._last_activity = now
            self._last_output = now
        if self._batch and self._batch_timer is None:
            self._batch_timer = self.loop.call_later(BATCH_DELAY, self._send_batch)

    def _send_batch(self):
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        if not self._batch:
            return
        # b2a_base64 ends its output with a newline, which the slice drops.
        encoded = binascii.b2a_base64(self._batch)
        self._batch = bytearray()
        payload = b"".join((self._data_prefix, encoded[:-1],
                            ('","seq":%d}' % self._seq).encode()))
        self._seq += 1
        self.manager.context.publish(self.reply_topic, payload, 0, False)

    def _pause(self):
        if self._paused:
            return
        self._paused = True
        self._remove_reader()
        self.loop.call_later(RESUME_POLL, self._try_resume)

    def _try_resume(self):
        if self.state not in (RUNNING, DRAINING):
            return
        if self.manager.context.outgoing_bytes > OUTGOING_LIMIT:
            self.loop.call_later(RESUME_POLL, self._try_resume)
            return
        self._paused = False
        self._add_reader()

    def _on_output_end(self):
        self._output_ended = True
        self._remove_reader()
        self._send_batch()
        if self.state == RUNNING:
            self._begin_drain()

    # The shell's own exit: hang up the rest of its session, read the output
    # to its end, reap the shell, then send x-exit.

    def _check_exit(self):
        self._exit_timer = None
        if self.state != RUNNING:
            return
        if self.child.has_exited():
            self._begin_drain()
            return
        self._exit_timer = self.loop.call_later(EXIT_POLL, self._check_exit)

    def _begin_drain(self):
        self.state = DRAINING
        self._cancel_timers()
        self.child.hang_up()
        self._kill_timer = self.loop.call_later(KILL_GRACE, self._kill_remaining)
        self._drain_deadline = self.loop.time() + KILL_GRACE + DRAIN_MAX
        self._poll_delay = 0.001
        self._poll_drain()

    def _poll_drain(self):
        if self.state != DRAINING:
            return
        if self.child.reap() is not None and self._output_complete():
            self._finish()
            return
        self.loop.call_later(self._poll_delay, self._poll_drain)
        self._poll_delay = min(self._poll_delay * 2, 0.1)

    def _output_complete(self):
        if self._output_ended:
            return True
        now = self.loop.time()
        if now >= self._drain_deadline:
            log.warning("router %s: terminal session %s: the terminal is still open %.0f s "
                        "after the shell ended; a process outside the session holds it",
                        self.manager.router_id, self.session_id, KILL_GRACE + DRAIN_MAX)
            return True
        # After SIGKILL only a process that left the session (setsid) can
        # keep the terminal open, so DRAIN_QUIET seconds without output end it.
        return self._killed and not self._paused and now - self._last_output >= DRAIN_QUIET

    def _finish(self):
        self._read_rest()
        self._send_batch()
        self._close_pty()
        self.state = CLOSED
        self.manager.session_ended(self)
        exit_code = self.child.exit_code
        log.info("router %s: terminal session %s ended: the shell exited with code %s",
                 self.manager.router_id, self.session_id, exit_code)
        self.manager.publish(self.reply_topic, {"type": "x-exit", "sessionId": self.session_id,
                                                "reason": "exit", "exitCode": exit_code})

    def _read_rest(self):
        # Without EIO the reader may hold back bytes already in the PTY.
        if self._output_ended or self.child.closed:
            return
        for _ in range(16):
            try:
                data = self.child.read(READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self._batch += data
            if len(self._batch) >= BATCH_SIZE:
                self._send_batch()

    # Ending on request: x-stop, the idle timeout or the agent's shutdown.

    def end(self, reason):
        """Send x-exit with `reason` now, close the PTY and kill the shell's session."""
        if self.state in (ENDED, CLOSED):
            return
        was_running = self.state == RUNNING
        self._send_batch()
        self._cancel_timers()
        if was_running:
            self.child.hang_up()
            self._kill_timer = self.loop.call_later(KILL_GRACE, self._kill_remaining)
        self._close_pty()
        self.state = ENDED
        self.manager.session_ended(self)

        reply = {"type": "x-exit", "sessionId": self.session_id, "reason": reason}
        if self.child.reap() is not None:
            reply["exitCode"] = self.child.exit_code
        log.info("router %s: terminal session %s ended (%s)", self.manager.router_id,
                 self.session_id, reason)
        self.manager.publish(self.reply_topic, reply)
        self._poll_delay = 0.001
        self._poll_reap()

    def _poll_reap(self):
        if self.child.reap() is not None:
            self.state = CLOSED
            self.manager.session_reaped(self)
            return
        self.loop.call_later(self._poll_delay, self._poll_reap)
        self._poll_delay = min(self._poll_delay * 2, 0.1)

    def _check_idle(self):
        self._idle_timer = None
        if self.state != RUNNING:
            return
        timeout = self.manager.context.settings.tunnel_idle_timeout
        if timeout <= 0:
            return
        idle = self.loop.time() - self._last_activity
        if idle >= timeout:
            self.end("idle")
            return
        self._idle_timer = self.loop.call_later(timeout - idle, self._check_idle)

    def _kill_remaining(self):
        self._kill_timer = None
        self._killed = True
        self.child.kill_remaining()

    # Resources.

    def _add_reader(self):
        if not self._reading and not self.child.closed and not self._output_ended:
            self._reading = True
            self.loop.add_reader(self.child.fd, self._on_readable)

    def _remove_reader(self):
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.child.fd)

    def _remove_writer(self):
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.child.fd)

    def _close_pty(self):
        self._remove_reader()
        self._remove_writer()
        self._pending_input = bytearray()
        self.child.close()

    def _cancel_timers(self):
        for timer in (self._idle_timer, self._exit_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = None
        self._exit_timer = None


def _no_pty_reason():
    if MICROPYTHON:
        from spotfi_agent import mpyprocess
        return mpyprocess.pty_unavailable_reason()
    return "this runtime has no PTY support"


def _disabled_text():
    return "terminal sessions are disabled (option tunnel is 0); set tunnel to 1 to allow them"


def _parse(payload):
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeError:
            raise RequestError("invalid_request", "the message is not UTF-8 text") from None
    try:
        message = jsoncodec.loads(payload)
    except ValueError as error:
        raise RequestError("invalid_request", "the message is not valid JSON: %s" % error) from None
    if not isinstance(message, dict):
        raise RequestError("invalid_request", "the message must be a JSON object, got %s"
                           % type(message).__name__)
    return message


def _session_id(message):
    session_id = message.get("sessionId")
    if not isinstance(session_id, str) or not session_id:
        raise RequestError("invalid_request", "sessionId must be a non-empty string, got %r"
                           % (session_id,))
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise RequestError("invalid_request", "sessionId is %d characters long, the maximum is %d"
                           % (len(session_id), MAX_SESSION_ID_LENGTH))
    return session_id


def _dimension(message, key, default):
    """Return message[key] as a terminal size in 1..MAX_DIMENSION, or `default` when absent."""
    value = message.get(key)
    if value is None:
        if default is None:
            raise RequestError("invalid_request", "%s is missing: give an integer from 1 to %d"
                               % (key, MAX_DIMENSION))
        return default
    # bool is an int subclass, and JSON true is no size.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSION:
        raise RequestError("invalid_request", "%s must be an integer from 1 to %d, got %r"
                           % (key, MAX_DIMENSION, value))
    return value


def _decode_data(text):
    if not isinstance(text, str):
        raise RequestError("invalid_request", "data must be a base64 string, got %r" % (text,))
    raw = text.encode()
    if len(raw) % 4:
        raw += b"=" * (4 - len(raw) % 4)
    try:
        data = binascii.a2b_base64(raw)
    except ValueError:
        data = None
    # a2b_base64 skips characters outside the alphabet; encoding the result
    # again and comparing catches them.
    if data is None or binascii.b2a_base64(data)[:-1] != raw:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise RequestError("invalid_request", "data is not valid base64: %r" % shown)
    return data
