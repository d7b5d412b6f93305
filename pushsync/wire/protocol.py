"""The wire protocol: signed envelopes, their SMTP form, and SYNC framing.

Everything here is a pure function of its arguments: nothing opens a socket,
reads a clock or touches a file. The channels (UDP, SYNC, maildir) and the
dispatcher's gateways are thin shells around these functions. The byte layouts,
the verification order and what a receiver does with each failure are in
``docs/protocol.md``.

Standard library only: devices install pushsync without the server extras.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Final, Literal

from pushsync.errors import PushsyncError, UsageError
from pushsync.wire.limits import MAX_DATAGRAM

# --------------------------------------------------------------------------- errors


class ProtocolError(PushsyncError):
    """Received bytes are not a valid pushsync message; drop them."""


class Malformed(ProtocolError):
    """The bytes do not follow the wire format."""


class Oversized(ProtocolError):
    """Larger than the protocol allows."""


class BadSignature(ProtocolError):
    """The signature or proof does not match: forged, altered, or another secret."""


class Expired(ProtocolError):
    """The message expired before it arrived."""


class UnsupportedVersion(ProtocolError):
    """A protocol version this side does not speak."""


# --------------------------------------------------------------------------- sizes

MAGIC: Final = b"PS"
VERSION: Final = 1
"""The envelope's version (its third byte)."""
SYNC_VERSION: Final = 2
"""The SYNC connection's version (HELLO's first byte): 2 authenticates every frame after WELCOME."""
KIND_MESSAGE: Final = ord("M")
KIND_ACK: Final = ord("A")
MAC_SIZE: Final = 32
NONCE_SIZE: Final = 32
MAX_DEVICE: Final = 64
MAX_SENDER: Final = 64
MAX_FIELD: Final = 0xFFFF
"""Most UTF-8 bytes one subject or content field can hold (u16 length)."""

_HEADER_SIZE: Final = 4  # magic, version, kind
_U64_MAX: Final = 2**64 - 1
MAX_TIME_MS: Final = 2**48 - 1
"""Latest time an envelope carries (year 10889): converts to float seconds and back exactly."""
_MESSAGE_FIXED: Final = 16 + 8 + 8 + 1 + 1 + 1 + 2 + 2  # id, times, priority, four lengths
MESSAGE_OVERHEAD: Final = _HEADER_SIZE + _MESSAGE_FIXED + MAC_SIZE
"""Bytes of a message envelope besides device, sender, subject and content."""
MAX_MESSAGE_OVERHEAD: Final = MESSAGE_OVERHEAD + MAX_DEVICE + MAX_SENDER
"""Envelope bytes besides subject and content with the longest device id and sender."""

Priority = Literal["low", "normal", "high"]
PRIORITIES: Final[tuple[Priority, ...]] = ("low", "normal", "high")
"""Wire codes are the positions: low 0, normal 1, high 2."""

_DEVICE_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# --------------------------------------------------------------------------- envelopes


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One notification to one device. Times are unix seconds, kept to the millisecond."""

    request_id: uuid.UUID
    device: str
    subject: str
    content: str
    sender: str
    priority: Priority
    created: float
    expires: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """A device's confirmation that it has message ``request_id``."""

    request_id: uuid.UUID
    device: str
    confirmed: float


def encoded_size(msg: Message) -> int:
    """Exactly how many bytes :func:`encode_message` makes of ``msg``."""
    texts = (msg.device, msg.sender, msg.subject, msg.content)
    return MESSAGE_OVERHEAD + sum(len(_utf8(text, "text")) for text in texts)


