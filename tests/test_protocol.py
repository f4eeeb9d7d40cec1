"""The wire protocol (eplbctl/protocol.py) and the endpoint defaults (eplbctl/endpoint.py)."""

from __future__ import annotations

import os
import random
import stat

import msgpack
import numpy as np
import pytest
import zmq

from eplbctl import PROTOCOL_VERSION
from eplbctl import endpoint as ep
from eplbctl.protocol import (
    DELIMITER,
    ErrorCode,
    Message,
    ProtocolError,
    RequestError,
    base_name,
    deserialize,
    error_from_reply,
    make_error_reply,
    make_reply,
    make_request,
    new_header,
    pack,
    reply_type,
    serialize,
)
from eplbctl.signing import ReplayCache, sign

pytestmark = pytest.mark.timeout(60)
KEY = b"k" * 32


def _request(content: dict | None = None) -> Message:
    return make_request("status", content or {"layers": [1, 2]}, "session-1")


def _code(frames: list, key: bytes | None = None, cache: ReplayCache | None = None) -> int:
    with pytest.raises(ProtocolError) as info:
        deserialize(frames, key, cache)
    return int(info.value.code)


# -- round trips --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY])
def test_round_trip_preserves_header_parent_content_and_identities(key: bytes | None) -> None:
    msg = _request({"layers": [3, 7], "params": {"a": "b"}, "blob": b"\x00\xff", "x": 1.5, "n": None})
    msg.identities = [b"peer-1"]
    out = deserialize(serialize(msg, key), key)
    assert out == msg
    assert out.msg_type == "status_request"
    assert out.header["version"] == PROTOCOL_VERSION


def test_int_map_keys_and_numpy_values_survive_encoding() -> None:
    # JobReport uses {layer: float}; handlers easily return numpy scalars and arrays.
    msg = _request({"measured_before": {3: 1.25}, "n": np.int64(7), "arr": np.arange(3)})
    out = deserialize(serialize(msg))
    assert out.content == {"measured_before": {3: 1.25}, "n": 7, "arr": [0, 1, 2]}


def test_unencodable_content_raises_type_error_on_serialize() -> None:
    with pytest.raises(TypeError):
        serialize(_request({"x": object()}))


def test_messages_travel_over_inproc_pair_sockets() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://eplb-protocol-test")
        b.connect("inproc://eplb-protocol-test")
        req = _request()
        a.send_multipart(serialize(req, KEY))
        assert b.poll(2000)
        got = deserialize(b.recv_multipart(), KEY, ReplayCache())
        b.send_multipart(serialize(make_reply(got, {"step": 5}, "srv"), KEY))
        assert a.poll(2000)
        reply = deserialize(a.recv_multipart(), KEY)
        assert reply.parent_header["msg_id"] == req.msg_id
        assert reply.msg_type == "status_reply"
        assert reply.content == {"status": "ok", "step": 5}
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


# -- signatures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [2, 3, 4])
def test_tampered_signed_frame_is_rejected_with_401(index: int) -> None:
    frames = serialize(_request(), KEY)
    frames[index] = frames[index][:-1] + bytes([frames[index][-1] ^ 1])
    assert _code(frames, KEY) == ErrorCode.BAD_SIGNATURE


def test_wrong_key_and_missing_signature_are_rejected_with_401() -> None:
    assert _code(serialize(_request(), b"other-key"), KEY) == 401
    assert _code(serialize(_request(), None), KEY) == 401


def test_401_error_keeps_the_header_so_the_reply_can_be_addressed() -> None:
    req = _request()
    with pytest.raises(ProtocolError) as info:
        deserialize(serialize(req, b"other"), KEY)
    assert info.value.header == req.header


def test_signature_input_is_length_framed() -> None:
    # Without length framing, moving a byte from one frame to the next would keep the signature.
    assert sign(KEY, [b"ab", b"c"]) != sign(KEY, [b"a", b"bc"])
    assert sign(None, [b"a"]) == b""


def test_signature_is_not_checked_without_a_key() -> None:
    frames = serialize(_request(), b"whatever")
    assert deserialize(frames, None).msg_type == "status_request"


# -- replays ------------------------------------------------------------------------------------------


def test_replayed_message_is_rejected_with_409() -> None:
    cache = ReplayCache()
    frames = serialize(_request(), KEY)
    deserialize(frames, KEY, cache)
    assert _code(frames, KEY, cache) == ErrorCode.CONFLICT


