"""HTTP requests and responses as a deployment sees them, and how they travel.

The gateway turns each HTTP request into plain data (the body in base64) that travels
as the JSON argument of a task; the replica rebuilds a :class:`Request` from it and
calls ``__call__(request)``. What ``__call__`` returns is sent back as JSON; ``bytes``
are sent as they are, and a :class:`Response` sets the status and headers too.

Example::

    import taskserve
    from taskserve.http import Request, Response

    @taskserve.deployment(route_prefix="/double")
    class Double:
        def __call__(self, request: Request):
            return {"result": 2 * request.json()["x"]}

    # curl -d '{"x": 21}' http://127.0.0.1:8000/double      -> {"result":42}

    @taskserve.deployment
    def teapot(request: Request):
        return Response("short and stout", status=418, headers={"x-kind": "teapot"})

    >>> request = Request.from_payload(encode_request("POST", "/double", "x=1&x=2", [("Content-Type", "application/json")], b'{"x": 21}'))
    >>> request.method, request.path, request.query_params, request.headers["content-type"], request.json()
    ('POST', '/double', {'x': '1'}, 'application/json', {'x': 21})
    >>> decode_response(encode_response({"result": 42}))
    (200, [('content-type', 'application/json')], b'{"result":42}')
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterable, Mapping, Optional, Union
from urllib.parse import parse_qsl

# The task method a replica serves an HTTP request with: ``__call__(Request)``.
HTTP_METHOD = "__http__"

JSON_TYPE = "application/json"
BYTES_TYPE = "application/octet-stream"
TEXT_TYPE = "text/plain; charset=utf-8"

# Headers the gateway computes itself; a Response cannot set them.
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


class Headers(dict):
    """Request headers: names are lowercase and looked up case-insensitively.

    A header sent several times has its values joined with ``", "``.

    >>> headers = Headers([("Accept", "a"), ("accept", "b")])
    >>> headers["ACCEPT"], headers.get("X-Missing"), "Accept" in headers
    ('a, b', None, True)
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        for name, value in pairs:
            key = name.lower()
            dict.__setitem__(self, key, f"{self[key]}, {value}" if key in self else value)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)


class Request:
    """One HTTP request, as ``__call__(request)`` receives it.

    ``path`` is the full path (route prefix included), ``query_params`` maps each
    name to its first value, ``headers`` is case-insensitive and ``body`` is bytes.
    """

    def __init__(self, method: str, path: str, query_string: str = "",
                 headers: Union[Headers, Iterable[tuple[str, str]]] = (), body: bytes = b"") -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.query_params: dict[str, str] = {}
        for name, value in parse_qsl(query_string, keep_blank_values=True):
            self.query_params.setdefault(name, value)
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.body = body

    def json(self) -> Any:
        """The body parsed as JSON; ``ValueError`` if it is not JSON."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8", errors="replace")

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "Request":
        """Rebuild the request the gateway sent (see :func:`encode_request`)."""
        return cls(payload["method"], payload["path"], payload.get("query_string", ""),
                   [(name, value) for name, value in payload.get("headers", [])],
                   base64.b64decode(payload.get("body", "")))

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON data; what a deployment that returns the request sends back."""
        return {"method": self.method, "path": self.path, "query_params": self.query_params,
                "headers": dict(self.headers), "body": self.text}

    def __repr__(self) -> str:
        query = f"?{self.query_string}" if self.query_string else ""
        return f"<Request {self.method} {self.path}{query} ({len(self.body)} bytes)>"


class Response:
    """A return value that sets the HTTP status and headers as well as the body.

    ``body`` may be bytes (sent as is), a string (sent as UTF-8 text) or any
    JSON value (sent as JSON); ``media_type`` overrides the content type.

    >>> Response({"error": "no such item"}, status=404).status
    404
    """

    def __init__(self, body: Any = b"", status: int = 200, headers: Optional[Mapping[str, str]] = None,
                 media_type: Optional[str] = None) -> None:
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ValueError(f"invalid HTTP status {status!r}: use a whole number from 100 to 599")
        self.body = body
        self.status = status
        self.headers = dict(headers or {})
        self.media_type = media_type

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