def encode_message(msg: Message, secret: bytes, *, limit: int = MAX_DATAGRAM) -> bytes:
    """The signed envelope of ``msg``; :class:`Oversized` if it needs more than ``limit``."""
    created = _to_ms(msg.created, "created")
    expires = _to_ms(msg.expires, "expires")
    if expires < created:
        raise Malformed("expires before created")
    body = b"".join(
        (
            _header(KIND_MESSAGE),
            msg.request_id.bytes,
            created.to_bytes(8, "big"),
            expires.to_bytes(8, "big"),
            bytes([_priority_code(msg.priority)]),
            _short(_device_bytes(msg.device)),
            _short(_text_bytes(msg.sender, "sender", MAX_SENDER)),
            _long(_text_bytes(msg.subject, "subject", MAX_FIELD)),
            _long(_text_bytes(msg.content, "content", MAX_FIELD)),
        )
    )
    _check_limit(len(body) + MAC_SIZE, limit)
    return body + _sign(secret, body)


def encode_ack(ack: Ack, secret: bytes) -> bytes:
    """The signed envelope of ``ack``."""
    body = b"".join(
        (
            _header(KIND_ACK),
            ack.request_id.bytes,
            _short(_device_bytes(ack.device)),
            _to_ms(ack.confirmed, "confirmed").to_bytes(8, "big"),
        )
    )
    return body + _sign(secret, body)


def peek_device(data: bytes, *, limit: int = MAX_DATAGRAM) -> str:
    """The device an envelope (message or ack) names, *not yet authenticated*.

    For choosing which secret to verify with; nothing else may trust it.
    """
    reader = _open(data, limit, (KIND_MESSAGE, KIND_ACK))
    reader.take(16 if data[3] == KIND_ACK else 16 + 8 + 8 + 1, "fields before the device")
    return _device_from(reader.short("device"))


def decode_message(data: bytes, secret: bytes, now: float, *, limit: int = MAX_DATAGRAM) -> Message:
    """Verify and decode a message envelope: size, structure, signature, then expiry."""
    msg = _parse_message(_open(data, limit, (KIND_MESSAGE,)))
    _verify(secret, data)
    if now > msg.expires:
        raise Expired("expired before it arrived")
    return msg


def decode_ack(data: bytes, secret: bytes, *, limit: int = MAX_DATAGRAM) -> Ack:
    """Verify and decode an ack envelope: size, structure, then signature."""
    reader = _open(data, limit, (KIND_ACK,))
    request_id = uuid.UUID(bytes=reader.take(16, "request id"))
    device = _device_from(reader.short("device"))
    confirmed = reader.time("confirmed")
    reader.end()
    _verify(secret, data)
    return Ack(request_id=request_id, device=device, confirmed=confirmed)


def _parse_message(reader: _Reader) -> Message:
    request_id = uuid.UUID(bytes=reader.take(16, "request id"))
    created = reader.time("created")
    expires = reader.time("expires")
    priority = _priority_name(reader.u8("priority"))
    device = _device_from(reader.short("device"))
    sender = _text_from(reader.short("sender"), "sender", MAX_SENDER)
    subject = _text_from(reader.long("subject"), "subject", MAX_FIELD)
    content = _text_from(reader.long("content"), "content", MAX_FIELD)
    reader.end()
    if expires < created:
        raise Malformed("expires before created")
    return Message(
        request_id=request_id,
        device=device,
        subject=subject,
        content=content,
        sender=sender,
        priority=priority,
        created=created,
        expires=expires,
    )


def _open(data: bytes, limit: int, kinds: tuple[int, ...]) -> _Reader:
    """Check size and header; a reader over the body between header and MAC."""
    if len(data) > limit:
        raise Oversized(f"{len(data)} bytes, limit {limit}")
    if len(data) < _HEADER_SIZE or data[:2] != MAGIC:
        raise Malformed("not a pushsync envelope")
    if data[2] != VERSION:
        raise UnsupportedVersion(f"envelope version {data[2]}, this side speaks {VERSION}")
    if data[3] not in kinds:
        raise Malformed(f"unexpected envelope kind {data[3]:#04x}")
    if len(data) < _HEADER_SIZE + MAC_SIZE:
        raise Malformed("truncated envelope")
    return _Reader(data[_HEADER_SIZE:-MAC_SIZE])