def test_replay_cache_is_bounded_and_forgets_the_oldest() -> None:
    cache = ReplayCache(size=3)
    all_frames = [serialize(_request(), KEY) for _ in range(4)]
    for frames in all_frames:
        deserialize(frames, KEY, cache)
    assert len(cache) == 3
    deserialize(all_frames[0], KEY, cache)  # evicted, so accepted again
    assert _code(all_frames[3], KEY, cache) == 409


def test_rejected_message_does_not_enter_the_replay_cache() -> None:
    cache = ReplayCache()
    msg = _request()
    msg.header["version"] = PROTOCOL_VERSION + 1
    frames = serialize(msg, KEY)
    assert _code(frames, KEY, cache) == 426
    assert len(cache) == 0


def test_replay_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        ReplayCache(0)


# -- header and version -------------------------------------------------------------------------------


def test_version_mismatch_is_426_with_our_version_in_details() -> None:
    msg = _request()
    msg.header["version"] = 2
    with pytest.raises(ProtocolError) as info:
        deserialize(serialize(msg))
    assert info.value.code == ErrorCode.VERSION_MISMATCH
    assert info.value.details == {"version": PROTOCOL_VERSION}
    assert info.value.header["version"] == 2


def test_version_mismatch_wins_over_other_header_changes() -> None:
    # A future version may change the header layout; the operator must still hear "version".
    frames = [DELIMITER, b"", pack({"version": 9, "id": 1}), pack({}), pack({})]
    assert _code(frames) == 426


@pytest.mark.parametrize(
    "field, value",
    [("msg_id", None), ("msg_id", ""), ("msg_type", 3), ("session", b"s"), ("date", "now"),
     ("date", True), ("version", True), ("version", None)],
)
def test_ill_typed_header_field_is_400(field: str, value: object) -> None:
    msg = _request()
    if value is None:
        del msg.header[field]
    else:
        msg.header[field] = value
    assert _code(serialize(msg)) == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"x"],
        [DELIMITER],
        [DELIMITER, b"", pack({}), pack({})],
        [DELIMITER, b"", pack(new_header("a", "s")), pack({}), pack({}), b"extra"],
        [DELIMITER, b"", pack([1, 2]), pack({}), pack({})],
        [DELIMITER, b"", pack(new_header("a", "s")), pack({}), pack(3)],
        [DELIMITER, b"", pack(new_header("a", "s")), pack({}), pack({}) + b"\x00"],
        [DELIMITER, b"", pack(new_header("a", "s")), msgpack.packb(msgpack.ExtType(5, b"x")), pack({})],
        [DELIMITER, b"", pack(new_header("a", "s")), pack({}), msgpack.packb({"t": msgpack.Timestamp(1)})],
        [DELIMITER, b"", pack(new_header("a", "s")), pack({}), None],
        [DELIMITER, b"", pack(new_header("a", "s")), pack({}), 12],
    ],
)
def test_malformed_frames_are_400(frames: list) -> None:
    assert _code(frames) == ErrorCode.BAD_REQUEST


def test_non_iterable_frames_are_400() -> None:
    assert _code(42) == 400  # type: ignore[arg-type]


def test_random_garbage_frames_are_always_400() -> None:
    rng = random.Random(1234)
    for case in range(400):
        frames = [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(0, 8))]
        if case % 2 and frames:
            frames.insert(rng.randrange(len(frames)), DELIMITER)
        if case % 3 == 0:
            frames = [DELIMITER, b"", *frames[:3]] + [b""] * (3 - len(frames[:3]))
        assert _code(frames) == 400, frames
        assert _code(frames, KEY, ReplayCache()) in (400, 401)


def test_mutated_valid_messages_never_raise_anything_but_protocol_errors() -> None:
    rng = random.Random(99)
    base = serialize(_request({"layers": [1, 2, 3], "policy": "default", "x": {"y": [1.5, None]}}))
    for _ in range(400):
        frames = list(base)
        i = rng.randrange(len(frames))
        data = bytearray(frames[i] or b"\x00")
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        frames[i] = bytes(data)
        try:
            deserialize(frames)
        except ProtocolError as exc:
            assert exc.code in (400, 426)  # a flipped version byte is a version mismatch


# -- replies ------------------------------------------------------------------------------------------


