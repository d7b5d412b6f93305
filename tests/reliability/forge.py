"""Hostile inputs for the fuzz test: random bytes and mutations of valid envelopes, mails, frames.

:class:`Forge` makes them from a seeded ``random.Random``, so a run can be
repeated with its seed. Whether an input is a valid message for the device
is not assumed from how it was made — a mutation may leave a mail's signed
parts alone — but decided by the listener's own decoders
(:func:`accepted_message`, :func:`accepted_mail`): the oracle of "no action
runs for anything unauthenticated" is the protocol reference.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import random
import struct
import time
import uuid
from email.message import EmailMessage
from typing import Any

from pushsync.listener.channels import _message_from_mail
from pushsync.wire import protocol
from pushsync.wire.protocol import FrameType

__all__ = ["Forge", "accepted_mail", "accepted_message", "raw_frame", "signed"]


def signed(secret: bytes, body: bytes) -> bytes:
    """``body`` followed by its HMAC-SHA256 under ``secret``, as envelopes are signed."""
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def raw_frame(frame_type: int, payload: bytes) -> bytes:
    """A frame of any type byte, known or not."""
    return struct.pack(">IB", 1 + len(payload), frame_type) + payload


def accepted_message(data: bytes, device: str, secret: bytes) -> uuid.UUID | None:
    """The request id if ``data`` is a valid, unexpired message envelope for ``device``."""
    try:
        msg = protocol.decode_message(data, secret, time.time())
    except protocol.ProtocolError:
        return None
    return msg.request_id if msg.device == device else None


def accepted_mail(data: bytes, device: str, secret: bytes) -> uuid.UUID | None:
    """The request id if the mail ``data`` carries a valid message for ``device``."""
    try:
        msg = _message_from_mail(data, secret, time.time())
    except protocol.ProtocolError:
        return None
    return msg.request_id if msg.device == device else None


class Forge:
    """Makes inputs for one device (``device``, ``secret``) from ``rng``."""

    def __init__(self, rng: random.Random, device: str, secret: bytes) -> None:
        self.rng = rng
        self.device = device
        self.secret = secret
        self.wrong = bytes(rng.randrange(256) for _ in range(32))

    # ------------------------------------------------------------------ pieces

    def text(self, most: int) -> str:
        """Random text: ASCII, accents, emoji, shell and SQL metacharacters."""
        alphabet = "abcXYZ019 $`'\";|&<>(){}[]\\\n\t-_.,:/*%éßü€😀\u202e"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, most)))

    def blob(self, most: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, most))

    def message(self, **changes: Any) -> protocol.Message:
        now = time.time()
        fields: dict[str, Any] = {
            "request_id": uuid.UUID(int=self.rng.getrandbits(128), version=4),
            "device": self.device,
            "subject": self.rng.choice(["sync", "job", self.text(20)]),
            "content": self.text(120),
            "sender": "pushsync",
            "priority": self.rng.choice(["low", "normal", "high"]),
            "created": round(now, 3),
            "expires": round(now + 600, 3),
        }
        fields.update(changes)
        return protocol.Message(**fields)

    def envelope(self, msg: protocol.Message | None = None, secret: bytes | None = None) -> bytes:
        return protocol.encode_message(msg or self.message(), secret or self.secret)

    def mutate(self, data: bytes) -> bytes:
        """Flip bits, cut, extend, overwrite, duplicate or splice ``data``: never the same bytes."""
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(["flip", "cut", "extend", "set", "dup", "zero", "splice", "len"])
            if kind == "flip" and out:
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
            elif kind == "cut" and out:
                del out[rng.randrange(len(out)) :]
            elif kind == "extend":
                out += rng.randbytes(rng.randint(1, 64))
            elif kind == "set" and out:
                out[rng.randrange(len(out))] = rng.randrange(256)
            elif kind == "dup" and out:
                at = rng.randrange(len(out))
                out[at:at] = out[at : at + rng.randint(1, 32)]
            elif kind == "zero" and out:
                at = rng.randrange(len(out))
                out[at : at + rng.randint(1, 8)] = bytes(min(8, len(out) - at))
            elif kind == "splice" and out:
                at = rng.randrange(len(out))
                out[at:] = self.envelope()[at:]
            elif kind == "len" and len(out) > 40:
                # A byte where lengths are (device, sender): zero, one, at or past the limits.
                out[rng.randint(37, min(len(out), 80) - 1)] = rng.choice([0, 1, 63, 64, 65, 255])
        if bytes(out) == data:
            out = out[:-1] if out else bytearray(b"\x00")
        return bytes(out)

    # ------------------------------------------------------------------ envelopes

    def hostile_envelope(self) -> bytes:
        """Bytes that are not a valid, unexpired message envelope for the device (almost
        surely: the oracle decides)."""
        rng = self.rng
        kind = rng.choice(
            [
                "random",
                "mutated",
                "mutated",
                "mutated",
                "wrong secret",
                "expired",
                "other device",
                "version",
                "oversized",
                "ack",
                "header",
                "empty",
            ]
        )
        if kind == "random":
            return self.blob(1400)
        if kind == "mutated":
            return self.mutate(self.envelope())
        if kind == "wrong secret":
            return self.envelope(secret=self.wrong)
        if kind == "expired":
            return self.envelope(self.message(created=1.0, expires=2.0))
        if kind == "other device":
            return self.envelope(self.message(device=f"{self.device}-other"))
        if kind == "version":
            data = bytearray(self.envelope())
            data[2] = rng.choice([0, 2, 9, 255])
            return signed(self.secret, bytes(data[:-32])) if rng.random() < 0.5 else bytes(data)
        if kind == "oversized":
            return self.envelope()[:40] + rng.randbytes(rng.randint(1170, 1500))
        if kind == "ack":
            ack = protocol.Ack(request_id=uuid.uuid4(), device=self.device, confirmed=time.time())
            return protocol.encode_ack(ack, self.secret)
        if kind == "header":
            return b"PS" + bytes([1, rng.choice([0x4D, 0x41, 0x00])]) + self.blob(60)
        return b""

    # ------------------------------------------------------------------ mail

    def mail(
        self,
        msg: protocol.Message,
        *,
        secret: bytes | None = None,
        subject: str | None = None,
        body: str | None = None,
        envelope: str | None = None,
    ) -> bytes:
        """The mail the SMTP gateway would send for ``msg``, with parts optionally replaced."""
        headers = protocol.email_headers(msg, secret or self.secret)
        mail = EmailMessage()
        mail["Subject"] = headers["Subject"] if subject is None else subject
        if envelope != "":
            mail[protocol.ENVELOPE_HEADER] = (
                headers[protocol.ENVELOPE_HEADER] if envelope is None else envelope
            )
        mail["From"] = "pushsync@example.com"
        mail["To"] = f"{self.device}@example.com"
        mail["Date"] = email.utils.formatdate(msg.created, usegmt=True)
        mail.set_content(msg.content if body is None else body)
        return bytes(mail)

    def hostile_mail(self) -> bytes:
        rng = self.rng
        kind = rng.choice(
            [
                "random",
                "mutated",
                "mutated",
                "subject",
                "body",
                "envelope",
                "unsigned",
                "wrong secret",
                "expired",
                "other device",
                "multipart",
                "huge",
                "headers",
            ]
        )
        msg = self.message()
        if kind == "random":
            return self.blob(3000)
        if kind == "mutated":
            return self.mutate(self.mail(msg))
        if kind == "subject":
            shown = protocol.email_headers(msg, self.secret)["Subject"]
            return self.mail(msg, subject=shown + self.rng.choice(["x", " x", "\u00e9"]))
        if kind == "body":
            return self.mail(msg, body=msg.content + self.rng.choice(["x", "\n\nP.S.", "\t"]))
        if kind == "envelope":
            text = protocol.email_headers(msg, self.secret)[protocol.ENVELOPE_HEADER]
            mutated = self.mutate(text.encode()).decode("latin-1")
            return self.mail(msg, envelope="".join(c for c in mutated if c.isprintable()))
        if kind == "unsigned":
            return self.mail(msg, envelope="")
        if kind == "wrong secret":
            return self.mail(msg, secret=self.wrong)
        if kind == "expired":
            return self.mail(self.message(created=1.0, expires=2.0))
        if kind == "other device":
            return self.mail(self.message(device=f"{self.device}-other"))
        if kind == "multipart":
            inner = self.mail(msg).decode("utf-8", errors="replace")
            return (
                "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                + inner
                + '\r\n--b\r\nContent-Type: multipart/alternative; boundary="\r\n--b--\r\n'
            ).encode()
        if kind == "huge":
            return self.mail(msg) + rng.randbytes(rng.choice([70_000, 270_000]))
        return (
            b"Subject: =?utf-8?b?" + self.blob(40).hex().encode() + b"?=\r\n"
            b"X-Pushsync-Envelope: "
            + self.blob(200).replace(b"\r", b"").replace(b"\n", b"")
            + b"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n"
            + self.blob(100)
        )

    # ------------------------------------------------------------------ frames

    def json_payload(self, depth: int = 0) -> Any:
        rng = self.rng
        choice = rng.randrange(8 if depth < 40 else 5)
        if choice == 0:
            return rng.randint(-(2**70), 2**70)
        if choice == 1:
            return self.text(30)
        if choice == 2:
            return rng.choice([None, True, False, 1.5, "NaN"])
        if choice == 3:
            return rng.random() * 10 ** rng.randint(-5, 300)
        if choice == 4:
            return ""
        if choice == 5:
            return [self.json_payload(depth + 1) for _ in range(rng.randint(0, 3))]
        keys = ["publication", "watermark", "tables", "batch", "rows", "more", "table", "x"]
        return {rng.choice(keys): self.json_payload(depth + 1) for _ in range(rng.randint(0, 4))}

    def json_object(self) -> bytes:
        """A JSON object of random fields, nested at most a few levels."""
        keys = ["publication", "watermark", "tables", "batch", "rows", "more", "x"]
        fields = {
            self.rng.choice(keys): self.json_payload(depth=36)
            for _ in range(self.rng.randint(0, 4))
        }
        return json.dumps(fields).encode()

    def json_frame(self, types: list[FrameType]) -> bytes:
        frame_type = self.rng.choice(types)
        if frame_type == FrameType.SYNC_BEGIN:
            # Only objects: a malformed SYNC_BEGIN hits the bug of
            # test_fuzz_volume.test_malformed_sync_begin_is_refused_in_one_line.
            return protocol.encode_frame(frame_type, self.json_object())
        kind = self.rng.choice(["json", "deep", "bytes"])
        if kind == "json":
            payload = json.dumps(self.json_payload()).encode()
        elif kind == "deep":
            depth = self.rng.randint(20, 200)
            payload = ("[" * depth + "]" * depth).encode()
        else:
            payload = self.blob(200)
        return protocol.encode_frame(frame_type, payload[:65535])

    def heartbeat(self) -> bytes:
        """A PING or PONG, with an empty or an 8-byte payload (both valid)."""
        frame_type = self.rng.choice([FrameType.PING, FrameType.PONG])
        payload = b"" if self.rng.random() < 0.3 else struct.pack(">Q", self.rng.getrandbits(48))
        return protocol.encode_frame(frame_type, payload)

    def server_frame(self) -> bytes:
        """A frame a SYNC server might send after WELCOME that leaves the connection up."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.8:
            return protocol.encode_message_frame(self.hostile_envelope())
        if kind < 0.9:
            return self.heartbeat()
        if kind < 0.93:
            return protocol.encode_poll()
        return self.json_frame(
            [
                FrameType.UPLOADED,
                FrameType.DOWNLOAD,
                FrameType.SYNC_END,
                FrameType.SYNC_ERROR,
            ]
        )

    def breaking_stream(self) -> bytes:
        """Bytes after which a receiver may well close the connection (or wait for more)."""
        rng = self.rng
        kind = rng.choice(["random", "mutated", "type", "length", "bye", "wrong way", "heartbeat"])
        if kind == "random":
            return self.blob(300) or b"\x00"
        if kind == "mutated":
            return self.mutate(protocol.encode_message_frame(self.envelope()))
        if kind == "type":
            return raw_frame(rng.choice([0x00, 0x05, 0x15, 0x7F, 0xFF]), self.blob(10))
        if kind == "length":
            return struct.pack(">I", rng.choice([0, 65537, 2**31, 2**32 - 1])) + b"\x10"
        if kind == "bye":
            return protocol.encode_bye(self.text(40)[:80])
        if kind == "wrong way":
            return protocol.encode_frame(
                rng.choice([FrameType.HELLO, FrameType.AUTH, FrameType.ACK, FrameType.TRACK]),
                self.blob(40),
            )
        return protocol.encode_frame(FrameType.PING, self.blob(7) + b"\x00\x00")

    def client_stream(self, devices: list[str], ghosts: int = 500) -> bytes:
        """What an unauthenticated client might send first to a SYNC server (device names
        that do not exist are drawn from ``ghosts`` of them)."""
        rng = self.rng
        kind = rng.choice(["random", "frames", "mutated hello", "forged auth", "unknown device"])
        if kind == "random":
            return self.blob(600) or b"\x01"
        if kind == "frames":
            return b"".join(
                protocol.encode_frame(rng.choice(list(FrameType)), self.blob(80))
                for _ in range(rng.randint(1, 4))
            )
        device = rng.choice(devices)
        hello = protocol.encode_hello(protocol.Hello(device=device, nonce=protocol.new_nonce()))
        if kind == "mutated hello":
            return self.mutate(hello)
        if kind == "unknown device":
            name = f"ghost-{rng.randrange(ghosts)}"
            hello = protocol.encode_hello(protocol.Hello(device=name, nonce=protocol.new_nonce()))
        return hello + protocol.encode_auth(rng.randbytes(32))

    def device_frame(self, acks: list[bytes]) -> bytes:
        """A frame an authenticated device might send: mostly forged or broken acks."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.55:
            return protocol.encode_ack_frame(rng.choice(acks))
        if kind < 0.65:
            return self.heartbeat()
        if kind < 0.75:  # any endpoint: an authenticated device may name one (manual wins)
            hosts = ["", "0.0.0.0", "[::]", "127.0.0.1", "evil.invalid", "[::1]"]  # noqa: S104  frame data
            host = rng.choice(hosts)
            return protocol.encode_track(f"{host}:{rng.randint(1, 65535)}")
        return self.json_frame([FrameType.SYNC_BEGIN, FrameType.UPLOAD, FrameType.DOWNLOAD])