def _header(kind: int) -> bytes:
    return MAGIC + bytes([VERSION, kind])


def _sign(secret: bytes, body: bytes | memoryview) -> bytes:
    return hmac.digest(secret, body, "sha256")  # one call into OpenSSL, no HMAC object


def _verify(secret: bytes, data: bytes) -> None:
    body = memoryview(data)[:-MAC_SIZE]  # not a copy of the envelope
    if not hmac.compare_digest(_sign(secret, body), data[-MAC_SIZE:]):
        raise BadSignature("envelope signature does not match")


def _check_limit(size: int, limit: int) -> None:
    if size > limit:
        raise Oversized(f"message needs {size} bytes, limit {limit}")


# --------------------------------------------------------------------------- fields


class _Reader:
    """Reads fields off a buffer; running short is :class:`Malformed`, never IndexError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, size: int, what: str) -> bytes:
        end = self._at + size
        if end > len(self._data):
            raise Malformed(f"truncated {what}")
        chunk = self._data[self._at : end]
        self._at = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def time(self, what: str) -> float:
        """A u64 of milliseconds, as unix seconds."""
        ms = self.u64(what)
        if ms > MAX_TIME_MS:
            raise Malformed(f"{what} is too far in the future")
        return ms / 1000

    def short(self, what: str) -> bytes:
        """A field with a u8 length."""
        return self.take(self.u8(what), what)

    def long(self, what: str) -> bytes:
        """A field with a u16 length."""
        return self.take(int.from_bytes(self.take(2, what), "big"), what)

    def end(self) -> None:
        if self._at != len(self._data):
            raise Malformed(f"{len(self._data) - self._at} unexpected bytes after the fields")


def _short(field: bytes) -> bytes:
    return bytes([len(field)]) + field


def _long(field: bytes) -> bytes:
    return len(field).to_bytes(2, "big") + field


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise Malformed(f"{what} is not valid Unicode") from None


def _text_bytes(text: str, what: str, most: int) -> bytes:
    field = _utf8(text, what)
    if b"\0" in field:
        raise Malformed(f"{what} contains NUL")
    if len(field) > most:
        raise Oversized(f"{what} has {len(field)} bytes, at most {most}")
    return field


def _text_from(field: bytes, what: str, most: int) -> str:
    if len(field) > most:
        raise Malformed(f"{what} longer than {most} bytes")
    if b"\0" in field:
        raise Malformed(f"{what} contains NUL")
    try:
        return field.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not UTF-8") from None


def _device_bytes(device: str) -> bytes:
    field = device.encode("ascii", "replace")
    if not _DEVICE_ID.fullmatch(field):
        raise Malformed("device id: 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return field


def _device_from(field: bytes) -> str:
    if not _DEVICE_ID.fullmatch(field):
        raise Malformed("bad device id")
    return field.decode("ascii")


def _priority_code(priority: str) -> int:
    if priority not in PRIORITIES:
        raise Malformed("priority must be low, normal or high")
    return PRIORITIES.index(priority)


def _priority_name(code: int) -> Priority:
    if code >= len(PRIORITIES):
        raise Malformed(f"unknown priority {code}")
    return PRIORITIES[code]


def _to_ms(seconds: float, what: str) -> int:
    if not math.isfinite(seconds) or seconds < 0:
        raise Malformed(f"{what} is not a time after 1970")
    ms = round(seconds * 1000)
    if ms > MAX_TIME_MS:
        raise Malformed(f"{what} is too far in the future")
    return ms


# --------------------------------------------------------------------------- secrets

SECRET_SIZE: Final = 32


def read_secret(text: str) -> bytes:
    """The secret in a key file's text: 64 hex digits, whitespace around them allowed."""
    digits = text.strip()
    if len(digits) != 2 * SECRET_SIZE:
        raise UsageError(
            f"key file: expected {2 * SECRET_SIZE} hexadecimal digits, found {len(digits)} "
            "characters"
        )
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise UsageError("key file: expected only hexadecimal digits 0-9 a-f") from None


