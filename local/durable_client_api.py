"""Loopback HTTP server for the Durable extension's management API, backed by a LocalDurableHost.

It serves the subset that ``azure.durable_functions.DurableOrchestrationClient`` (1.7.0) calls.
The client builds every request from ``rpcBaseUrl`` (``DurableOrchestrationClient.py``,
``RpcManagementOptions.to_url``); ``managementUrls`` (built on ``baseUrl``) only feed
``create_check_status_response``.  Both prefixes are served, so the URLs in a check-status payload
work too:

    POST   {rpc}orchestrators/{name}[/{id}]          start_new   202 + management payload
    GET    {rpc}instances/{id}?showHistory=...         get_status  200 done / 202 running / 404 empty
    GET    {rpc}instances/?runtimeStatus=...           get_status_all / get_status_by  200 + one page of the list
                                                       (``top``, default 100, as the extension pages it; the
                                                       next page's token in x-ms-continuation-token, which the
                                                       SDK ignores: function_app follows it)
    POST   {rpc}instances/{id}/terminate?reason=       terminate   202 / 410 finished / 404
    POST   {rpc}instances/{id}/raiseEvent/{event}      raise_event 202 / 410 finished / 404 / 400
    DELETE {rpc}instances/{id}                         purge       200 {"instancesDeleted": 1} / 404
    DELETE {rpc}instances/?createdTimeFrom=...         purge_by    200 {"instancesDeleted": n} / 404
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from local.durable_state import (
    TERMINAL_STATUSES,
    DurableHostError,
    InstanceAlreadyRunningError,
    UnknownFunctionError,
    parse_time,
)

if TYPE_CHECKING:
    from local.durable_host import LocalDurableHost

RPC_PREFIX = "/durabletask/"
CONTINUATION = "x-ms-continuation-token"
PAGE_SIZE = 100  # the extension's default for an instance query without `top`
WEBHOOK_PREFIX = "/runtime/webhooks/durabletask/"
INSTANCE_PLACEHOLDER = "INSTANCEID"


def _parse_time(value: str | None) -> Any:
    return parse_time(value) if value else None


def _flag(query: dict[str, list[str]], name: str, default: bool) -> bool:
    values = query.get(name)
    return default if not values else values[0].strip().lower() == "true"


def _error_body(message: str, exception_message: str, exception_type: str) -> dict[str, str]:
    # The extension's error shape (HttpRequestMessage.CreateErrorResponse); the client reads
    # ExceptionMessage on 400 and surfaces the whole object otherwise.
    return {"Message": message, "ExceptionMessage": exception_message, "ExceptionType": exception_type}


class DurableHttpApi:
    """The management API on 127.0.0.1 (free port), in a daemon thread."""

    def __init__(self, host: LocalDurableHost) -> None:
        self.host = host
        self.page_size = PAGE_SIZE
        api = self

        class Handler(_Handler):
            owner = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.rpc_base_url = f"{self.origin}{RPC_PREFIX}"
        self.base_url = f"{self.origin}{WEBHOOK_PREFIX.rstrip('/')}"
        # serve_forever checks for shutdown every poll_interval: its default 0.5 s was the last half second
        # of every `stylize run`
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="durable-http-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -------------------------------------------------------------- binding JSON
    def _query_suffix(self) -> str:
        return f"taskHub={quote(self.host.task_hub)}&connection=Storage"

    def management_urls(self, instance_id: str = INSTANCE_PLACEHOLDER) -> dict[str, str]:
        base = f"{self.base_url}/instances/{instance_id}"
        q = self._query_suffix()
        return {
            "id": instance_id,
            "statusQueryGetUri": f"{base}?{q}",
            "sendEventPostUri": f"{base}/raiseEvent/{{eventName}}?{q}",
            "terminatePostUri": f"{base}/terminate?reason={{text}}&{q}",
            "rewindPostUri": f"{base}/rewind?reason={{text}}&{q}",
            "purgeHistoryDeleteUri": f"{base}?{q}",
            "restartPostUri": f"{base}/restart?{q}",
            "suspendPostUri": f"{base}/suspend?reason={{text}}&{q}",
            "resumePostUri": f"{base}/resume?reason={{text}}&{q}",
        }

    def binding_json(self) -> str:
        """What the host passes for a ``durableClient`` binding (DurableOrchestrationBindings)."""
        orchestrators = f"{self.base_url}/orchestrators/{{functionName}}[/{{instanceId}}]"
        return json.dumps({
            "taskHubName": self.host.task_hub,
            "creationUrls": {
                "createNewInstancePostUri": orchestrators,
                "createAndWaitOnNewInstancePostUri":
                    f"{orchestrators}?timeout={{timeoutInSeconds}}&pollingInterval={{intervalInSeconds}}",
            },
            "managementUrls": self.management_urls(),
            "baseUrl": self.base_url,
            "requiredQueryStringParameters": "",
            "rpcBaseUrl": self.rpc_base_url,
            "httpBaseUrl": "",
            "maxGrpcMessageSizeInBytes": 0,
            "grpcHttpClientTimeout": "00:01:40",
        })

    # -------------------------------------------------------------- request handling
    def handle(self, method: str, raw_path: str, body: bytes,
               continuation: str | None = None) -> tuple[int, Any, dict[str, str]]:
        """Route one request; returns (status, JSON payload or None for an empty body, headers)."""
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        path = parts.path
        for prefix in (RPC_PREFIX, WEBHOOK_PREFIX):
            if path.startswith(prefix):
                rest = path[len(prefix):]
                break
        else:
            return 404, None, {}
        segments = [unquote(s) for s in rest.split("/")]
        while len(segments) > 1 and segments[-1] == "":
            segments.pop()
        head = segments[0]
        try:
            if head == "orchestrators" and method == "POST" and 2 <= len(segments) <= 3:
                return self._start(segments[1], segments[2] if len(segments) == 3 else None, body)
            if head == "instances":
                instance_id = segments[1] if len(segments) > 1 else ""
                if len(segments) <= 2:
                    if method == "GET":
                        return self._get(instance_id, query, continuation)
                    if method == "DELETE":
                        return self._purge(instance_id, query)
                elif method == "POST" and segments[2] == "terminate" and len(segments) == 3:
                    return self._terminate(instance_id, query)
                elif method == "POST" and segments[2] == "raiseEvent" and len(segments) == 4:
                    return self._raise_event(instance_id, segments[3], body)
        except DurableHostError as exc:
            return 500, _error_body("Something went wrong while processing your request", str(exc),
                                    "System.InvalidOperationException"), {}
        return 404, None, {}

    def _start(self, name: str, instance_id: str | None, body: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            token = json.loads(body) if body.strip() else None
        except ValueError as exc:
            return 400, _error_body("Invalid JSON content", str(exc), "Newtonsoft.Json.JsonReaderException"), {}
        try:
            inst = self.host._create_instance(name, token, instance_id or None)
        except UnknownFunctionError as exc:
            return 400, _error_body("One or more of the arguments submitted is incorrect", str(exc),
                                    "System.ArgumentException"), {}
        except InstanceAlreadyRunningError as exc:
            return 500, _error_body("Something went wrong while processing your request", str(exc),
                                    "System.InvalidOperationException"), {}
        payload = self.management_urls(inst.instance_id)
        return 202, payload, {"Location": payload["statusQueryGetUri"], "Retry-After": "10"}

    def _get(self, instance_id: str, query: dict[str, list[str]],
             continuation: str | None = None) -> tuple[int, Any, dict[str, str]]:
        show_input = _flag(query, "showInput", True)
        if not instance_id:
            statuses = [s.strip() for v in query.get("runtimeStatus", []) for s in v.split(",") if s.strip()]
            found = self.host.list_instances(
                runtime_status=statuses or None,
                created_from=_parse_time((query.get("createdTimeFrom") or [None])[0]),
                created_to=_parse_time((query.get("createdTimeTo") or [None])[0]),
                instance_id_prefix=(query.get("instanceIdPrefix") or [None])[0],
                show_input=show_input)
            start, size = int(continuation or 0), int((query.get("top") or [self.page_size])[0])
            more = {CONTINUATION: str(start + size)} if start + size < len(found) else {}
            return 200, found[start:start + size], more
        status = self.host.status(instance_id, show_history=_flag(query, "showHistory", False),
                                  show_history_output=_flag(query, "showHistoryOutput", False),
                                  show_input=show_input)
        if status is None:
            return 404, None, {}
        if status["runtimeStatus"] in TERMINAL_STATUSES:
            return 200, status, {}
        location = self.management_urls(instance_id)["statusQueryGetUri"]
        return 202, status, {"Location": location, "Retry-After": "10"}

    def _purge(self, instance_id: str, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        if instance_id:
            deleted = self.host.purge(instance_id)
        else:
            statuses = [s for v in query.get("runtimeStatus", []) for s in v.split(",") if s]
            found = self.host.list_instances(
                runtime_status=statuses or TERMINAL_STATUSES,
                created_from=_parse_time((query.get("createdTimeFrom") or [None])[0]),
                created_to=_parse_time((query.get("createdTimeTo") or [None])[0]))
            deleted = sum(self.host.purge(s["instanceId"]) for s in found)
        if not deleted:
            return 404, None, {}
        return 200, {"instancesDeleted": deleted}, {}

    def _terminate(self, instance_id: str, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        reason = (query.get("reason") or [""])[0]
        if self.host.status(instance_id) is None:
            return 404, None, {}
        return (202 if self.host.terminate(instance_id, reason) else 410), None, {}

    def _raise_event(self, instance_id: str, name: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        status = self.host.status(instance_id)
        if status is None:
            return 404, None, {}
        if status["runtimeStatus"] in TERMINAL_STATUSES:
            return 410, None, {}
        try:
            token = json.loads(body) if body.strip() else None
        except ValueError:
            return 400, None, {}
        # The extension parses the body into one JSON token and stores its serialization as the
        # event's Input.  The Python client posts json=json.dumps(data), so the orchestrator gets the
        # JSON *text* of the data (azure-functions-durable-python#295), exactly as on Azure.
        try:
            self.host._raise_event_json(instance_id, name, json.dumps(token))
        except DurableHostError:
            return 410, None, {}
        return 202, None, {}


class _Handler(BaseHTTPRequestHandler):
    owner: DurableHttpApi
    protocol_version = "HTTP/1.1"

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload, headers = self.owner.handle(self.command, self.path, body,
                                                         self.headers.get(CONTINUATION))
        except Exception as exc:  # never drop the connection: report like the extension would
            status, payload, headers = 500, _error_body("Something went wrong while processing your request",
                                                        str(exc), type(exc).__name__), {}
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass
