"""RPC requests from the API: validation, routing and results.

A request on `rpc/request` is routed to the agent's own methods (path
`spotfi.agent`), to an operator handler, or to `ubus call`. Commands run
through procrun on the loop, so a slow call never blocks the agent. Every
request whose id can be read gets exactly one result, on the request's
response topic when it names one under the router's prefix (the MQTT 5
Response Topic property, else the JSON field `responseTopic`), with the
request's MQTT 5 Correlation Data. docs/protocol.md describes the wire format.
"""

import os
import time

from spotfi_agent import jsoncodec
from spotfi_agent import procrun
from spotfi_agent.compat import DEFAULT_PATH, find_executable
from spotfi_agent.handlers import RESERVED_PATH, HandlerArgumentError, HandlerRegistry
from spotfi_agent.log import get_logger

log = get_logger(__name__)

MAX_PAYLOAD = 64 * 1024
MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 256
OUTPUT_CAP = procrun.DEFAULT_OUTPUT_CAP
# An id is looked for only this far into a payload that cannot be parsed.
ID_SCAN_LIMIT = 1024
LOG_PREFIX_LENGTH = 40

AGENT_METHODS = ("ping", "info", "handlers")

# Exit statuses of the ubus CLI, which exits with the libubus status code
# (enum ubus_msg_status in libubus.h) after printing "Command failed: ...".
UBUS_METHOD_NOT_FOUND = 3
UBUS_NOT_FOUND = 4
UBUS_TIMEOUT = 7