def format_secret(secret: bytes) -> str:
    """The key-file text of ``secret``: 64 lower-case hex digits and a newline."""
    if len(secret) != SECRET_SIZE:
        raise UsageError(f"a device secret has {SECRET_SIZE} bytes, not {len(secret)}")
    return secret.hex() + "\n"


# --------------------------------------------------------------------------- SMTP form

ENVELOPE_HEADER: Final = "X-Pushsync-Envelope"
_BASE64_WORD: Final = 76  # a folding point every 76 characters keeps header lines short


def email_headers(msg: Message, secret: bytes, *, limit: int = MAX_DATAGRAM) -> dict[str, str]:
    """``Subject`` and the signature header of the email form; the body is ``msg.content``.

    A header is one line, so the Subject is the subject with whitespace runs
    collapsed; the envelope, in base64 words separated by spaces where mail
    software may fold the line, carries the exact text.
    """
    encoded = base64.b64encode(encode_message(msg, secret, limit=limit)).decode("ascii")
    words = (encoded[at : at + _BASE64_WORD] for at in range(0, len(encoded), _BASE64_WORD))
    return {"Subject": " ".join(msg.subject.split()), ENVELOPE_HEADER: " ".join(words)}


def message_from_email(
    subject_header: str | None,
    body: str,
    envelope_header: str | None,
    secret: bytes,
    now: float,
    *,
    limit: int = MAX_DATAGRAM,
) -> Message:
    """Verify an email: its envelope, and that the visible Subject and body are the signed ones.

    Give the decoded header values and the decoded text body (what
    :mod:`email` returns under ``email.policy.default``).
    """
    if envelope_header is None:
        raise BadSignature(f"unsigned: no {ENVELOPE_HEADER} header")
    msg = decode_message(_unbase64(envelope_header, limit), secret, now, limit=limit)
    if _squeeze(subject_header or "") != _squeeze(msg.subject):
        raise BadSignature("visible Subject differs from the signed subject")
    if _mail_body(body) != _mail_body(msg.content):
        raise BadSignature("visible body differs from the signed content")
    return msg


def _unbase64(header: str, limit: int) -> bytes:
    text = "".join(header.split())
    if len(text) > 4 * math.ceil(limit / 3):
        raise Oversized(f"{ENVELOPE_HEADER} longer than a {limit}-byte envelope")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise Malformed(f"{ENVELOPE_HEADER} is not base64") from None


def _squeeze(text: str) -> str:
    """Without whitespace: folding and encoded words may add, drop or change it."""
    return "".join(text.split())


def _mail_body(text: str) -> str:
    """Line endings as LF, without the trailing newlines that transport may add."""
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")


# --------------------------------------------------------------------------- SYNC frames

MAX_FRAME: Final = 65536
"""Most bytes one frame's length may count: the type byte and the payload."""
MAX_BYE_REASON: Final = 255


class FrameType(enum.IntEnum):
    """The type byte of a SYNC frame."""

    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    WELCOME = 0x04
    MESSAGE = 0x10
    ACK = 0x11
    TRACK = 0x12
    POLL = 0x13
    SUBSCRIBE = 0x14
    SYNC_BEGIN = 0x40
    UPLOAD = 0x41
    UPLOADED = 0x42
    DOWNLOAD = 0x43
    SYNC_END = 0x44
    SYNC_ERROR = 0x45
    PING = 0x20
    PONG = 0x21
    BYE = 0x30


_FRAME_TYPES: Final = frozenset(FrameType)


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes = b""


def encode_frame(frame_type: FrameType, payload: bytes = b"") -> bytes:
    """A frame on the wire: u32 length, type byte, payload."""
    length = 1 + len(payload)
    if length > MAX_FRAME:
        raise Oversized(f"frame of {length} bytes, at most {MAX_FRAME}")
    return length.to_bytes(4, "big") + bytes([frame_type]) + payload


