"""The eplb control wire protocol (docs/protocol.md): framing, parsing, replies; HMAC in `signing.py`.

The envelope follows jupyter's message spec (routing identities, delimiter, HMAC, header,
parent_header, content) with msgpack instead of JSON, a length-framed signature input and a bounded
replay cache. This module is transport-free: it turns `Message` objects into lists of frames and back,
so the client, the server and the tests share one implementation. It never imports zmq or torch.

Parsing is the security boundary: `deserialize` must turn *any* input into either a `Message` or a
`ProtocolError` with a protocol error code, never another exception.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from eplbctl import PROTOCOL_VERSION
from eplbctl.signing import ReplayCache, sign, signed_by

DELIMITER = b"<EPLB|MSG>"
_N_SIGNED = 3  # header, parent_header, content
_HEADER_FIELDS: dict[str, tuple[type, ...]] = {
    "msg_id": (str,),
    "msg_type": (str,),
    "session": (str,),
    "date": (float, int),
    "version": (int,),
}
_ALLOWED_TYPES = (dict, list, str, int, float, bool, bytes, type(None))


class ErrorCode(IntEnum):
    """Numeric error codes carried in error replies (HTTP-like, so that they read at a glance)."""

    BAD_REQUEST = 400
    BAD_SIGNATURE = 401
    UNKNOWN_TYPE = 404
    CONFLICT = 409
    INVALID_VALUE = 422
    VERSION_MISMATCH = 426
    INTERNAL = 500
    UNAVAILABLE = 503


def _as_code(code: int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code  # a newer peer may send codes we do not know; keep the number


class RequestError(Exception):
    """Raised by a request handler to answer with an error reply of this code.

    Shared by the daemon's handlers and the CLI, so that one validation function can serve both.
    `details` is merged into the error reply's content (for example the allowed values).
    """

    def __init__(self, code: int, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = _as_code(code)
        self.message = message
        self.details = dict(details or {})

    def __str__(self) -> str:
        return self.message


class ProtocolError(Exception):
    """A message that cannot be accepted: bad frames (400), bad signature (401), replay (409),
    other protocol version (426).

    `header` is the offending message's header when it could be decoded (so that the error reply can
    be addressed to the request), `identities` the routing frames found before the delimiter.
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        header: dict[str, Any] | None = None,
        identities: list[bytes] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = _as_code(code)
        self.message = message
        self.header = header
        self.identities = identities or []
        self.details = dict(details or {})

    def __str__(self) -> str:
        return f"{int(self.code)} {self.message}"


@dataclass
class Message:
    """One protocol message. `identities` are the ROUTER routing frames (empty on the client side)."""

    header: dict[str, Any]
    parent_header: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] = field(default_factory=dict)
    identities: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return self.header["msg_type"]

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]


# -- building ---------------------------------------------------------------------------------------


def new_session() -> str:
    return uuid.uuid4().hex


def new_header(msg_type: str, session: str) -> dict[str, Any]:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": session,
        "date": time.time(),
        "version": PROTOCOL_VERSION,
    }


def request_type(name: str) -> str:
    """`status` -> `status_request`."""
    return f"{name}_request"


def reply_type(msg_type: str) -> str:
    """`status_request` -> `status_reply`; anything else gets `_reply` appended."""
    base = msg_type[: -len("_request")] if msg_type.endswith("_request") else msg_type
    return f"{base}_reply"


def base_name(msg_type: str) -> str | None:
    """`status_request` -> `status`; None when the type is not a request."""
    if msg_type.endswith("_request") and len(msg_type) > len("_request"):
        return msg_type[: -len("_request")]
    return None


def make_request(name: str, content: Mapping[str, Any] | None, session: str) -> Message:
    return Message(header=new_header(request_type(name), session), content=dict(content or {}))


def make_reply(request: Message, content: Mapping[str, Any] | None, session: str) -> Message:
    """An ok reply to `request`, addressed to the same peer."""
    body = {"status": "ok", **(content or {})}
    body["status"] = "ok"  # a handler cannot turn an answer into an error by accident
    return Message(
        header=new_header(reply_type(request.msg_type), session),
        parent_header=dict(request.header),
        content=body,
        identities=list(request.identities),
    )


def make_error_reply(
    request_header: Mapping[str, Any] | None,
    code: int,
    message: str,
    session: str,
    identities: list[bytes] | None = None,
    details: Mapping[str, Any] | None = None,
) -> Message:
    """An error reply; `request_header` may be None (undecodable request): then `error_reply`, no parent."""
    parent = dict(request_header) if isinstance(request_header, Mapping) else {}
    req_type = parent.get("msg_type")
    msg_type = reply_type(req_type) if isinstance(req_type, str) and req_type else "error_reply"
    content: dict[str, Any] = dict(details or {})
    content.update({"status": "error", "code": int(code), "message": message})
    if int(code) == ErrorCode.VERSION_MISMATCH:
        content.setdefault("version", PROTOCOL_VERSION)
    return Message(
        header=new_header(msg_type, session),
        parent_header=parent,
        content=content,
        identities=list(identities or []),
    )


# -- encoding ---------------------------------------------------------------------------------------


