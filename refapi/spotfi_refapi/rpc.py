"""RPC calls to routers: request validation, publishing, and matching results by id."""

import asyncio
import dataclasses
import json
import logging
import uuid

from . import topics
from .errors import RefapiError
from .repeats import RepeatLimiter, repeat_suffix

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 120.0
REQUEST_QOS = 1


class RequestBodyError(RefapiError):
    """Raised when an RPC request body is invalid. `field` names the invalid key."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


class RpcTimeoutError(RefapiError):
    """Raised when no result for an RPC arrives before its deadline."""


@dataclasses.dataclass(frozen=True)
class RpcRequest:
    """A validated RPC request body."""

    path: str
    method: str
    args: dict
    timeout: float


def parse_request_body(body):
    """Validate the decoded JSON body of POST /routers/{id}/rpc into an RpcRequest."""
    if not isinstance(body, dict):
        raise RequestBodyError(None, "the request body must be a JSON object with the keys "
                               "path, method, args (optional) and timeout (optional)")
    for field in ("path", "method"):
        value = body.get(field)
        if not isinstance(value, str) or not value:
            raise RequestBodyError(field, "the field %r must be a non-empty string, got %s"
                                   % (field, json.dumps(value)))

    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestBodyError("args", "the field 'args' must be a JSON object, got %s"
                               % json.dumps(args))

    timeout = body.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise RequestBodyError("timeout", "the field 'timeout' must be a number of seconds "
                               "above 0 and at most %d, got %s"
                               % (MAX_TIMEOUT, json.dumps(timeout)))

    unknown = sorted(set(body) - {"path", "method", "args", "timeout"})
    if unknown:
        raise RequestBodyError(unknown[0], "unknown field %r; the accepted fields are path, "
                               "method, args and timeout" % unknown[0])
    return RpcRequest(path=body["path"], method=body["method"], args=args,
                      timeout=float(timeout))


class RpcCaller:
    """Publishes RPC requests and hands each result to the call waiting for its id."""

    def __init__(self, broker, instance_id, grace):
        self.broker = broker
        self.instance_id = instance_id
        self.grace = grace
        self._pending = {}  # request id -> (router id, future)
        self._repeats = RepeatLimiter()

    @staticmethod
    def new_request_id():
        return str(uuid.uuid4())

    async def call(self, router_id, request_id, request):
        """Send `request` to the router and return its result message (a dict).

        Raise RpcTimeoutError when no result arrives within the request's
        timeout plus the grace period, and BrokerUnavailableError when the
        request cannot be published.
        """
        message = {
            "type": "rpc",
            "id": request_id,
            "path": request.path,
            "method": request.method,
            "args": request.args,
            "timeout": request.timeout,
            "responseTopic": topics.rpc_response(router_id, self.instance_id),
        }
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (router_id, future)
        try:
            await self.broker.publish(topics.rpc_request(router_id), message, REQUEST_QOS)
            wait = request.timeout + self.grace
            try:
                return await asyncio.wait_for(future, wait)
            except asyncio.TimeoutError:
                raise RpcTimeoutError("router %s sent no result for RPC %s (%s %s) within %g s"
                                      % (router_id, request_id, request.path, request.method,
                                         wait)) from None
        finally:
            self._pending.pop(request_id, None)

    def handle_result(self, router_topic, payload):
        """Resolve the waiting call for an `rpc/response` message, if this instance has it."""
        router_id = router_topic.router_id
        own_topic = router_topic.instance_id == self.instance_id
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("id"), (str, int)):
            self._warn(router_id, "an RPC result from router %s is not a JSON object with an "
                       "id: %r", router_id, payload[:80])
            return

        request_id = str(message["id"])
        pending = self._pending.get(request_id)
        if pending is None:
            # Results on the plain topic are often for another instance.
            if own_topic:
                log.info("RPC %s: result from router %s arrived after the call ended",
                         request_id, router_id)
            return
        expected_router, future = pending
        if expected_router != router_id:
            self._warn(router_id, "RPC %s was sent to router %s but router %s answered; "
                       "result ignored", request_id, expected_router, router_id)
            return
        if not future.done():
            future.set_result(message)

    def _warn(self, router_id, message, *args):
        dropped = self._repeats.check((router_id, message))
        if dropped is not None:
            log.warning(message + "%s", *args, repeat_suffix(dropped))