def test_reply_type_and_base_name() -> None:
    assert reply_type("status_request") == "status_reply"
    assert reply_type("odd") == "odd_reply"
    assert base_name("rebalance_request") == "rebalance"
    assert base_name("status_reply") is None
    assert base_name("_request") is None


def test_ok_reply_is_addressed_to_the_request_and_status_cannot_be_overridden() -> None:
    req = _request()
    req.identities = [b"id"]
    reply = make_reply(req, {"status": "error", "step": 1}, "srv")
    assert reply.parent_header == req.header
    assert reply.identities == [b"id"]
    assert reply.content == {"status": "ok", "step": 1}


def test_error_reply_without_a_decodable_request_is_error_reply() -> None:
    reply = make_error_reply(None, ErrorCode.BAD_REQUEST, "bad", "srv", [b"id"], {"code": 1, "hint": "h"})
    assert reply.msg_type == "error_reply"
    assert reply.parent_header == {}
    assert reply.content == {"status": "error", "code": 400, "message": "bad", "hint": "h"}


def test_version_error_reply_carries_the_daemon_version() -> None:
    reply = make_error_reply(_request().header, 426, "old", "srv")
    assert reply.msg_type == "status_reply"
    assert reply.content["version"] == PROTOCOL_VERSION


def test_error_from_reply_reads_code_and_message() -> None:
    assert error_from_reply({"status": "ok"}) is None
    error = error_from_reply({"status": "error", "code": 422, "message": "m"})
    assert error == (ErrorCode.INVALID_VALUE, "m")
    code, message = error_from_reply({"status": "weird"})
    assert code == 500 and "without a message" in message
    assert error_from_reply({"status": "error", "code": 599, "message": "x"}) == (599, "x")


def test_request_error_carries_code_message_and_details() -> None:
    exc = RequestError(422, "bad layer 99", {"max": 57})
    assert exc.code is ErrorCode.INVALID_VALUE and str(exc) == "bad layer 99" and exc.details == {"max": 57}


def test_error_codes_have_names() -> None:
    assert {c.value for c in ErrorCode} == {400, 401, 404, 409, 422, 426, 500, 503}
    assert ErrorCode(503).name == "UNAVAILABLE"


# -- endpoints ----------------------------------------------------------------------------------------


def test_default_endpoint_uses_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert ep.default_endpoint() == f"ipc://{tmp_path}/eplbctl/control.sock"


def test_default_endpoint_without_xdg_is_per_user_in_tempdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    import tempfile

    assert ep.default_endpoint() == f"ipc://{tempfile.gettempdir()}/eplbctl-{os.getuid()}/control.sock"


def test_resolve_endpoint_order_and_forms(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(ep.ENV_VAR, raising=False)
    assert ep.resolve_endpoint(None) == ep.default_endpoint()
    monkeypatch.setenv(ep.ENV_VAR, "tcp://127.0.0.1:5555")
    assert ep.resolve_endpoint(None) == "tcp://127.0.0.1:5555"
    assert ep.resolve_endpoint(str(tmp_path / "s.sock")) == f"ipc://{tmp_path}/s.sock"
    monkeypatch.chdir(tmp_path)
    assert ep.resolve_endpoint("rel.sock") == f"ipc://{tmp_path}/rel.sock"
    assert ep.ipc_path("ipc:///a/b") == "/a/b" and ep.ipc_path("tcp://h:1") is None


@pytest.mark.parametrize("bad", ["http://x", "ipc://", "ipc:///" + "x" * 200])
def test_resolve_endpoint_rejects_unusable_endpoints(bad: str) -> None:
    with pytest.raises(ValueError):
        ep.resolve_endpoint(bad)


def test_ensure_endpoint_dir_creates_private_directory(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = ep.ensure_endpoint_dir(f"ipc://{tmp_path}/d/c.sock")
    finally:
        os.umask(old)
    assert path == f"{tmp_path}/d/c.sock"
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700
    assert ep.ensure_endpoint_dir("tcp://127.0.0.1:1") is None


def test_default_directory_with_loose_mode_is_tightened(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "eplbctl").mkdir(mode=0o755)
    os.chmod(tmp_path / "eplbctl", 0o755)
    ep.ensure_endpoint_dir(ep.default_endpoint())
    assert stat.S_IMODE(os.stat(tmp_path / "eplbctl").st_mode) == 0o700