def encode_request(method: str, path: str, query_string: str, headers: Iterable[tuple[str, str]],
                   body: bytes) -> dict[str, Any]:
    """The request as the plain data that travels in the task (the body in base64)."""
    return {"method": method, "path": path, "query_string": query_string,
            "headers": [[name, value] for name, value in headers],
            "body": base64.b64encode(body).decode("ascii")}


def encode_response(value: Any) -> dict[str, Any]:
    """What ``__call__`` returned, as plain data the replica sends back.

    Raises ``TypeError`` naming the type when the value cannot be sent as JSON.
    """
    if isinstance(value, Response):
        status, headers, body, media_type = value.status, value.headers, value.body, value.media_type
    else:
        status, headers, body, media_type = 200, {}, value, None
    if isinstance(body, (bytes, bytearray, memoryview)):
        data, default_type = bytes(body), BYTES_TYPE
    elif isinstance(body, str) and isinstance(value, Response):
        data, default_type = body.encode("utf-8"), TEXT_TYPE
    else:
        data, default_type = _json_bytes(body), JSON_TYPE
    pairs = [(str(name).lower(), str(header)) for name, header in headers.items()]
    if not any(name == "content-type" for name, _ in pairs):
        pairs.insert(0, ("content-type", media_type or default_type))
    encoded: dict[str, Any] = {"status": status, "headers": pairs}
    try:
        encoded["text"] = data.decode("utf-8")
    except UnicodeDecodeError:
        encoded["body"] = base64.b64encode(data).decode("ascii")
    return encoded


def decode_response(encoded: Mapping[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    """``(status, headers, body)`` from :func:`encode_response`'s data, for the gateway."""
    if "text" in encoded:
        body = encoded["text"].encode("utf-8")
    else:
        body = base64.b64decode(encoded.get("body", ""))
    headers = [(name, value) for name, value in encoded.get("headers", []) if name not in _HOP_HEADERS]
    return int(encoded.get("status", 200)), headers, body


def response_data(encoded: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`encode_response`'s data as a reader of JSON wants it (a job's result over
    HTTP, ``taskserve job``): the status, the headers (repeated ones joined by ``", "``),
    the content type and the body, with ``body_encoding`` saying how it is given:
    ``"json"`` (the value itself) when the content type is JSON and the body parses,
    else ``"text"`` when it is UTF-8, else ``"base64"``.

    >>> response_data(encode_response({"result": 42}))
    {'status': 200, 'headers': {'content-type': 'application/json'}, 'content_type': 'application/json', 'body': {'result': 42}, 'body_encoding': 'json'}
    >>> data = response_data(encode_response(Response(b"\\xff\\x00", status=201)))
    >>> data["status"], data["body"], data["body_encoding"]
    (201, '/wA=', 'base64')
    """
    status, pairs, body = decode_response(encoded)
    headers: dict[str, str] = {}
    for name, value in pairs:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    content_type = headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    data: dict[str, Any] = {"status": status, "headers": headers, "content_type": content_type}
    if media == JSON_TYPE or media.endswith("+json"):
        try:
            return {**data, "body": json.loads(body), "body_encoding": "json"}
        except ValueError:
            pass
    try:
        return {**data, "body": body.decode("utf-8"), "body_encoding": "text"}
    except UnicodeDecodeError:
        return {**data, "body": base64.b64encode(body).decode("ascii"), "body_encoding": "base64"}


def _json_bytes(value: Any) -> bytes:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"__call__ returned a value of type {type(value).__name__}, which cannot be sent as JSON ({error}); return lists, "
            "dicts, strings, finite numbers, booleans, None or bytes, or a taskserve.http.Response"
        ) from None
    return text.encode("utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, Request):
        return value.to_dict()
    if callable(getattr(value, "tolist", None)):   # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
