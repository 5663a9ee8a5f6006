"""HTTP and WebSocket endpoints on aiohttp. docs/refapi.md lists them with examples."""

import asyncio
import base64
import json
import logging
import uuid

import redis.exceptions
from aiohttp import WSMsgType, web

from . import rpc, topics
from .errors import BrokerUnavailableError, StoreError
from .terminal import ENDED, STARTING, TerminalSession

log = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("service", object)

MAX_TERMINAL_SIZE = 1000  # columns or rows
INPUT_CHUNK = 16 * 1024  # bytes of terminal input per x-data message
TERMINAL_QOS = 0
STOP_TIMEOUT = 5.0

STORAGE_ERRORS = (redis.exceptions.RedisError, OSError, StoreError)


def error_response(status, message, **extra):
    body = {"error": message}
    body.update(extra)
    return web.json_response(body, status=status)


def build_app(service):
    """Return the aiohttp Application of `service` (a spotfi_refapi.service.Service)."""
    app = web.Application(client_max_size=1024 * 1024)
    app[SERVICE_KEY] = service
    app.router.add_get("/health", handle_health)
    app.router.add_get("/routers", handle_list_routers)
    app.router.add_get("/routers/{router_id}", handle_get_router)
    app.router.add_post("/routers/{router_id}/rpc", handle_rpc)
    app.router.add_get("/x", handle_terminal)
    return app


async def handle_health(request):
    service = request.app[SERVICE_KEY]
    broker_ok = service.broker.connected.is_set()
    body = {
        "instance": service.settings.instance_id,
        "broker": {"connected": broker_ok, "url": service.settings.broker.url},
        "redis": {"ok": True},
        "database": {"ok": True, "dialect": service.settings.database.dialect},
        "terminalSessions": len(service.terminals),
    }
    try:
        await service.redis.ping()
    except (redis.exceptions.RedisError, OSError) as error:
        body["redis"] = {"ok": False, "error": str(error)}
    try:
        await service.store.ping()
    except StoreError as error:
        body["database"] = {"ok": False, "dialect": service.settings.database.dialect,
                            "error": str(error)}

    healthy = broker_ok and body["redis"]["ok"] and body["database"]["ok"]
    body["status"] = "ok" if healthy else "degraded"
    return web.json_response(body, status=200 if healthy else 503)


async def handle_list_routers(request):
    service = request.app[SERVICE_KEY]
    try:
        rows = await service.store.list_routers()
        online = await service.presence.online_map([row["id"] for row in rows])
    except STORAGE_ERRORS as error:
        log.warning("GET /routers failed: %s", error)
        return error_response(503, "could not read routers: %s" % error)

    routers = []
    for row in rows:
        routers.append({
            "id": row["id"],
            "name": row["name"],
            "status": "online" if online[row["id"]] else "offline",
            "lastStatus": row["status"],
            "lastSeen": row["lastSeen"],
            "createdAt": row["createdAt"],
        })
    return web.json_response({"routers": routers})


def _router_id_or_error(router_id, action, request_id=None):
    problem = topics.router_id_problem(router_id)
    if problem is None:
        return None
    log.info("%s %s rejected: invalid router id %r: %s", action, request_id or "", router_id,
             problem)
    return error_response(400, "invalid router id %r: %s" % (router_id, problem),
                          field="routerId")


async def handle_get_router(request):
    service = request.app[SERVICE_KEY]
    router_id = request.match_info["router_id"]
    invalid = _router_id_or_error(router_id, "GET /routers/{id}")
    if invalid is not None:
        return invalid

    try:
        row = await service.store.get_router(router_id)
        online, heartbeat, metrics = await service.presence.read(router_id)
    except STORAGE_ERRORS as error:
        log.warning("GET /routers/%s failed: %s", router_id, error)
        return error_response(503, "could not read router %s: %s" % (router_id, error))
    if row is None and not online:
        return error_response(404, "router %s is unknown" % router_id)

    row = row or {}
    nas_shortname = row.get("nasShortname")
    return web.json_response({
        "id": router_id,
        "name": row.get("name", router_id),
        "status": "online" if online else "offline",
        "lastStatus": row.get("status"),
        "lastSeen": row.get("lastSeen"),
        "createdAt": row.get("createdAt"),
        "lastHeartbeat": heartbeat,
        "metrics": metrics.get("metrics") if isinstance(metrics, dict) else None,
        "nas": {"shortname": nas_shortname} if nas_shortname is not None else None,
    })


