"""The wire protocol: envelopes, the SMTP form, SYNC frames and the handshake."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pushsync.errors import UsageError
from pushsync.wire import protocol as p
from pushsync.wire.limits import ENVELOPE_BUDGET, MAX_DATAGRAM, MAX_MESSAGE_TEXT
from tests.support.fuzz import examples

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
NOW = 1_700_000_000.0

MESSAGE = p.Message(
    request_id=uuid.UUID("6f1c2d3e-4b5a-4697-8877-665544332211"),
    device="truck-17",
    subject="sync",
    content="disruption 42 on route A7",
    sender="pushsync",
    priority="high",
    created=NOW,
    expires=NOW + 3600,
)
ACK = p.Ack(request_id=MESSAGE.request_id, device="truck-17", confirmed=NOW + 1.25)
TRICKY = "quote \" ' backslash \\ tab\t crlf\r\n emoji 😀👍🏽 rtl שלום \u2028 cjk 漢字 \U0010fffd"


def sign(body: bytes, secret: bytes = SECRET) -> bytes:
    """``body`` with its MAC, built by hand so tests can make any structure."""
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def raw_message(
    *,
    header: bytes = b"PS\x01M",
    times: tuple[int, int] = (1000, 2000),
    priority: int = 1,
    device: bytes = b"truck-17",
    sender: bytes = b"pushsync",
    subject: bytes = b"sync",
    content: bytes = b"hello",
    tail: bytes = b"",
) -> bytes:
    body = b"".join(
        (
            header,
            bytes(16),
            times[0].to_bytes(8, "big"),
            times[1].to_bytes(8, "big"),
            bytes([priority]),
            bytes([len(device)]) + device,
            bytes([len(sender)]) + sender,
            len(subject).to_bytes(2, "big") + subject,
            len(content).to_bytes(2, "big") + content,
            tail,
        )
    )
    return sign(body)


def decode(data: bytes) -> p.Message:
    return p.decode_message(data, SECRET, NOW)


# --------------------------------------------------------------------------- envelopes


@pytest.mark.parametrize(
    "msg",
    [
        MESSAGE,
        replace(MESSAGE, subject="", content="", sender="", priority="low"),
        replace(MESSAGE, subject=TRICKY, content=TRICKY * 3, priority="normal"),
        replace(MESSAGE, device="A", created=0.0, expires=0.0),
        replace(MESSAGE, device="x" * 64, sender="ü" * 32, created=NOW + 0.001),
    ],
)
def test_message_round_trip(msg: p.Message) -> None:
    data = p.encode_message(msg, SECRET)
    assert p.decode_message(data, SECRET, min(msg.expires, NOW)) == msg
    assert p.peek_device(data) == msg.device
    assert len(data) == p.encoded_size(msg)


def test_ack_round_trip() -> None:
    data = p.encode_ack(ACK, SECRET)
    assert p.decode_ack(data, SECRET) == ACK
    assert p.peek_device(data) == "truck-17"
    assert len(data) == 4 + 16 + 1 + len("truck-17") + 8 + 32


def test_layout_is_the_documented_one() -> None:
    data = p.encode_message(MESSAGE, SECRET)
    assert data[:4] == b"PS\x01M"
    assert data[4:20] == MESSAGE.request_id.bytes
    assert int.from_bytes(data[20:28], "big") == 1_700_000_000_000
    assert int.from_bytes(data[28:36], "big") == 1_700_003_600_000
    assert data[36] == 2
    assert data[37:46] == b"\x08truck-17"
    assert data[-32:] == hmac.new(SECRET, data[:-32], hashlib.sha256).digest()


def test_text_size_is_exactly_predictable() -> None:
    msg = replace(MESSAGE, subject=TRICKY, content=TRICKY + "\U0001f600" * 50)
    texts = (msg.device, msg.sender, msg.subject, msg.content)
    expected = p.MESSAGE_OVERHEAD + sum(len(t.encode()) for t in texts)
    assert len(p.encode_message(msg, SECRET)) == expected == p.encoded_size(msg)


def test_worst_case_overhead_fits_the_budget() -> None:
    worst = replace(
        MESSAGE,
        device="D" * p.MAX_DEVICE,
        sender="\U0001f600" * (p.MAX_SENDER // 4),  # 64 bytes of 4-byte characters
        subject="s" * 44,
        content="€" * ((MAX_MESSAGE_TEXT - 44) // 3),  # 3-byte characters: 900 bytes
    )
    assert len((worst.subject + worst.content).encode()) == MAX_MESSAGE_TEXT
    data = p.encode_message(worst, SECRET)
    assert len(data) - MAX_MESSAGE_TEXT == p.MAX_MESSAGE_OVERHEAD == 203
    assert p.MAX_MESSAGE_OVERHEAD <= ENVELOPE_BUDGET
    assert len(data) <= MAX_DATAGRAM
    assert decode(data) == worst


def test_every_single_byte_change_is_refused() -> None:
    for data, decoder in (
        (p.encode_message(MESSAGE, SECRET), decode),
        (p.encode_ack(ACK, SECRET), lambda d: p.decode_ack(d, SECRET)),
    ):
        for position in range(len(data)):
            for mask in (0x01, 0x80, 0xFF):
                changed = bytearray(data)
                changed[position] ^= mask
                with pytest.raises(p.ProtocolError) as caught:
                    decoder(bytes(changed))
                assert SECRET.hex() not in str(caught.value)


@pytest.mark.parametrize("kind", ["message", "ack"])
def test_every_truncation_is_malformed(kind: str) -> None:
    if kind == "message":
        data = p.encode_message(replace(MESSAGE, content=TRICKY), SECRET)
        decoder: Callable[[bytes], object] = decode
    else:
        data = p.encode_ack(ACK, SECRET)
        decoder = lambda d: p.decode_ack(d, SECRET)  # noqa: E731
    for length in range(len(data)):
        with pytest.raises(p.Malformed):
            decoder(data[:length])


def test_wrong_secret_is_a_bad_signature() -> None:
    with pytest.raises(p.BadSignature):
        p.decode_message(p.encode_message(MESSAGE, SECRET), OTHER, NOW)
    with pytest.raises(p.BadSignature):
        p.decode_ack(p.encode_ack(ACK, SECRET), OTHER)


def test_expiry() -> None:
    data = p.encode_message(MESSAGE, SECRET)
    assert p.decode_message(data, SECRET, MESSAGE.expires) == MESSAGE
    with pytest.raises(p.Expired):
        p.decode_message(data, SECRET, MESSAGE.expires + 0.001)


def test_signature_is_checked_before_expiry() -> None:
    data = p.encode_message(MESSAGE, SECRET)
    with pytest.raises(p.BadSignature):
        p.decode_message(data, OTHER, MESSAGE.expires + 60)


def test_oversized_encode_is_refused_not_cut() -> None:
    small = replace(MESSAGE, device="a", sender="", subject="")
    room = MAX_DATAGRAM - p.encoded_size(replace(small, content=""))
    assert len(p.encode_message(replace(small, content="c" * room), SECRET)) == MAX_DATAGRAM
    with pytest.raises(p.Oversized):
        p.encode_message(replace(small, content="c" * (room + 1)), SECRET)
    bigger = replace(small, content="c" * 5000)
    assert decode_with_limit(p.encode_message(bigger, SECRET, limit=6000), 6000) == bigger


def decode_with_limit(data: bytes, limit: int) -> p.Message:
    return p.decode_message(data, SECRET, NOW, limit=limit)


def test_oversized_datagram_is_refused_before_anything_else() -> None:
    data = p.encode_message(replace(MESSAGE, content="c" * 2000), SECRET, limit=4000)
    with pytest.raises(p.Oversized):
        decode(data)
    with pytest.raises(p.Oversized):
        decode(b"\0" * (MAX_DATAGRAM + 1))
    with pytest.raises(p.Oversized):
        p.peek_device(data)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", p.Malformed),
        (b"PS", p.Malformed),
        (raw_message(header=b"XS\x01M"), p.Malformed),
        (raw_message(header=b"PS\x02M"), p.UnsupportedVersion),
        (raw_message(header=b"PS\x00M"), p.UnsupportedVersion),
        (b"PS\x02", p.Malformed),
        (b"PS\x02M", p.UnsupportedVersion),
        (raw_message(header=b"PS\x01A"), p.Malformed),
        (raw_message(header=b"PS\x01Z"), p.Malformed),
        (raw_message(priority=3), p.Malformed),
        (raw_message(device=b""), p.Malformed),
        (raw_message(device=b"-truck"), p.Malformed),
        (raw_message(device=b"truck 17"), p.Malformed),
        (raw_message(device=b"t" * 65), p.Malformed),
        (raw_message(device="trück".encode()), p.Malformed),
        (raw_message(sender=b"s" * 65), p.Malformed),
        (raw_message(subject=b"\xff"), p.Malformed),
        (raw_message(content=b"\xc3"), p.Malformed),
        (raw_message(content=b"\xed\xa0\x80"), p.Malformed),  # an encoded surrogate
        (raw_message(content=b"\xc0\xaf"), p.Malformed),  # overlong
        (raw_message(content=b"a\0b"), p.Malformed),
        (raw_message(times=(2000, 1000)), p.Malformed),
        (raw_message(times=(1000, 2**48)), p.Malformed),
        (raw_message(times=(2**64 - 1, 2**64 - 1)), p.Malformed),
        (raw_message(tail=b"\0"), p.Malformed),
        (raw_message()[:-1] + b"\0", p.BadSignature),
    ],
)
def test_structure_is_checked(data: bytes, error: type[p.ProtocolError]) -> None:
    with pytest.raises(error):
        decode(data)


def test_structure_is_checked_before_the_signature() -> None:
    with pytest.raises(p.Malformed):
        p.decode_message(raw_message(priority=7), OTHER, NOW)


def test_hand_built_message_decodes() -> None:
    msg = decode(raw_message(times=(1000, 2_000_000_000_000)))
    assert msg == p.Message(
        request_id=uuid.UUID(int=0),
        device="truck-17",
        subject="sync",
        content="hello",
        sender="pushsync",
        priority="normal",
        created=1.0,
        expires=2_000_000_000.0,
    )


def test_message_and_ack_are_not_interchangeable() -> None:
    with pytest.raises(p.Malformed):
        p.decode_ack(p.encode_message(MESSAGE, SECRET), SECRET)
    with pytest.raises(p.Malformed):
        decode(p.encode_ack(ACK, SECRET))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"PS\x01M" + bytes(36),
        b"PS\x01A" + bytes(16) + b"\x00",
        b"PS\x01A" + bytes(16) + b"\x01-",
    ],
)
def test_peek_device_refuses_garbage(data: bytes) -> None:
    with pytest.raises(p.Malformed):
        p.peek_device(data)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"device": ""}, p.Malformed),
        ({"device": "truck/17"}, p.Malformed),
        ({"device": "truck-17\n"}, p.Malformed),
        ({"device": "t" * 65}, p.Malformed),
        ({"priority": "urgent"}, p.Malformed),
        ({"content": "a\0b"}, p.Malformed),
        ({"subject": "\ud800"}, p.Malformed),
        ({"created": -1.0}, p.Malformed),
        ({"created": float("nan")}, p.Malformed),
        ({"expires": float("inf")}, p.Malformed),
        ({"expires": 2.0**70}, p.Malformed),
        ({"expires": 2.0**48 / 1000}, p.Malformed),
        ({"expires": NOW - 1}, p.Malformed),
        ({"sender": "s" * 65}, p.Oversized),
        ({"content": "c" * 70_000}, p.Oversized),
    ],
)
def test_encode_refuses_what_cannot_be_sent(
    change: dict[str, Any], error: type[p.ProtocolError]
) -> None:
    with pytest.raises(error):
        p.encode_message(replace(MESSAGE, **change), SECRET, limit=10**6)


# --------------------------------------------------------------------------- secrets


def test_secret_file_round_trip() -> None:
    text = p.format_secret(SECRET)
    assert text == SECRET.hex() + "\n"
    assert p.read_secret(text) == SECRET
    assert p.read_secret("  \n" + SECRET.hex().upper() + "\r\n\n") == SECRET


@pytest.mark.parametrize("text", ["", "abc", SECRET.hex()[:-1], SECRET.hex() + "00", "zz" * 32])
def test_bad_secret_file_is_a_clear_error_without_the_secret(text: str) -> None:
    with pytest.raises(UsageError, match="key file") as caught:
        p.read_secret(text)
    assert text.strip() == "" or text.strip() not in str(caught.value)


def test_format_secret_refuses_wrong_size() -> None:
    with pytest.raises(UsageError):
        p.format_secret(b"short")


# --------------------------------------------------------------------------- SMTP form


def mail(
    msg: p.Message, *, subject: str | None = None, body: str | None = None
) -> tuple[str | None, str, str | None]:
    """Send ``msg`` through the stdlib email package as a mail client would see it."""
    email = EmailMessage()
    email["From"] = "pushsync@example.org"
    email["To"] = "truck-17@example.org"
    for name, value in p.email_headers(msg, SECRET).items():
        email[name] = value
    if subject is not None:
        email.replace_header("Subject", subject)
    email.set_content(msg.content if body is None else body)
    raw = email.as_bytes(policy=policy.SMTP)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    received = message_from_bytes(raw, policy=policy.default)
    assert isinstance(received, EmailMessage)
    text = received.get_content()
    assert isinstance(text, str)
    return received["Subject"], text, received[p.ENVELOPE_HEADER]


@pytest.mark.parametrize(
    "msg",
    [
        MESSAGE,
        replace(MESSAGE, subject="", content=""),
        replace(MESSAGE, subject="  ünïcødé 😀 " * 8, content=TRICKY * 5 + "\n\n"),
        replace(MESSAGE, subject="two\nlines", content="x" * 1100),
    ],
)
def test_email_round_trip(msg: p.Message) -> None:
    subject, body, envelope = mail(msg)
    assert p.message_from_email(subject, body, envelope, SECRET, NOW) == msg


def test_email_headers() -> None:
    headers = p.email_headers(replace(MESSAGE, subject="two\r\nlines\there"), SECRET)
    assert headers["Subject"] == "two lines here"
    envelope = base64.b64decode("".join(headers[p.ENVELOPE_HEADER].split()))
    assert decode(envelope).subject == "two\r\nlines\there"


def test_email_tolerates_transport_line_endings() -> None:
    body = MESSAGE.content.replace(" ", "\r\n") + "\r\n"
    msg = replace(MESSAGE, content=MESSAGE.content.replace(" ", "\n"))
    subject, _, envelope = mail(msg)
    assert p.message_from_email(subject, body, envelope, SECRET, NOW) == msg


@pytest.mark.parametrize(
    ("subject", "body"), [("sink", None), (None, "disruption 43 on route A7"), ("", None)]
)
def test_email_with_changed_visible_text_is_refused(subject: str | None, body: str | None) -> None:
    got_subject, got_body, envelope = mail(MESSAGE, subject=subject, body=body)
    with pytest.raises(p.BadSignature):
        p.message_from_email(got_subject, got_body, envelope, SECRET, NOW)


def test_email_refusals() -> None:
    subject, body, envelope = mail(MESSAGE)
    assert envelope is not None
    with pytest.raises(p.BadSignature, match="unsigned"):
        p.message_from_email(subject, body, None, SECRET, NOW)
    with pytest.raises(p.BadSignature):
        p.message_from_email(subject, body, envelope, OTHER, NOW)
    with pytest.raises(p.Malformed):
        p.message_from_email(subject, body, envelope + "*", SECRET, NOW)
    with pytest.raises(p.Malformed):
        p.message_from_email(subject, body, "ü", SECRET, NOW)
    with pytest.raises(p.Oversized):
        p.message_from_email(subject, body, "QUFB" * 401, SECRET, NOW)
    with pytest.raises(p.Expired):
        p.message_from_email(subject, body, envelope, SECRET, MESSAGE.expires + 1)


# --------------------------------------------------------------------------- frames

HELLO = p.Hello(device="truck-17", nonce=b"c" * 32)
STREAM = b"".join(
    (
        p.encode_hello(HELLO),
        p.encode_challenge(b"s" * 32),
        p.encode_auth(b"a" * 32),
        p.encode_welcome(b"w" * 32),
        p.encode_message_frame(p.encode_message(MESSAGE, SECRET)),
        p.encode_ack_frame(p.encode_ack(ACK, SECRET)),
        p.encode_track(":5001"),
        p.encode_poll(),
        p.encode_ping(),
        p.encode_pong(123),
        p.encode_frame(p.FrameType.MESSAGE, b"m" * 65535),
        p.encode_bye("going away ✋"),
    )
)


def read_all(data: bytes, chunk: int) -> list[p.Frame]:
    reader = p.FrameReader()
    frames = [f for at in range(0, len(data), chunk) for f in reader.feed(data[at : at + chunk])]
    assert reader.buffered == 0
    return frames


def test_frame_types_are_the_documented_bytes() -> None:
    assert {t.name: int(t) for t in p.FrameType} == {
        "HELLO": 0x01,
        "CHALLENGE": 0x02,
        "AUTH": 0x03,
        "WELCOME": 0x04,
        "MESSAGE": 0x10,
        "ACK": 0x11,
        "TRACK": 0x12,
        "POLL": 0x13,
        "SUBSCRIBE": 0x14,
        "PING": 0x20,
        "PONG": 0x21,
        "BYE": 0x30,
        "SYNC_BEGIN": 0x40,
        "UPLOAD": 0x41,
        "UPLOADED": 0x42,
        "DOWNLOAD": 0x43,
        "SYNC_END": 0x44,
        "SYNC_ERROR": 0x45,
    }
    assert p.encode_poll() == b"\x00\x00\x00\x01\x13"
    assert p.encode_subscribe() == b"\x00\x00\x00\x01\x14"


def test_json_frames_round_trip_and_keep_numbers_exact() -> None:
    frame = p.encode_json_frame(p.FrameType.UPLOAD, {"n": 1, "x": 0.1, "s": "é"})
    [decoded] = p.FrameReader().feed(frame)
    assert p.decode_json_frame(decoded, p.FrameType.UPLOAD) == {"n": 1, "x": "0.1", "s": "é"}
    with pytest.raises(p.Malformed):
        p.encode_json_frame(p.FrameType.PING, {})
    for payload in (b"[1]", b"{", b"\xff", b'{"a": NaN}', b"[" * 40 + b"]" * 40):
        bad = p.Frame(p.FrameType.UPLOAD, payload)
        with pytest.raises(p.Malformed):
            p.decode_json_frame(bad, p.FrameType.UPLOAD)
    deep = p.Frame(p.FrameType.UPLOAD, b'{"a":' * 40 + b"1" + b"}" * 40)
    with pytest.raises(p.Malformed):
        p.decode_json_frame(deep, p.FrameType.UPLOAD)
    with pytest.raises(p.Oversized):
        p.encode_json_frame(p.FrameType.UPLOAD, {"x": "a" * 70000})


def test_frames_byte_by_byte_equal_frames_at_once() -> None:
    at_once = read_all(STREAM, len(STREAM))
    assert [f.type for f in at_once] == [
        p.FrameType.HELLO,
        p.FrameType.CHALLENGE,
        p.FrameType.AUTH,
        p.FrameType.WELCOME,
        p.FrameType.MESSAGE,
        p.FrameType.ACK,
        p.FrameType.TRACK,
        p.FrameType.POLL,
        p.FrameType.PING,
        p.FrameType.PONG,
        p.FrameType.MESSAGE,
        p.FrameType.BYE,
    ]
    assert read_all(STREAM, 1) == at_once
    assert read_all(STREAM, 7) == at_once


def test_frame_payloads_round_trip() -> None:
    frames = read_all(STREAM, len(STREAM))
    assert p.decode_hello(frames[0]) == HELLO
    assert p.decode_challenge(frames[1]) == b"s" * 32
    assert p.decode_auth(frames[2]) == b"a" * 32
    assert p.decode_welcome(frames[3]) == b"w" * 32
    assert decode(frames[4].payload) == MESSAGE
    assert p.decode_ack(frames[5].payload, SECRET) == ACK
    assert p.decode_track(frames[6]) == ":5001"
    p.decode_poll(frames[7])
    assert p.decode_heartbeat(frames[8]) is None
    assert p.decode_heartbeat(frames[9]) == 123
    assert p.decode_bye(frames[11]) == "going away ✋"


def test_partial_frame_is_buffered() -> None:
    reader = p.FrameReader()
    frame = p.encode_ping(7)
    assert reader.feed(frame[:6]) == []
    assert reader.buffered == 6
    assert reader.feed(frame[6:] + frame[:2]) == [p.Frame(p.FrameType.PING, (7).to_bytes(8, "big"))]
    assert reader.buffered == 2


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x00\x00\x00\x00", p.Malformed),
        (b"\x00\x01\x00\x01", p.Oversized),  # 65537: refused before the frame arrives
        (b"\xff\xff\xff\xff", p.Oversized),
        (b"\x00\x00\x00\x05\x99", p.Malformed),  # unknown type, refused at its first byte
        (b"\x00\x00\x00\x01\x00", p.Malformed),
        (p.encode_poll() + b"GET / HTTP/1.1\r\n", p.Oversized),
        (p.encode_poll() + b"\x16\x03\x01\x02\x00", p.Oversized),  # a TLS ClientHello
        (p.encode_poll() + b"\x00\x00\x00\x02\x7f", p.Malformed),
    ],
)
def test_garbage_streams_raise(data: bytes, error: type[p.ProtocolError]) -> None:
    reader = p.FrameReader()
    with pytest.raises(error):
        reader.feed(data)
    with pytest.raises(error):
        reader.feed(p.encode_poll())  # a failed stream stays failed
    with pytest.raises(error):
        read_all(data, 1)


def test_frame_size_limit() -> None:
    assert len(p.encode_frame(p.FrameType.MESSAGE, b"m" * 65535)) == 4 + 65536
    with pytest.raises(p.Oversized):
        p.encode_frame(p.FrameType.MESSAGE, b"m" * 65536)


@pytest.mark.parametrize(
    ("decoder", "frame", "error"),
    [
        (p.decode_hello, p.Frame(p.FrameType.PING), p.Malformed),
        # Version 1 (frames without tags) is refused before anything else is read.
        (p.decode_hello, p.Frame(p.FrameType.HELLO, b"\x01" + b"c" * 32), p.UnsupportedVersion),
        (p.decode_hello, p.Frame(p.FrameType.HELLO, b"\x03" + b"c" * 32), p.UnsupportedVersion),
        (p.decode_hello, p.Frame(p.FrameType.HELLO, b"\x02" + b"c" * 31), p.Malformed),
        (p.decode_hello, p.Frame(p.FrameType.HELLO, b"\x02" + b"c" * 32 + b"\x01"), p.Malformed),
        (p.decode_hello, p.Frame(p.FrameType.HELLO, b"\x02" + b"c" * 32 + b"\x02-a"), p.Malformed),
        (p.decode_hello, p.Frame(p.FrameType.HELLO, b"\x02" + b"c" * 32 + b"\x01ab"), p.Malformed),
        (p.decode_challenge, p.Frame(p.FrameType.CHALLENGE, b"s" * 31), p.Malformed),
        (p.decode_challenge, p.Frame(p.FrameType.AUTH, b"s" * 32), p.Malformed),
        (p.decode_auth, p.Frame(p.FrameType.AUTH, b"a" * 33), p.Malformed),
        (p.decode_welcome, p.Frame(p.FrameType.WELCOME), p.Malformed),
        (p.decode_heartbeat, p.Frame(p.FrameType.PING, b"\x00" * 4), p.Malformed),
        (p.decode_heartbeat, p.Frame(p.FrameType.POLL), p.Malformed),
        (p.decode_track, p.Frame(p.FrameType.TRACK, b"host"), p.Malformed),
        (p.decode_track, p.Frame(p.FrameType.TRACK, b"host:0"), p.Malformed),
        (p.decode_track, p.Frame(p.FrameType.TRACK, b"host:65536"), p.Malformed),
        (p.decode_track, p.Frame(p.FrameType.TRACK, b"[nope]:5001"), p.Malformed),
        (p.decode_track, p.Frame(p.FrameType.TRACK, b"h\xc3\xb6st:5001"), p.Malformed),
        (p.decode_track, p.Frame(p.FrameType.TRACK, b"a b:5001"), p.Malformed),
        (p.decode_poll, p.Frame(p.FrameType.POLL, b"?"), p.Malformed),
        (p.decode_bye, p.Frame(p.FrameType.BYE, b"\xff"), p.Malformed),
        (p.decode_bye, p.Frame(p.FrameType.BYE, b"x" * 256), p.Malformed),
    ],
)
def test_bad_payloads(
    decoder: Callable[[p.Frame], object], frame: p.Frame, error: type[p.ProtocolError]
) -> None:
    with pytest.raises(error):
        decoder(frame)


def test_frame_encoders_refuse_bad_values() -> None:
    with pytest.raises(p.Malformed):
        p.encode_hello(p.Hello(device="truck-17", nonce=b"short"))
    with pytest.raises(p.Malformed):
        p.encode_hello(p.Hello(device="truck 17", nonce=b"c" * 32))
    with pytest.raises(p.Malformed):
        p.encode_auth(b"x" * 31)
    with pytest.raises(p.Malformed):
        p.encode_ping(-1)
    with pytest.raises(p.Malformed):
        p.encode_track("no-port")
    with pytest.raises(p.Oversized):
        p.encode_bye("x" * 256)


@pytest.mark.parametrize(
    ("endpoint", "peer", "address"),
    [
        ("192.0.2.7:5001", "198.51.100.1", "192.0.2.7:5001"),
        ("truck-17.example.org:5001", "198.51.100.1", "truck-17.example.org:5001"),
        ("[2001:db8::7]:5001", "198.51.100.1", "[2001:db8::7]:5001"),
        (":5001", "198.51.100.1", "198.51.100.1:5001"),
        ("0.0.0.0:5001", "198.51.100.1", "198.51.100.1:5001"),
        ("[::]:5001", "2001:db8::9", "[2001:db8::9]:5001"),
    ],
)
def test_tracked_address(endpoint: str, peer: str, address: str) -> None:
    frame = read_all(p.encode_track(endpoint), 1)[0]
    assert p.tracked_address(p.decode_track(frame), peer) == address


# --------------------------------------------------------------------------- handshake


def test_handshake() -> None:
    client_nonce, server_nonce = p.new_nonce(), p.new_nonce()
    assert client_nonce != server_nonce
    assert len(client_nonce) == p.NONCE_SIZE
    proof = p.client_proof(SECRET, server_nonce, client_nonce, "truck-17")
    p.verify_proof(p.client_proof(SECRET, server_nonce, client_nonce, "truck-17"), proof)
    answer = p.server_proof(SECRET, client_nonce, server_nonce, "truck-17")
    p.verify_proof(p.server_proof(SECRET, client_nonce, server_nonce, "truck-17"), answer)
    assert proof != answer  # a server cannot reflect a client's proof back, nor the reverse
    assert SECRET not in proof + answer


@pytest.mark.parametrize(
    ("secret", "server_nonce", "client_nonce", "device"),
    [
        (OTHER, b"s" * 32, b"c" * 32, "truck-17"),
        (SECRET, b"S" * 32, b"c" * 32, "truck-17"),
        (SECRET, b"s" * 32, b"C" * 32, "truck-17"),
        (SECRET, b"s" * 32, b"c" * 32, "truck-18"),
        (SECRET, b"c" * 32, b"s" * 32, "truck-17"),  # nonces swapped
    ],
)
def test_proofs_bind_secret_nonces_and_device(
    secret: bytes, server_nonce: bytes, client_nonce: bytes, device: str
) -> None:
    args = (b"s" * 32, b"c" * 32, "truck-17")
    with pytest.raises(p.BadSignature):
        p.verify_proof(
            p.client_proof(SECRET, *args),
            p.client_proof(secret, server_nonce, client_nonce, device),
        )
    with pytest.raises(p.BadSignature):
        p.verify_proof(
            p.server_proof(SECRET, args[1], args[0], args[2]),
            p.server_proof(secret, client_nonce, server_nonce, device),
        )


def test_proof_refuses_bad_inputs() -> None:
    with pytest.raises(p.Malformed):
        p.client_proof(SECRET, b"short", b"c" * 32, "truck-17")
    with pytest.raises(p.Malformed):
        p.server_proof(SECRET, b"c" * 32, b"s" * 32, "")
    with pytest.raises(p.BadSignature):
        p.verify_proof(b"x" * 32, b"")


# --------------------------------------------------------------------------- frame authentication

KEYS = p.session_keys(SECRET, b"c" * 32, b"s" * 32, "truck-17")
TRAFFIC = [
    p.encode_subscribe(),
    p.encode_track(":5001"),
    p.encode_ack_frame(p.encode_ack(ACK, SECRET)),
    p.encode_ping(7),
    p.encode_json_frame(p.FrameType.UPLOAD, {"batch": 1, "rows": []}),
    p.encode_frame(p.FrameType.MESSAGE, b"m" * 65535),
]


def sealed(key: bytes, frames: Sequence[bytes]) -> bytes:
    sealer = p.FrameSealer(key)
    return b"".join(sealer.seal(frame) for frame in frames)


def opened(key: bytes, data: bytes, chunk: int | None = None) -> list[p.Frame]:
    reader = p.FrameReader()
    reader.authenticate(key)
    chunk = chunk or len(data) or 1
    return [f for at in range(0, len(data), chunk) for f in reader.feed(data[at : at + chunk])]


def test_hkdf_is_rfc_5869() -> None:
    """RFC 5869, appendix A.1 (test case 1)."""
    okm = p.hkdf_sha256(
        bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("0b" * 22),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_session_keys_differ_by_direction_and_bind_everything() -> None:
    assert KEYS.up != KEYS.down
    assert len(KEYS.up) == len(KEYS.down) == 32
    assert SECRET not in KEYS.up + KEYS.down
    others = [
        p.session_keys(OTHER, b"c" * 32, b"s" * 32, "truck-17"),
        p.session_keys(SECRET, b"C" * 32, b"s" * 32, "truck-17"),
        p.session_keys(SECRET, b"c" * 32, b"S" * 32, "truck-17"),
        p.session_keys(SECRET, b"s" * 32, b"c" * 32, "truck-17"),  # nonces swapped
        p.session_keys(SECRET, b"c" * 32, b"s" * 32, "truck-18"),
    ]
    keys = {KEYS.up, KEYS.down} | {k for o in others for k in (o.up, o.down)}
    assert len(keys) == 2 + 2 * len(others)
    assert str(KEYS.up) not in repr(KEYS)
    assert str(KEYS.down) not in repr(KEYS)  # logs safe


def test_the_documented_key_schedule_and_tag() -> None:
    """docs/protocol.md spells both out; built here with hmac alone."""
    salt = b"c" * 32 + b"s" * 32
    prk = hmac.digest(salt, SECRET, "sha256")
    up = hmac.digest(prk, b"pushsync-sync-2 key device->server truck-17\x01", "sha256")
    down = hmac.digest(prk, b"pushsync-sync-2 key server->device truck-17\x01", "sha256")
    assert (KEYS.up, KEYS.down) == (up, down)
    frame = p.encode_ping(7)
    tag = hmac.digest(up, (5).to_bytes(8, "big") + frame, "sha256")[:16]
    assert p.frame_tag(up, 5, frame) == tag


def test_sealed_frames_round_trip_in_any_pieces() -> None:
    data = sealed(KEYS.up, TRAFFIC)
    assert len(data) == sum(len(f) for f in TRAFFIC) + p.TAG_SIZE * len(TRAFFIC)
    frames = opened(KEYS.up, data)
    assert [f.type for f in frames] == [f[4] for f in TRAFFIC]
    assert opened(KEYS.up, data, 1) == frames == opened(KEYS.up, data, 1000)
    # Several frames sealed at once get one tag each, as sealed one by one.
    assert p.FrameSealer(KEYS.up).seal(b"".join(TRAFFIC)) == data


def test_a_changed_byte_anywhere_is_never_read() -> None:
    """Refused (or, for a longer length, waited for): never read, nor what follows it."""
    pieces = _each_sealed(KEYS.up, TRAFFIC[:4])
    data = b"".join(pieces)
    good = opened(KEYS.up, data)
    for at in range(len(data)):
        changed = bytearray(data)
        changed[at] ^= 0x40
        before = next(n for n in range(len(pieces)) if at < sum(map(len, pieces[: n + 1])))
        reader = p.FrameReader()
        reader.authenticate(KEYS.up)
        try:
            frames = reader.feed(bytes(changed))
        except p.ProtocolError:
            continue
        assert frames == good[:before], at
        assert reader.buffered > 0, at


@pytest.mark.parametrize(
    "attack",
    ["reflected", "replayed", "reordered", "dropped", "other session", "untagged", "injected"],
)
def test_forged_replayed_reordered_and_reflected_frames_are_refused(attack: str) -> None:
    frames = [sealed_one for sealed_one in _each_sealed(KEYS.up, TRAFFIC[:4])]
    if attack == "reflected":  # what the server sent, back to it
        data = sealed(KEYS.down, TRAFFIC[:2])
    elif attack == "replayed":
        data = b"".join(frames[:2]) + frames[1]
    elif attack == "reordered":
        data = frames[0] + frames[2] + frames[1]
    elif attack == "dropped":
        data = frames[0] + frames[2]
    elif attack == "other session":
        other = p.session_keys(SECRET, b"c" * 32, b"x" * 32, "truck-17")
        data = frames[0] + sealed(other.up, TRAFFIC[:2])[len(frames[0]) :]
    elif attack == "untagged":
        data = frames[0] + TRAFFIC[1] + bytes(p.TAG_SIZE)
    else:  # a frame inserted with a made-up tag
        data = frames[0] + TRAFFIC[3] + b"\x00" * p.TAG_SIZE + frames[1]
    reader = p.FrameReader()
    reader.authenticate(KEYS.up)
    with pytest.raises(p.BadSignature):
        reader.feed(data)
    with pytest.raises(p.BadSignature):
        reader.feed(frames[0])  # a failed stream stays failed


def _each_sealed(key: bytes, frames: Sequence[bytes]) -> list[bytes]:
    sealer = p.FrameSealer(key)
    return [sealer.seal(frame) for frame in frames]


def test_take_switches_to_tagged_frames_between_two_frames() -> None:
    """A device reads WELCOME, then authenticates the rest of the same bytes."""
    data = p.encode_welcome(b"w" * 32) + sealed(KEYS.down, [p.encode_ping(1)])
    reader = p.FrameReader()
    reader.add(data)
    welcome = reader.take()
    assert welcome is not None
    assert welcome.type == p.FrameType.WELCOME
    reader.authenticate(KEYS.down)
    assert reader.take() == p.Frame(p.FrameType.PING, (1).to_bytes(8, "big"))
    assert reader.take() is None
    assert reader.buffered == 0
    with pytest.raises(RuntimeError):
        reader.authenticate(KEYS.down)


def test_only_whole_frames_are_sealed() -> None:
    sealer = p.FrameSealer(KEYS.up)
    for data in (b"\x00\x00\x00\x00", b"\x00\x00\x00\x05\x13", p.encode_poll()[:-1], b"x"):
        with pytest.raises(ValueError, match="only whole frames can be sealed"):
            sealer.seal(data)
    assert sealer.sent == 0
    sealer.seal(p.encode_poll() + p.encode_poll())
    assert sealer.sent == 2


# --------------------------------------------------------------------------- properties

ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
DEVICE_IDS = st.builds(
    str.__add__, st.sampled_from(ALNUM), st.text(ALNUM + "._-", max_size=p.MAX_DEVICE - 1)
)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=300)


@st.composite
def messages(draw: st.DrawFn) -> p.Message:
    created = draw(st.integers(0, 2**47))
    return p.Message(
        request_id=draw(st.uuids()),
        device=draw(DEVICE_IDS),
        subject=draw(TEXT),
        content=draw(TEXT),
        sender=draw(TEXT.filter(lambda s: len(s.encode()) <= p.MAX_SENDER)),
        priority=draw(st.sampled_from(p.PRIORITIES)),
        created=created / 1000,
        expires=(created + draw(st.integers(0, 2**40))) / 1000,
    )


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut", "set"]))
        if action == "flip" and at < len(out):
            out[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif action == "cut":
            del out[at:]
        elif action == "set" and at < len(out):
            out[at] = draw(st.sampled_from([0, 1, 2, 3, 0x7F, 0x80, 0xFF]))
    return bytes(out)


def outcome(data: bytes, secret: bytes = SECRET) -> p.Message | p.Ack | None:
    """Whatever the bytes, a decoder returns or raises a ProtocolError; nothing else escapes."""
    for decoder in (
        lambda: p.peek_device(data),
        lambda: p.decode_ack(data, secret),
        lambda: p.decode_message(data, secret, 0.0),
    ):
        try:
            result = decoder()
        except p.ProtocolError:
            continue
        if isinstance(result, p.Message):
            assert p.encode_message(result, secret) == data  # one encoding per message
        if isinstance(result, p.Ack):
            assert p.encode_ack(result, secret) == data
        if not isinstance(result, str):
            return result
    return None


HEADERS = st.sampled_from([b"PS\x01M", b"PS\x01A"])
DATAGRAMS = st.one_of(
    st.binary(max_size=1300),
    st.builds(bytes.__add__, HEADERS, st.binary(max_size=300)),  # fails at the structure
    st.builds(lambda h, b: sign(h + b), HEADERS, st.binary(max_size=300)),  # passes the MAC
)


@settings(max_examples=examples(600), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DATAGRAMS)
@example(b"PS\x01M" + bytes(200))
@example(b"PS\x01A" + bytes(60))
@example(sign(b"PS\x01A" + bytes(16) + b"\x01a" + bytes(8)))
def test_random_bytes_never_escape(data: bytes) -> None:
    outcome(data)


@settings(max_examples=examples(600), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), messages(), st.integers(0, p.MAX_TIME_MS))
def test_envelopes_round_trip_and_mutations_never_decode(
    data: st.DataObject, msg: p.Message, confirmed: int
) -> None:
    ack = p.Ack(request_id=msg.request_id, device=msg.device, confirmed=confirmed / 1000)
    envelope = p.encode_ack(ack, SECRET)
    assert outcome(envelope) == ack
    changed = data.draw(mutated(envelope))
    assert outcome(changed) is None or changed == envelope
    try:
        envelope = p.encode_message(msg, SECRET)
    except p.Oversized:
        assert p.encoded_size(msg) > MAX_DATAGRAM
        return
    assert len(envelope) == p.encoded_size(msg)
    assert outcome(envelope) == msg
    changed = data.draw(mutated(envelope))
    assert outcome(changed) is None or changed == envelope


VALID_FRAMES = st.sampled_from(
    [
        p.encode_hello(HELLO),
        p.encode_challenge(b"s" * 32),
        p.encode_message_frame(p.encode_message(MESSAGE, SECRET)),
        p.encode_ping(5),
        p.encode_poll(),
        p.encode_bye("bye"),
        p.encode_frame(p.FrameType.MESSAGE, b"m" * 3000),
    ]
)


def read_frames(chunks: Sequence[bytes]) -> list[p.Frame] | None:
    reader = p.FrameReader()
    frames: list[p.Frame] = []
    try:
        for chunk in chunks:
            frames += reader.feed(chunk)
    except p.ProtocolError:
        return None
    return frames


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=examples(600), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.lists(VALID_FRAMES, max_size=6), st.lists(st.integers(0, 10**6)))
def test_frame_streams(data: st.DataObject, frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    whole = read_frames([stream])
    assert whole is not None
    assert len(whole) == len(frames)
    assert read_frames(split(stream, cuts)) == whole
    changed = data.draw(st.one_of(mutated(stream), st.binary(max_size=200)))
    for frame in read_frames(split(changed, cuts)) or []:
        for decoder in (p.decode_hello, p.decode_challenge, p.decode_heartbeat, p.decode_bye):
            with contextlib.suppress(p.ProtocolError):
                decoder(frame)
        outcome(frame.payload)


# --------------------------------------------------------------------------- docs


def test_the_documented_example_vector() -> None:
    """docs/protocol.md shows this message byte by byte."""
    msg = replace(MESSAGE, content="disruption 42")
    assert p.encode_message(msg, SECRET).hex() == (
        "5053014d"
        "6f1c2d3e4b5a46978877665544332211"
        "0000018bcfe56800"
        "0000018bd01c5680"
        "02"
        "08747275636b2d3137"
        "087075736873796e63"
        "000473796e63"
        "000d64697372757074696f6e203432"
        "b72f37e2e4dfb17108a8e5f7ba34229ced3063f1f972463ecf59f294e03e75d9"
    )