class FrameReader:
    """Turns a byte stream into frames, whatever the pieces it arrives in.

    After :meth:`authenticate` every frame must be followed by its tag
    (:func:`frame_tag`) under the peer's session key and the next sequence
    number; a frame whose tag does not match is :class:`BadSignature`.

    After a :class:`ProtocolError` the stream cannot be trusted any more: every
    later call raises again. Drop the peer.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._at = 0
        self._failure: ProtocolError | None = None
        self._mac: _FrameMac | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer) - self._at

    @property
    def authenticated(self) -> bool:
        """Whether frames must carry tags (after :meth:`authenticate`)."""
        return self._mac is not None

    def authenticate(self, key: bytes) -> None:
        """From the next frame on, check each frame's tag under ``key`` (sequence 0, 1, …)."""
        if self._mac is not None:
            raise RuntimeError("the stream is authenticated already")
        self._mac = _FrameMac(key)

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``, in order."""
        self.add(data)
        frames: list[Frame] = []
        while (frame := self.take()) is not None:
            frames.append(frame)
        return frames

    def add(self, data: bytes) -> None:
        """Buffer ``data``; :meth:`take` returns the frames it completes, one at a time."""
        self._raise_if_failed()
        if self._at:
            del self._buffer[: self._at]
            self._at = 0
        self._buffer += data

    def take(self) -> Frame | None:
        """The next whole frame, or None until more data arrives.

        One at a time, so that a caller can :meth:`authenticate` between two
        frames (a device does, right after WELCOME).
        """
        self._raise_if_failed()
        mac = self._mac
        try:
            found = _frame_at(self._buffer, self._at, TAG_SIZE if mac else 0)
            if found is None:
                return None
            frame, end = found
            if mac is not None:
                mac.check(
                    bytes(self._buffer[self._at : end - TAG_SIZE]),
                    self._buffer[end - TAG_SIZE : end],
                )
        except ProtocolError as exc:
            self._failure = exc
            self._buffer.clear()
            self._at = 0
            raise
        self._at = end
        return frame

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))


def _frame_at(buffer: bytearray, at: int, tag: int) -> tuple[Frame, int] | None:
    """The frame starting at ``at`` and where the next starts (after ``tag`` bytes of
    tag), or None if incomplete."""
    if len(buffer) - at < 4:
        return None
    length = int.from_bytes(buffer[at : at + 4], "big")
    if length == 0:
        raise Malformed("empty frame")
    if length > MAX_FRAME:
        raise Oversized(f"frame of {length} bytes, at most {MAX_FRAME}")
    if len(buffer) - at < 5:
        return None
    if buffer[at + 4] not in _FRAME_TYPES:
        raise Malformed(f"unknown frame type {buffer[at + 4]:#04x}")
    end = at + 4 + length
    if len(buffer) < end + tag:
        return None
    return Frame(FrameType(buffer[at + 4]), bytes(buffer[at + 5 : end])), end + tag


# --------------------------------------------------------------------------- frame authentication

TAG_SIZE: Final = 16
"""Bytes of the tag after each frame of an authenticated SYNC stream (truncated HMAC-SHA256)."""
_KEY_LABEL: Final = b"pushsync-sync-2 key "
_UP: Final = b"device->server"
_DOWN: Final = b"server->device"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class SessionKeys:
    """The keys of one SYNC connection: one per direction, so nothing can be reflected."""

    up: bytes
    """Tags what the device sends."""
    down: bytes
    """Tags what the server sends."""


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF (RFC 5869) with HMAC-SHA256: extract with ``salt``, expand ``info`` to ``length``."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 makes 1 to 8160 bytes")
    prk = hmac.digest(salt, ikm, "sha256")
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
    return out[:length]


def session_keys(
    secret: bytes, client_nonce: bytes, server_nonce: bytes, device: str
) -> SessionKeys:
    """Both directions' keys, from the device secret and both nonces of the handshake."""
    salt = _nonce(client_nonce) + _nonce(server_nonce)
    device_id = _device_bytes(device)
    return SessionKeys(
        up=hkdf_sha256(salt, secret, _KEY_LABEL + _UP + b" " + device_id),
        down=hkdf_sha256(salt, secret, _KEY_LABEL + _DOWN + b" " + device_id),
    )