async def _router_unavailable(service, router_id, action, request_id):
    """Return a 404/409/503 response when the router cannot be reached, else None."""
    try:
        if await service.presence.is_online(router_id):
            return None
        known = await service.store.get_router(router_id) is not None
    except STORAGE_ERRORS as error:
        log.warning("%s %s for router %s: could not read router state: %s",
                    action, request_id, router_id, error)
        return error_response(503, "could not read the state of router %s: %s"
                              % (router_id, error))
    if known:
        log.info("%s %s for router %s rejected: the router is offline",
                 action, request_id, router_id)
        return error_response(409, "router %s is offline" % router_id)
    log.info("%s %s for router %s rejected: the router is unknown", action, request_id, router_id)
    return error_response(404, "router %s is unknown" % router_id)


async def handle_rpc(request):
    service = request.app[SERVICE_KEY]
    router_id = request.match_info["router_id"]
    request_id = service.rpc.new_request_id()
    invalid = _router_id_or_error(router_id, "RPC", request_id)
    if invalid is not None:
        return invalid

    try:
        body = await request.json()
    except ValueError as error:
        log.info("RPC %s for router %s rejected: the body is not JSON: %s",
                 request_id, router_id, error)
        return error_response(400, "the request body is not JSON: %s" % error, field=None)
    try:
        call = rpc.parse_request_body(body)
    except rpc.RequestBodyError as error:
        log.info("RPC %s for router %s rejected: %s", request_id, router_id, error)
        return error_response(400, str(error), field=error.field)

    unavailable = await _router_unavailable(service, router_id, "RPC", request_id)
    if unavailable is not None:
        return unavailable

    try:
        result = await service.rpc.call(router_id, request_id, call)
    except BrokerUnavailableError as error:
        log.warning("RPC %s for router %s failed: %s", request_id, router_id, error)
        return error_response(503, str(error), id=request_id)
    except rpc.RpcTimeoutError as error:
        log.warning("RPC %s for router %s timed out: %s", request_id, router_id, error)
        return error_response(504, str(error), id=request_id)

    return _rpc_result_response(router_id, request_id, call, result)


def _rpc_result_response(router_id, request_id, call, result):
    status = result.get("status")
    if status == "success":
        body = {"id": request_id, "status": "success", "result": result.get("result")}
        if result.get("truncated"):
            body["truncated"] = True
        return web.json_response(body)

    if status == "error":
        log.warning("RPC %s for router %s (%s %s) failed on the router: %s [%s]",
                    request_id, router_id, call.path, call.method, result.get("error"),
                    result.get("code"))
        body = {"id": request_id, "status": "error", "error": result.get("error"),
                "stderr": result.get("stderr"), "code": result.get("code"),
                "result": result.get("result")}
        return web.json_response(body, status=502)

    log.warning("RPC %s for router %s: the result has the invalid status %r",
                request_id, router_id, status)
    return error_response(502, "router %s sent an RPC result with the invalid status %r"
                          % (router_id, status), id=request_id)


def _terminal_size(request, name):
    """Return the cols or rows query value as an int, or None when absent.

    Raise ValueError when the value is invalid.
    """
    text = request.query.get(name)
    if text in (None, ""):
        return None
    if not text.isdigit() or not 1 <= int(text) <= MAX_TERMINAL_SIZE:
        raise ValueError("invalid %s %r: expected an integer from 1 to %d"
                         % (name, text, MAX_TERMINAL_SIZE))
    return int(text)


async def handle_terminal(request):
    service = request.app[SERVICE_KEY]
    session_id = str(uuid.uuid4())
    router_id = request.query.get("routerId", "")
    invalid = _router_id_or_error(router_id, "terminal", session_id)
    if invalid is not None:
        return invalid
    try:
        cols = _terminal_size(request, "cols")
        rows = _terminal_size(request, "rows")
    except ValueError as error:
        log.info("terminal %s for router %s rejected: %s", session_id, router_id, error)
        return error_response(400, str(error))
    unavailable = await _router_unavailable(service, router_id, "terminal", session_id)
    if unavailable is not None:
        return unavailable
    if not service.broker.connected.is_set():
        log.warning("terminal %s for router %s rejected: the MQTT broker is not connected",
                    session_id, router_id)
        return error_response(503, "the MQTT broker %s is not connected"
                              % service.settings.broker.url)

    socket = web.WebSocketResponse(heartbeat=30.0)
    if not socket.can_prepare(request).ok:
        # Checked last so that a plain GET reports why a WebSocket would be refused.
        return error_response(400, "GET /x opens a terminal over WebSocket; send an "
                                   "Upgrade: websocket request")
    await socket.prepare(request)
    session = TerminalSession(router_id, session_id)
    service.terminals.add(session)
    bridge = _TerminalBridge(service, socket, session)
    try:
        await bridge.run(cols, rows)
    finally:
        service.terminals.remove(session)
    return socket


