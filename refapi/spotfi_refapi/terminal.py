"""Terminal sessions: router `x/out` messages turned into WebSocket frames in seq order.

A TerminalSession queues the outgoing frames of one WebSocket client. The
MQTT side feeds it router messages with `handle_router_message`, and the
WebSocket handler drains `next_frame`.

Output arrives at QoS 0, so it may come out of order or not at all. The
session releases `x-data` in `seq` order and holds a few frames back while
a missing one may still come. A gap that does not fill is skipped and logged.
"""

import asyncio
import base64
import binascii
import collections
import json
import logging

from .repeats import RepeatLimiter, repeat_suffix

log = logging.getLogger(__name__)

MAX_REORDER_FRAMES = 32  # frames held back while waiting for a missing seq
GAP_WAIT = 0.5  # seconds to wait for a missing seq before skipping it
MAX_QUEUED_FRAMES = 4096  # frames not yet sent to a slow WebSocket client

# x-error codes after which the agent has no session left with this id.
# `limit` before x-started means too many sessions. After it, `limit` means
# that input was dropped, and the session goes on.
FATAL_ERROR_CODES = ("unknown_session", "disabled", "spawn_failed")

STARTING = "starting"
RUNNING = "running"
ENDED = "ended"


class Frame(collections.namedtuple("Frame", "kind payload")):
    """One frame for the WebSocket client: kind "bytes", "json" or "close"."""