def frame_tag(key: bytes, seq: int, frame: bytes) -> bytes:
    """The tag of a frame (length, type and payload): HMAC-SHA256(key, u64 seq ‖ frame), cut
    to :data:`TAG_SIZE` bytes."""
    return hmac.digest(key, seq.to_bytes(8, "big") + frame, "sha256")[:TAG_SIZE]


class _FrameMac:
    """Tags (or checks) the frames of one direction, counting the sequence number."""

    __slots__ = ("_keyed", "seq")

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)  # copied: saves hashing the key
        self.seq = 0

    def tag(self, frame: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(self.seq.to_bytes(8, "big"))
        mac.update(frame)
        self.seq += 1
        return mac.digest()[:TAG_SIZE]

    def check(self, frame: bytes, tag: bytes | bytearray) -> None:
        if not hmac.compare_digest(self.tag(frame), bytes(tag)):
            raise BadSignature("frame authentication failed")


class FrameSealer:
    """Appends to each frame sent its tag under ``key`` with the next sequence number.

    Give it the frames of one direction, in the order they are written.
    """

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = _FrameMac(key)

    @property
    def sent(self) -> int:
        """Frames sealed so far (the next frame's sequence number)."""
        return self._mac.seq

    def seal(self, data: bytes) -> bytes:
        """``data`` (one or more whole frames) with a tag after each frame.

        ``ValueError`` if ``data`` is not a sequence of whole frames: a caller's mistake.
        """
        out: list[bytes] = []
        at = 0
        while at < len(data):
            length = int.from_bytes(data[at : at + 4], "big")
            end = at + 4 + length
            if len(data) - at < 5 or length == 0 or end > len(data):
                raise ValueError("only whole frames can be sealed")
            if at == 0 and end == len(data):  # the usual case: one frame
                return data + self._mac.tag(data)
            frame = data[at:end]
            out += (frame, self._mac.tag(frame))
            at = end
        return b"".join(out)


def _expect(frame: Frame, *types: FrameType) -> None:
    if frame.type not in types:
        raise Malformed(f"expected {'/'.join(t.name for t in types)}, got {frame.type.name}")


# --------------------------------------------------------------------------- handshake


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """The first frame a device sends: who it is, and its nonce."""

    device: str
    nonce: bytes


def new_nonce() -> bytes:
    """A fresh random nonce; never reuse one."""
    return secrets.token_bytes(NONCE_SIZE)


def encode_hello(hello: Hello) -> bytes:
    payload = bytes([SYNC_VERSION]) + _nonce(hello.nonce) + _short(_device_bytes(hello.device))
    return encode_frame(FrameType.HELLO, payload)


def decode_hello(frame: Frame) -> Hello:
    """The device and nonce; :class:`UnsupportedVersion` before anything else is read."""
    _expect(frame, FrameType.HELLO)
    reader = _Reader(frame.payload)
    version = reader.u8("version")
    if version != SYNC_VERSION:
        raise UnsupportedVersion(f"SYNC version {version}, this side speaks {SYNC_VERSION}")
    nonce = reader.take(NONCE_SIZE, "nonce")
    device = _device_from(reader.short("device"))
    reader.end()
    return Hello(device=device, nonce=nonce)


def encode_challenge(server_nonce: bytes) -> bytes:
    return encode_frame(FrameType.CHALLENGE, _nonce(server_nonce))


def decode_challenge(frame: Frame) -> bytes:
    """The server's nonce."""
    return _fixed(frame, FrameType.CHALLENGE, NONCE_SIZE)


def encode_auth(proof: bytes) -> bytes:
    return encode_frame(FrameType.AUTH, _fixed_field(proof, MAC_SIZE, "proof"))


def decode_auth(frame: Frame) -> bytes:
    """The client's proof."""
    return _fixed(frame, FrameType.AUTH, MAC_SIZE)


def encode_welcome(proof: bytes) -> bytes:
    return encode_frame(FrameType.WELCOME, _fixed_field(proof, MAC_SIZE, "proof"))


def decode_welcome(frame: Frame) -> bytes:
    """The server's proof."""
    return _fixed(frame, FrameType.WELCOME, MAC_SIZE)


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, device: str) -> bytes:
    """What the device sends in AUTH: it knows the secret, for this connection."""
    parts = (b"pushsync-sync-2-client", _nonce(server_nonce), _nonce(client_nonce))
    return _sign(secret, b"".join(parts) + _device_bytes(device))


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes, device: str) -> bytes:
    """What the server sends in WELCOME: it knows the secret too."""
    parts = (b"pushsync-sync-2-server", _nonce(client_nonce), _nonce(server_nonce))
    return _sign(secret, b"".join(parts) + _device_bytes(device))