class RequestError(Exception):
    """Raised when a request is invalid. `code` is the protocol's error code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class RpcRequest:
    """A validated request.

    `reply_properties` are the MQTT properties of its result: None, or
    {"correlation_data": bytes} when the request carried Correlation Data.
    """

    def __init__(self, request_id, path, method, args, timeout, reply_topic,
                 reply_properties=None):
        self.id = request_id
        self.path = path
        self.method = method
        self.args = args
        self.timeout = timeout
        self.reply_topic = reply_topic
        self.reply_properties = reply_properties


class _Call:
    """A request whose command is running."""

    def __init__(self, request, label, is_ubus, timeout):
        self.request = request
        self.label = label
        self.is_ubus = is_ubus
        self.timeout = timeout
        self.command = None


class RpcDispatcher:
    """Dispatcher of the RPC requests of one router.

    `context` supplies loop, router_id, topics, settings (rpc_timeout,
    rpc_max_concurrent, handlers_dir, ubus), path(), publish() and
    agent_info(). The README describes the settings. Operator handlers are
    loaded once, here, and reload_handlers() reads them again.
    """

    def __init__(self, context):
        self.context = context
        self.settings = context.settings
        self.topics = context.topics
        self.router_id = context.router_id
        self.handlers = HandlerRegistry(context.path(self.settings.handlers_dir))
        self.handlers.load()
        self._calls = []
        self._closed = False
        self._ubus_missing_logged = False

    @property
    def running_count(self):
        """The number of commands running now."""
        return len(self._calls)

    def reload_handlers(self):
        return self.handlers.reload()

    def list_handlers(self):
        """Return the operator handlers as the `spotfi.agent handlers` method lists them."""
        return self.handlers.describe(self.settings.rpc_timeout)

    def close(self):
        """Kill the running commands without sending their results."""
        self._closed = True
        for call in self._calls:
            call.command.kill()
        self._calls = []

    def handle(self, payload, properties=None):
        """Validate and route one `rpc/request` message (bytes or str).

        `properties` are the message's MQTT 5 properties as the MQTT client
        passes them: the keys "response_topic" and "correlation_data", each
        optional. Every request whose id can be read gets exactly one result.
        """
        response_topic = None
        reply_properties = None
        if properties:
            response_topic = properties.get("response_topic")
            correlation_data = properties.get("correlation_data")
            if correlation_data is not None:
                reply_properties = {"correlation_data": correlation_data}
        try:
            self._handle(payload, response_topic, reply_properties)
        except Exception:
            # A bug here must not take down the agent's only connection.
            log.exception("router %s: rpc request failed inside the agent", self.router_id)

    # Parsing and validation.

    def _handle(self, payload, response_topic, reply_properties):
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if len(payload) > MAX_PAYLOAD:
            self._reject(payload, "payload is %d bytes, over the limit of %d bytes"
                         % (len(payload), MAX_PAYLOAD), response_topic, reply_properties)
            return
        try:
            message = jsoncodec.loads(payload.decode("utf-8"))
        except (UnicodeError, ValueError) as error:
            self._reject(payload, "payload is not valid JSON: %s" % error, response_topic,
                         reply_properties)
            return
        if not isinstance(message, dict):
            self._drop(payload, "payload is a JSON %s, not an object" % _type_name(message))
            return
        if "id" not in message:
            self._drop(payload, "the request has no id")
            return
        request_id = message["id"]
        problem = _check_id(request_id)
        if problem is not None:
            self._drop(payload, problem)
            return

        reply_topic = self._choose_reply_topic(request_id, response_topic,
                                               message.get("responseTopic"))
        try:
            request = _parse_request(message, request_id, reply_topic)
        except RequestError as error:
            log.warning("router %s: rpc %s: invalid request: %s",
                        self.router_id, request_id, error.message)
            self._send_error(request_id, reply_topic, error.code, error.message,
                             properties=reply_properties)
            return
        request.reply_properties = reply_properties
        self._dispatch(request)

    def _choose_reply_topic(self, request_id, property_topic, field_topic):
        """Return the topic of a result: the MQTT 5 Response Topic, else the field.

        Either is used only when it lies under the router's prefix, and a
        rejected Response Topic falls back to `rpc/response`, not to the field.

        NOTE: over MQTT 3.1.1 (option mqtt_version '3.1.1', or a broker that
        rejected version 5) messages carry no properties, so only the JSON
        field can redirect a result, and results carry no Correlation Data.
        """
        if property_topic is not None:
            topic = property_topic
            source = "MQTT 5 Response Topic"
        elif field_topic is not None:
            topic = field_topic
            source = "responseTopic"
        else:
            return self.topics.rpc_response
        if self.topics.is_own(topic):
            return topic
        log.warning("router %s: rpc %s: %s %s is not a topic under %s; replying on %s",
                    self.router_id, request_id, source, _short_repr(topic),
                    self.topics.prefix, self.topics.rpc_response)
        return self.topics.rpc_response

    def _reject(self, payload, reason, response_topic, reply_properties):
        """Reply to an unparsable payload when its id can still be read.

        Only the MQTT 5 Response Topic can redirect this result, because the
        JSON field cannot be read.
        """
        request_id = peek_id(payload)
        if request_id is None:
            self._drop(payload, reason)
            return
        log.warning("router %s: rpc %s: invalid request: %s", self.router_id, request_id, reason)
        topic = self._choose_reply_topic(request_id, response_topic, None)
        self._send_error(request_id, topic, "invalid_request", reason,
                         properties=reply_properties)

    def _drop(self, payload, reason):
        log.warning("router %s: rpc request dropped without a result because its id cannot be"
                    " read: %s; payload starts with %r",
                    self.router_id, reason, bytes(payload[:LOG_PREFIX_LENGTH]))

    # Routing.

    def _dispatch(self, request):
        if request.path == RESERVED_PATH:
            self._call_agent(request)
            return
        handler = self.handlers.find(request.path, request.method)
        if handler is not None:
            self._call_handler(request, handler)
            return
        self._call_ubus(request)

    def _call_agent(self, request):
        method = request.method
        if method == "ping":
            result = {"pong": True, "time": int(time.time())}
        elif method == "info":
            try:
                result = self.context.agent_info()
            except Exception as error:
                log.exception("router %s: rpc %s: agent info failed", self.router_id, request.id)
                self._reply_error(request, "failed",
                                  "agent info failed: %s" % error)
                return
        elif method == "handlers":
            result = self.list_handlers()
        else:
            self._reply_error(request, "not_found",
                              "%s has no method '%s'; available methods: %s"
                              % (RESERVED_PATH, method, ", ".join(AGENT_METHODS)))
            return
        self._reply_success(request, result)

    def _call_handler(self, request, handler):
        try:
            argv = handler.build_argv(request.args)
        except HandlerArgumentError as error:
            log.warning("router %s: rpc %s: %s", self.router_id, request.id, error)
            self._reply_error(request, "invalid_request", str(error))
            return
        timeout = handler.timeout if handler.timeout is not None else self.settings.rpc_timeout
        if request.timeout is not None:
            timeout = min(timeout, request.timeout)
        label = "handler %s (%s)" % (handler.label, argv[0])
        self._run(_Call(request, label, False, timeout), argv)

    def _call_ubus(self, request):
        timeout = self.settings.rpc_timeout
        if request.timeout is not None:
            timeout = min(timeout, request.timeout)
        label = "ubus call %s %s" % (request.path, request.method)
        ubus = find_executable(self.settings.ubus)
        if ubus is None:
            self._send_ubus_missing(request, self._ubus_missing_message())
            return
        self._ubus_missing_logged = False
        argv = ubus_argv(ubus, request.path, request.method, request.args, timeout)
        self._run(_Call(request, label, True, timeout), argv)

    def _ubus_missing_message(self):
        command = self.settings.ubus
        if "/" in command:
            where = "%s does not exist or is not executable" % command
        else:
            where = "'%s' is in none of PATH=%s" % (command, os.getenv("PATH") or DEFAULT_PATH)
        return ("ubus not found on PATH: %s; install OpenWrt's ubus or set option ubus"
                " to its full path" % where)

    def _send_ubus_missing(self, request, message):
        # Logged at ERROR once until ubus is found again, because every RPC
        # would otherwise repeat the same line.
        if not self._ubus_missing_logged:
            log.error("router %s: rpc %s: %s", self.router_id, request.id, message)
            self._ubus_missing_logged = True
        self._reply_error(request, "ubus_missing", message)

    # Running commands.

    def _run(self, call, argv):
        request = call.request
        limit = self.settings.rpc_max_concurrent
        if len(self._calls) >= limit:
            message = ("%d calls are already running, the limit set by option rpc_max_concurrent;"
                       " retry when one has finished" % limit)
            log.warning("router %s: rpc %s: %s rejected: %s",
                        self.router_id, request.id, call.label, message)
            self._reply_error(request, "busy", message)
            return
        log.debug("router %s: rpc %s: running %s with a %s s timeout",
                  self.router_id, request.id, call.label, call.timeout)
        try:
            call.command = procrun.run(self.context.loop, argv, call.timeout,
                                       lambda result: self._on_finished(call, result),
                                       output_cap=OUTPUT_CAP)
        except (ValueError, TypeError) as error:
            # subprocess raises these for an argument it cannot pass to exec,
            # e.g. a string that does not encode to bytes.
            message = "%s could not start: %s" % (call.label, error)
            log.warning("router %s: rpc %s: %s", self.router_id, request.id, message)
            self._reply_error(request, "failed", message)
            return
        self._calls.append(call)

    def _on_finished(self, call, result):
        if call in self._calls:
            self._calls.remove(call)
        if self._closed:
            return
        request = call.request
        stderr = _decode(result.stderr).strip()
        if result.timed_out:
            self._reply_error(request, "timeout",
                              "%s timed out after %s s and was killed" % (call.label, call.timeout),
                              stderr, result.truncated)
            return
        if result.status is None:
            if call.is_ubus and result.not_found:
                # ubus was found when the call started but is gone now.
                self._send_ubus_missing(request, "ubus not found: %s; install OpenWrt's ubus or"
                                        " set option ubus to its full path" % result.error)
                return
            self._reply_error(request, "failed",
                              "%s could not start: %s" % (call.label, result.error),
                              stderr, result.truncated)
            return
        if result.status != 0:
            code, message = _describe_failure(call, result.status)
            self._reply_error(request, code, message, stderr,
                              result.truncated)
            return
        self._reply_success(request, _parse_output(result.stdout),
                            result.truncated)

    # Results.

    def _reply_success(self, request, result, truncated=False):
        self._send_success(request.id, request.reply_topic, result, truncated,
                           request.reply_properties)

    def _reply_error(self, request, code, message, stderr="", truncated=False):
        self._send_error(request.id, request.reply_topic, code, message, stderr, truncated,
                         request.reply_properties)

    def _send_success(self, request_id, topic, result, truncated=False, properties=None):
        response = {"type": "rpc-result", "id": request_id, "status": "success", "result": result}
        if truncated:
            response["truncated"] = True
        log.debug("router %s: rpc %s: success", self.router_id, request_id)
        self._publish(request_id, topic, response, properties)

    def _send_error(self, request_id, topic, code, message, stderr="", truncated=False,
                    properties=None):
        response = {"type": "rpc-result", "id": request_id, "status": "error", "result": None,
                    "error": message, "stderr": stderr, "code": code}
        if truncated:
            response["truncated"] = True
        if code in ("not_found", "failed", "timeout"):
            log.info("router %s: rpc %s: %s: %s", self.router_id, request_id, code, message)
        self._publish(request_id, topic, response, properties)

    def _publish(self, request_id, topic, response, properties):
        if not self.context.publish(topic, jsoncodec.dumps(response), 1, False, properties):
            log.warning("router %s: rpc %s: the result could not be queued for %s and is lost",
                        self.router_id, request_id, topic)


def _parse_request(message, request_id, reply_topic):
    """Return the RpcRequest of a decoded message whose id is valid, or raise RequestError."""
    if "type" in message and message["type"] != "rpc":
        raise RequestError("invalid_request", "field 'type' must be \"rpc\" when present, got %s"
                           % _short_repr(message["type"]))
    path = _check_name(message, "path")
    method = _check_name(message, "method")

    args = message.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise RequestError("invalid_request", "field 'args' must be an object, got %s"
                           % _type_name(args))

    timeout = message.get("timeout")
    # `timeout != timeout` is True only for NaN, which Python's json accepts.
    if timeout is not None and (isinstance(timeout, bool)
                                or not isinstance(timeout, (int, float))
                                or timeout != timeout or timeout <= 0
                                or timeout == float("inf")):
        raise RequestError("invalid_request", "field 'timeout' must be a positive number of"
                           " seconds, got %s" % _short_repr(timeout))
    return RpcRequest(request_id, path, method, args, timeout, reply_topic)


def _check_name(message, key):
    if key not in message:
        raise RequestError("invalid_request", "field '%s' is missing" % key)
    value = message[key]
    if not isinstance(value, str) or not value:
        raise RequestError("invalid_request", "field '%s' must be a non-empty string, got %s"
                           % (key, _short_repr(value)))
    if len(value) > MAX_NAME_LENGTH:
        raise RequestError("invalid_request", "field '%s' is %d characters long, over the limit"
                           " of %d" % (key, len(value), MAX_NAME_LENGTH))
    if "\0" in value:
        raise RequestError("invalid_request", "field '%s' contains a NUL character" % key)
    try:
        value.encode("utf-8")
    except UnicodeError:
        # A lone surrogate from a "\ud800" escape cannot become a command argument.
        raise RequestError("invalid_request", "field '%s' is not valid Unicode" % key)
    return value


def _check_id(request_id):
    """Return why `request_id` is not a valid id, or None when it is."""
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        return "id must be a string or an integer, got %s" % _type_name(request_id)
    text = request_id if isinstance(request_id, str) else str(request_id)
    if not text:
        return "id is an empty string"
    if len(text) > MAX_ID_LENGTH:
        return "id is %d characters long, over the limit of %d" % (len(text), MAX_ID_LENGTH)
    return None


def peek_id(payload):
    """Return the id of a payload that cannot be parsed whole, or None.

    Looks for `"id": "..."` (a string without escapes) or `"id": 123` near the
    start of the payload. The id found is used only to address an error result.
    """
    head = bytes(payload[:ID_SCAN_LIMIT])
    if not head.lstrip().startswith(b"{"):
        return None
    # "id" may also occur as a value, as in {"path": "id", "id": 5}: the key
    # is the occurrence followed by a colon.
    start = head.find(b'"id"')
    while start >= 0:
        rest = head[start + 4:].lstrip()
        if rest.startswith(b":"):
            return _read_id_value(rest[1:].lstrip())
        start = head.find(b'"id"', start + 4)
    return None


def _read_id_value(rest):
    if rest.startswith(b'"'):
        end = rest.find(b'"', 1)
        if end < 0 or b"\\" in rest[1:end]:
            return None
        try:
            candidate = rest[1:end].decode("utf-8")
        except UnicodeError:
            return None
    else:
        digits = _leading_integer(rest)
        if digits is None:
            return None
        candidate = int(digits)
    if _check_id(candidate) is not None:
        return None
    return candidate


def _leading_integer(data):
    end = 1 if data.startswith(b"-") else 0
    # Indexing bytes gives an int on CPython and MicroPython; 48..57 is "0".."9".
    while end < len(data) and 48 <= data[end] <= 57:
        end += 1
    digits = data[:end]
    if digits in (b"", b"-"):
        return None
    # A number such as 1.5 or 1e3 is not an integer id.
    if end < len(data) and data[end:end + 1] in (b".", b"e", b"E"):
        return None
    return digits.decode("ascii")


def ubus_argv(ubus, path, method, args, timeout):
    """Return the argument vector of `ubus call` with ubus's own timeout set.

    ubus takes whole seconds, and 0 would mean no limit. The seconds are
    rounded up, so the agent's own kill timer (the exact timeout) normally
    fires first.
    """
    seconds = int(timeout)
    if seconds < timeout:
        seconds += 1
    return [ubus, "-t", str(max(1, seconds)), "call", path, method, jsoncodec.dumps(args)]


def _describe_failure(call, status):
    if status < 0:
        return "failed", "%s was killed by signal %d" % (call.label, -status)
    message = "%s failed with exit status %d" % (call.label, status)
    if call.is_ubus:
        if status in (UBUS_NOT_FOUND, UBUS_METHOD_NOT_FOUND):
            return "not_found", message
        if status == UBUS_TIMEOUT:
            return "timeout", message
    return "failed", message


def _parse_output(data):
    """Return stdout as JSON, or as text when it is not JSON, or None when empty."""
    text = _decode(data)
    if not text.strip():
        return None
    try:
        return jsoncodec.loads(text)
    except ValueError:
        return text


def _decode(data):
    try:
        return data.decode("utf-8", "replace")
    except UnicodeError:
        # A runtime without errors="replace" raises instead: keep the ASCII bytes.
        return bytes([byte if byte < 128 else 63 for byte in data]).decode("ascii")


def _type_name(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short_repr(value):
    text = jsoncodec.dumps(value) if not isinstance(value, (dict, list)) else _type_name(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text