class _TerminalBridge:
    """Copies frames between one WebSocket client and one router terminal session."""

    def __init__(self, service, socket, session):
        self.service = service
        self.socket = socket
        self.session = session
        self.label = "session %s on router %s" % (session.session_id, session.router_id)

    async def publish(self, message):
        message["sessionId"] = self.session.session_id
        await self.service.broker.publish(topics.terminal_in(self.session.router_id), message,
                                          TERMINAL_QOS)

    async def run(self, cols, rows):
        start = {"type": "x-start",
                 "responseTopic": topics.terminal_out(self.session.router_id,
                                                      self.service.settings.instance_id)}
        if cols is not None:
            start["cols"] = cols
        if rows is not None:
            start["rows"] = rows
        writer = asyncio.create_task(self._write_frames())
        try:
            await self.publish(start)
            log.info("%s: x-start sent", self.label)
            await self._read_client()
        except BrokerUnavailableError as error:
            log.warning("%s: %s", self.label, error)
            self.session.fail("broker", str(error))
            # Let the writer send the error frame before the socket closes.
            await asyncio.wait([writer], timeout=STOP_TIMEOUT)
        finally:
            if not writer.done():
                writer.cancel()
            (outcome,) = await asyncio.gather(writer, return_exceptions=True)
            if isinstance(outcome, Exception):
                log.info("%s: could not send to the WebSocket client: %s", self.label, outcome)
            await self._stop_router_side()
            await self.socket.close()
            log.info("%s: closed", self.label)

    async def _stop_router_side(self):
        if self.session.ended_by_router:
            return
        self.session.end(by_router=False)
        try:
            await self.publish({"type": "x-stop"})
        except BrokerUnavailableError as error:
            log.warning("%s: could not send x-stop: %s", self.label, error)

    async def _read_client(self):
        async for message in self.socket:
            if self.session.state == ENDED:
                break
            if message.type == WSMsgType.BINARY:
                await self._send_input(message.data)
            elif message.type == WSMsgType.TEXT:
                await self._handle_control(message.data)
            elif message.type == WSMsgType.ERROR:
                log.warning("%s: WebSocket error: %s", self.label, self.socket.exception())
                break

    async def _send_input(self, data):
        for offset in range(0, len(data), INPUT_CHUNK):
            chunk = data[offset:offset + INPUT_CHUNK]
            await self.publish({"type": "x-data",
                                "data": base64.b64encode(chunk).decode("ascii")})

    async def _handle_control(self, text):
        try:
            control = json.loads(text)
        except ValueError:
            control = None
        problem = _resize_problem(control)
        if problem is not None:
            log.info("%s: invalid control frame: %s", self.label, problem)
            await self.socket.send_json({"type": "error", "sessionId": self.session.session_id,
                                         "code": "invalid_request", "error": problem})
            return
        await self.publish({"type": "x-resize", "cols": control["cols"],
                            "rows": control["rows"]})

    async def _write_frames(self):
        """Send session frames to the client until the close frame, enforcing the start timeout."""
        timeout = self.service.settings.terminal_start_timeout
        while True:
            try:
                if self.session.state == STARTING:
                    frame = await asyncio.wait_for(self.session.next_frame(), timeout)
                else:
                    frame = await self.session.next_frame()
            except asyncio.TimeoutError:
                log.warning("%s: the router did not start the terminal within %g s",
                            self.label, timeout)
                self.session.fail("timeout", "router %s did not start the terminal within %g s"
                                  % (self.session.router_id, timeout))
                continue

            if frame.kind == "close":
                await self.socket.close()
                return
            if frame.kind == "bytes":
                await self.socket.send_bytes(frame.payload)
            else:
                await self.socket.send_json(frame.payload)
                if frame.payload.get("type") == "error":
                    log.info("%s: error %s: %s", self.label, frame.payload.get("code"),
                             frame.payload.get("error"))


def _resize_problem(control):
    """Return why a client control frame is invalid, or None for a valid resize."""
    if not isinstance(control, dict) or control.get("type") != "resize":
        return ('text frames must be JSON {"type": "resize", "cols": N, "rows": N}; '
                "send terminal input as binary frames")
    for key in ("cols", "rows"):
        value = control.get(key)
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 1 <= value <= MAX_TERMINAL_SIZE:
            return "%s must be an integer from 1 to %d, got %s" % (
                key, MAX_TERMINAL_SIZE, json.dumps(value))
    return None