def verify_proof(expected: bytes, received: bytes) -> None:
    """:class:`BadSignature` unless ``received`` is ``expected`` (in constant time)."""
    if not hmac.compare_digest(expected, received):
        raise BadSignature("authentication failed")


def _nonce(nonce: bytes) -> bytes:
    return _fixed_field(nonce, NONCE_SIZE, "nonce")


def _fixed_field(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise Malformed(f"{what} must have {size} bytes")
    return value


def _fixed(frame: Frame, frame_type: FrameType, size: int) -> bytes:
    _expect(frame, frame_type)
    return _fixed_field(frame.payload, size, frame_type.name.lower())


# --------------------------------------------------------------------------- traffic


def encode_message_frame(envelope: bytes) -> bytes:
    """A MESSAGE frame; its payload is a signed message envelope, read by decode_message."""
    return encode_frame(FrameType.MESSAGE, envelope)


def encode_ack_frame(envelope: bytes) -> bytes:
    """An ACK frame; its payload is a signed ack envelope, read by decode_ack."""
    return encode_frame(FrameType.ACK, envelope)


def encode_ping(ms: int | None = None) -> bytes:
    return encode_frame(FrameType.PING, _heartbeat(ms))


def encode_pong(ms: int | None = None) -> bytes:
    """The answer to a PING; echo the PING's timestamp."""
    return encode_frame(FrameType.PONG, _heartbeat(ms))


def decode_heartbeat(frame: Frame) -> int | None:
    """The timestamp (ms) of a PING or PONG, or None if it carries none."""
    _expect(frame, FrameType.PING, FrameType.PONG)
    if not frame.payload:
        return None
    return int.from_bytes(_fixed_field(frame.payload, 8, "heartbeat"), "big")


def _heartbeat(ms: int | None) -> bytes:
    if ms is None:
        return b""
    if not 0 <= ms <= _U64_MAX:
        raise Malformed("heartbeat timestamp out of range")
    return ms.to_bytes(8, "big")


_ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{0,253}):([0-9]{1,5})")
_UNSPECIFIED: Final = frozenset({"", "0.0.0.0", "[::]"})  # noqa: S104  recognised, not bound


def encode_track(endpoint: str) -> bytes:
    """A TRACK frame: the device's UDP endpoint ``host:port`` (``[v6]:port``).

    An empty or unspecified host (``:5001``, ``0.0.0.0:5001``, ``[::]:5001``) means
    "the address this connection comes from": see :func:`tracked_address`.
    """
    return encode_frame(FrameType.TRACK, _endpoint(endpoint).encode("ascii"))


def decode_track(frame: Frame) -> str:
    _expect(frame, FrameType.TRACK)
    try:
        return _endpoint(frame.payload.decode("ascii"))
    except UnicodeDecodeError:
        raise Malformed("endpoint is not ASCII") from None