class TerminalSession:
    """State and outgoing frames of one terminal session on one router."""

    def __init__(self, router_id, session_id):
        self.router_id = router_id
        self.session_id = session_id
        self.state = STARTING
        self.ended_by_router = False
        self._frames = collections.deque()
        self._frame_ready = asyncio.Event()
        self._next_seq = 0
        self._early_frames = {}  # seq -> output that arrived before an earlier seq
        self._gap_timer = None

    async def next_frame(self):
        """Wait for and return the next Frame for the client."""
        while not self._frames:
            self._frame_ready.clear()
            await self._frame_ready.wait()
        return self._frames.popleft()

    def handle_router_message(self, message):
        """Apply one router message (a dict with a `type`) to the session."""
        if self.state == ENDED:
            return
        kind = message.get("type")
        if kind == "x-started":
            self.state = RUNNING
            self._push("json", {"type": "started", "sessionId": self.session_id,
                                "pid": message.get("pid"), "cols": message.get("cols"),
                                "rows": message.get("rows")})
        elif kind == "x-data":
            self._handle_data(message)
        elif kind == "x-exit":
            self._release_held()
            self._push("json", {"type": "exit", "sessionId": self.session_id,
                                "reason": message.get("reason"),
                                "exitCode": message.get("exitCode")})
            self.end(by_router=True)
        elif kind == "x-error":
            code = message.get("code")
            self._push("json", {"type": "error", "sessionId": self.session_id, "code": code,
                                "error": message.get("error")})
            if code in FATAL_ERROR_CODES or (code == "limit" and self.state == STARTING):
                self.end(by_router=True)
        else:
            log.warning("session %s on router %s: ignored a message of unknown type %r",
                        self.session_id, self.router_id, kind)

    def fail(self, code, error):
        """End the session from this side with an error frame for the client."""
        if self.state == ENDED:
            return
        self._push("json", {"type": "error", "sessionId": self.session_id, "code": code,
                            "error": error})
        self.end(by_router=False)

    def end(self, by_router):
        """Queue the close frame. Router messages that arrive later are ignored."""
        if self.state == ENDED:
            return
        self.state = ENDED
        self.ended_by_router = by_router
        self._cancel_gap_timer()
        self._early_frames.clear()
        self._push("close", None)

    def _handle_data(self, message):
        try:
            data = base64.b64decode(message.get("data") or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            log.warning("session %s on router %s: x-data with invalid base64 ignored",
                        self.session_id, self.router_id)
            return
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            # Peers without seq (the Go bridge) get their output passed on as it comes.
            self._push("bytes", data)
            return

        if seq < self._next_seq:
            log.debug("session %s on router %s: duplicate seq %d dropped",
                      self.session_id, self.router_id, seq)
            return
        if seq > self._next_seq:
            self._early_frames[seq] = data
            if len(self._early_frames) > MAX_REORDER_FRAMES:
                self._skip_gap()
            elif self._gap_timer is None:
                loop = asyncio.get_running_loop()
                self._gap_timer = loop.call_later(GAP_WAIT, self._on_gap_timeout)
            return

        self._push("bytes", data)
        self._next_seq = seq + 1
        self._release_in_order()

    def _release_in_order(self):
        while self._next_seq in self._early_frames:
            self._push("bytes", self._early_frames.pop(self._next_seq))
            self._next_seq += 1
        if not self._early_frames:
            self._cancel_gap_timer()

    def _skip_gap(self):
        first_held = min(self._early_frames)
        log.warning("session %s on router %s: terminal output seq %d to %d was lost",
                    self.session_id, self.router_id, self._next_seq, first_held - 1)
        self._next_seq = first_held
        self._cancel_gap_timer()
        self._release_in_order()
        if self._early_frames and self._gap_timer is None:
            loop = asyncio.get_running_loop()
            self._gap_timer = loop.call_later(GAP_WAIT, self._on_gap_timeout)

    def _on_gap_timeout(self):
        self._gap_timer = None
        if self._early_frames and self.state != ENDED:
            self._skip_gap()

    def _release_held(self):
        # At exit no missing frame can still come, so output held back goes out now.
        while self._early_frames:
            self._skip_gap()

    def _cancel_gap_timer(self):
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    def _push(self, kind, payload):
        if kind != "close" and len(self._frames) >= MAX_QUEUED_FRAMES:
            log.warning("session %s on router %s: the WebSocket client reads too slowly, "
                        "%d frames queued; closing the session",
                        self.session_id, self.router_id, len(self._frames))
            self._frames.clear()
            self._frames.append(Frame("json", {"type": "error", "sessionId": self.session_id,
                                               "code": "overflow",
                                               "error": "the client read terminal output "
                                                        "too slowly"}))
            self.end(by_router=False)
            return
        self._frames.append(Frame(kind, payload))
        self._frame_ready.set()


class TerminalRegistry:
    """The open sessions of this instance, looked up by session id."""

    def __init__(self, instance_id):
        self.instance_id = instance_id
        self._sessions = {}
        self._repeats = RepeatLimiter()

    def __len__(self):
        return len(self._sessions)

    def add(self, session):
        if session.session_id in self._sessions:
            raise ValueError("terminal session %s is already registered" % session.session_id)
        self._sessions[session.session_id] = session

    def remove(self, session):
        self._sessions.pop(session.session_id, None)

    def fail_all(self, code, error):
        """End every open session with an error frame, for example at shutdown."""
        for session in list(self._sessions.values()):
            session.fail(code, error)

    def handle_message(self, router_topic, payload):
        """Route one `x/out` message to its session, if this instance has it."""
        router_id = router_topic.router_id
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            message = None
        if not isinstance(message, dict):
            self._warn(router_id, "terminal message from router %s is not a JSON object: %r",
                       router_id, payload[:80])
            return

        session_id = message.get("sessionId")
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            if message.get("type") == "x-error" and session_id is None:
                self._warn(router_id, "router %s reported terminal error %s without a "
                           "session id: %s", router_id, message.get("code"),
                           message.get("error"))
            elif router_topic.instance_id == self.instance_id:
                log.info("session %s: %s from router %s arrived after the session ended",
                         session_id, message.get("type"), router_id)
            return
        if session.router_id != router_id:
            self._warn(router_id, "session %s belongs to router %s but router %s sent %s; "
                       "ignored", session_id, session.router_id, router_id, message.get("type"))
            return
        session.handle_router_message(message)

    def _warn(self, router_id, message, *args):
        dropped = self._repeats.check((router_id, message))
        if dropped is not None:
            log.warning(message + "%s", *args, repeat_suffix(dropped))