def _pack_default(obj: Any) -> Any:
    # numpy scalars and arrays leak into handler results easily; `.tolist()` turns them into plain
    # Python values without importing numpy here. Anything else is a programming error.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    msg = f"cannot encode {type(obj).__name__} in a protocol message"
    raise TypeError(msg)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_pack_default)


def _check_types(obj: Any) -> None:
    # Iterative so that a deep (but msgpack-legal) structure cannot hit the recursion limit.
    stack = [obj]
    while stack:
        item = stack.pop()
        if not isinstance(item, _ALLOWED_TYPES):
            msg = f"type {type(item).__name__} is not allowed"
            raise ValueError(msg)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _ext_hook(code: int, data: bytes) -> Any:
    msg = f"msgpack extension type {code} is not allowed"
    raise ValueError(msg)


def unpack_map(data: bytes, what: str) -> dict[str, Any]:
    """Decode one frame that must hold exactly one msgpack map of plain types; ProtocolError(400) else."""
    try:
        # strict_map_key=False: reports use int keys ({layer: float}); timestamp=0 and ext_hook reject
        # msgpack extension types, which the protocol does not use.
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook, timestamp=0)
        _check_types(obj)
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, TypeError, ...)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} must be a msgpack map, got {type(obj).__name__}")
    return obj


def serialize(msg: Message, key: bytes | None = None) -> list[bytes]:
    """Frames for `msg`: identities, delimiter, signature, header, parent_header, content.

    Raises TypeError/ValueError when the content holds something msgpack cannot encode.
    """
    signed = [pack(msg.header), pack(msg.parent_header), pack(msg.content)]
    return [*msg.identities, DELIMITER, sign(key, signed), *signed]


def _to_bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, (bytearray, memoryview)):
        return bytes(frame)
    buffer = getattr(frame, "bytes", None)  # zmq.Frame, without importing zmq
    if isinstance(buffer, bytes):
        return buffer
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame of type {type(frame).__name__} is not bytes")


def peek_header(data: bytes) -> dict[str, Any] | None:
    """Best-effort header decode used only to address an error reply; None when it is not a map."""
    try:
        return unpack_map(data, "header")
    except ProtocolError:
        return None


def deserialize(
    frames: Iterable[Any],
    key: bytes | None = None,
    replay_cache: ReplayCache | None = None,
) -> Message:
    """Parse and authenticate one multipart message; raise ProtocolError for anything not acceptable.

    Checks, in order: frame layout (400), signature when `key` is set (401), replay when a key and a
    cache are given (409), header and version (400 / 426), parent_header and content (400).
    The signature is checked before any msgpack is decoded, so unauthenticated peers cannot make the
    daemon parse their payloads. Only accepted messages enter the replay cache.
    """
    try:
        raw = [_to_bytes(f) for f in frames]
    except ProtocolError:
        raise
    except Exception as exc:  # not even iterable
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad frames: {type(exc).__name__}") from None
    try:
        split = raw.index(DELIMITER)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "no message delimiter") from None
    identities = raw[:split]
    body = raw[split + 1:]
    if len(body) != 1 + _N_SIGNED:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"expected {1 + _N_SIGNED} frames after the delimiter, got {len(body)}",
            header=peek_header(body[1]) if len(body) > 1 else None,
            identities=identities,
        )
    signature, h_raw, p_raw, c_raw = body

    def fail(code: int, message: str, header: dict[str, Any] | None = None, **details: Any) -> ProtocolError:
        return ProtocolError(code, message, header=header, identities=identities, details=details)

    if key:
        if not signed_by(key, (h_raw, p_raw, c_raw), signature):
            raise fail(ErrorCode.BAD_SIGNATURE, "bad signature (do eplbd and eplbctl use the same key?)",
                       peek_header(h_raw))
        if replay_cache is not None and signature in replay_cache:
            raise fail(ErrorCode.CONFLICT, "replayed message", peek_header(h_raw))

    header = unpack_map(h_raw, "header")
    # Version first: a newer peer may have changed other header fields, and "wrong version" is the
    # error that tells the operator what to do.
    version = header.get("version")
    if "version" in header and version != PROTOCOL_VERSION:
        raise fail(ErrorCode.VERSION_MISMATCH,
                   f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
                   header, version=PROTOCOL_VERSION)
    for name, types in _HEADER_FIELDS.items():
        value = header.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise fail(ErrorCode.BAD_REQUEST, f"header field {name!r} missing or not {types[0].__name__}",
                       header)
    if not header["msg_id"] or not header["msg_type"]:
        raise fail(ErrorCode.BAD_REQUEST, "empty msg_id or msg_type", header)
    try:
        parent = unpack_map(p_raw, "parent_header")
        content = unpack_map(c_raw, "content")
    except ProtocolError as exc:
        raise fail(exc.code, exc.message, header) from None

    if key and replay_cache is not None:
        replay_cache.add(signature)
    return Message(header=header, parent_header=parent, content=content, identities=identities)


def error_from_reply(content: Mapping[str, Any]) -> tuple[ErrorCode | int, str] | None:
    """(code, message) of an error reply's content, None for an ok reply."""
    if content.get("status") == "ok":
        return None
    code = content.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = ErrorCode.INTERNAL
    message = content.get("message")
    if not isinstance(message, str):
        message = f"error reply without a message: {dict(content)!r}"[:200]
    return _as_code(code), message