def tracked_address(endpoint: str, peer_host: str) -> str:
    """The UDP address to record for a TRACK ``endpoint`` received from ``peer_host``."""
    host, _, port = _endpoint(endpoint).rpartition(":")
    if host not in _UNSPECIFIED:
        return endpoint
    if ":" in peer_host:
        return f"[{peer_host}]:{port}"
    return f"{peer_host}:{port}"


def _endpoint(text: str) -> str:
    found = _ENDPOINT.fullmatch(text)
    if found is None or not 0 < int(found[2]) < 65536:
        raise Malformed("endpoint must be host:port")
    if found[1].startswith("["):
        try:
            ipaddress.IPv6Address(found[1][1:-1])
        except ValueError:
            raise Malformed("endpoint host is not an IPv6 address") from None
    return text


def encode_poll() -> bytes:
    """A POLL frame: from a device "anything for me?", from the server "that is all"."""
    return encode_frame(FrameType.POLL)


def decode_poll(frame: Frame) -> None:
    _expect(frame, FrameType.POLL)
    if frame.payload:
        raise Malformed("POLL carries no payload")


def encode_subscribe() -> bytes:
    """A SUBSCRIBE frame: "push my messages down this connection" (the persistent channel)."""
    return encode_frame(FrameType.SUBSCRIBE)


# --------------------------------------------------------------------------- synchronization

SYNC_FRAMES: Final = frozenset(
    {
        FrameType.SYNC_BEGIN,
        FrameType.UPLOAD,
        FrameType.UPLOADED,
        FrameType.DOWNLOAD,
        FrameType.SYNC_END,
        FrameType.SYNC_ERROR,
    }
)
"""Frames of a synchronization; their payloads are JSON objects (UTF-8), typed, with their
fields checked, by :mod:`pushsync.wire.sync`."""

MAX_JSON_DEPTH: Final = 32


def encode_json_frame(frame_type: FrameType, payload: dict[str, Any]) -> bytes:
    """A synchronization frame carrying ``payload`` as compact JSON; ``Oversized`` past 64 KiB."""
    if frame_type not in SYNC_FRAMES:
        raise Malformed(f"{frame_type.name} does not carry JSON")
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return encode_frame(frame_type, data.encode("utf-8"))


def decode_json_frame(frame: Frame, *types: FrameType) -> dict[str, Any]:
    """The JSON object of a synchronization frame of one of ``types``.

    Numbers with a fraction or exponent are returned as text (exact, as
    PostgreSQL's ``numeric`` needs); ``Malformed`` for anything but a JSON object.
    """
    _expect(frame, *types)
    try:
        text = frame.payload.decode("utf-8")
        value = json.loads(text, parse_float=str, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Malformed(f"{frame.type.name} payload is not JSON") from None
    if not isinstance(value, dict):
        raise Malformed(f"{frame.type.name} payload must be a JSON object")
    if _depth(value) > MAX_JSON_DEPTH:
        raise Malformed(f"{frame.type.name} payload nested too deeply")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth
        nested: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nested.extend(item.values())
            elif isinstance(item, list):
                nested.extend(item)
        level = nested
    return depth


KEY_REFUSED: Final = "authentication failed"
"""The BYE reason of a server that refuses the device's key (unknown device, disabled,
or a wrong secret: it does not say which). Any other BYE during the handshake is about
the server (busy, unavailable), not the key."""


def encode_bye(reason: str = "") -> bytes:
    """A BYE frame: the sender closes the connection, saying why (at most 255 bytes)."""
    return encode_frame(FrameType.BYE, _text_bytes(reason, "reason", MAX_BYE_REASON))


def decode_bye(frame: Frame) -> str:
    """The reason, possibly empty. Log it as untrusted text."""
    _expect(frame, FrameType.BYE)
    return _text_from(frame.payload, "reason", MAX_BYE_REASON)
