"""The listener's IMAP channel against a small IMAP4rev1 server over real TLS.

The server below speaks what ``imaplib`` and the channel send — CAPABILITY,
LOGIN, SELECT, UID SEARCH UNSEEN, UID FETCH (RFC822.SIZE, RFC822, BODY[],
BODY.PEEK[]), UID STORE +FLAGS, EXPUNGE, UID EXPUNGE (with UIDPLUS), NOOP and
LOGOUT — with tagged and untagged answers and literals, on 127.0.0.1 with a
certificate from a test CA (trustme). Mails are built by the dispatcher's SMTP
gateway; the listener's action is a real program that appends one JSON line
per run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from pushsync.dispatcher.gateways import SmtpGateway
from pushsync.dispatcher.outbox import Claimed
from pushsync.listener.channels import MAX_MAIL
from pushsync.listener.config import ImapChannel as ImapConfig
from pushsync.listener.config import load_config
from pushsync.listener.imap import ImapChannel, ImapError, mailbox_name, read_password
from pushsync.listener.runtime import Listener
from tests.support.keys import write_key
from tests.support.waiting import until_async

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
DEVICE = "truck-1"
USER = "truck-1@example.org"
PASSWORD = 'Pa55-"quoted"\\-word'
WRONG = "not-the-Pa55word-9f3c"
FOLDER = "INBOX"
WAIT = 10.0

SCRIPT = """\
import json, pathlib, sys
out = pathlib.Path(__file__).with_name("runs.jsonl")
with out.open("a", encoding="utf-8") as f:
    f.write(json.dumps({"request_id": sys.argv[1], "content": sys.argv[2]}) + "\\n")
"""


# --------------------------------------------------------------------------- the IMAP server


@dataclass
class Mail:
    uid: int
    data: bytes
    flags: set[str] = field(default_factory=set)


def tokens(text: str) -> list[str]:
    """IMAP arguments: atoms, quoted strings (unescaped) and parenthesised lists (as written)."""
    out: list[str] = []
    at = 0
    while at < len(text):
        char = text[at]
        if char == " ":
            at += 1
        elif char == '"':
            end, chars = at + 1, []
            while text[end] != '"':
                if text[end] == "\\":
                    end += 1
                chars.append(text[end])
                end += 1
            out.append("".join(chars))
            at = end + 1
        elif char == "(":
            depth, end = 0, at
            while True:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
                end += 1
            out.append(text[at : end + 1])
            at = end + 1
        else:
            end = text.find(" ", at)
            end = len(text) if end < 0 else end
            out.append(text[at:end])
            at = end
    return out


class ImapServer:
    """One mailbox, ``FOLDER``, for ``USER``; records what clients did."""

    def __init__(
        self,
        tls: ssl.SSLContext,
        *,
        password: str = PASSWORD,
        uidplus: bool = True,
        echo_password: bool = False,
    ) -> None:
        self.tls = tls
        self.password = password
        self.uidplus = uidplus
        self.echo_password = echo_password
        """Answer a failed LOGIN with the password it got (as a careless server might)."""
        self.stall = False
        """Accept connections but never greet."""
        self.mails: list[Mail] = []
        self.next_uid = 1
        self.commands: list[str] = []
        """Every command, LOGIN's arguments left out."""
        self.body_fetches: list[int] = []
        self.sessions = 0
        self.logins = 0
        self.failed_logins = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def add(self, data: bytes, *flags: str) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.mails.append(Mail(uid, data, set(flags)))
        return uid

    def flags(self, uid: int) -> set[str] | None:
        """The flags of mail ``uid``; None once it is expunged."""
        return next((m.flags for m in self.mails if m.uid == uid), None)

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.drop_connections()
        if server is not None:
            await server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.sessions += 1
        try:
            if self.stall:
                await reader.read()
                return
            await _Session(self, writer).serve(reader)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


class _Session:
    def __init__(self, server: ImapServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.logged_in = False
        self.selected = False

    def send(self, line: str | bytes) -> None:
        self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

    async def serve(self, reader: asyncio.StreamReader) -> None:
        self.send("* OK pushsync test IMAP server ready")
        while line := await reader.readline():
            tag, _, rest = line.decode("ascii").rstrip("\r\n").partition(" ")
            command, _, args = rest.partition(" ")
            command = command.upper()
            if command == "UID":
                sub, _, args = args.partition(" ")
                command = f"UID {sub.upper()}"
            self.server.commands.append(
                command if command == "LOGIN" else f"{command} {args}".rstrip()
            )
            if not self.answer(tag, command, args):
                await self.writer.drain()
                return
            await self.writer.drain()

    def answer(self, tag: str, command: str, args: str) -> bool:
        """Answer one command; False to end the session."""
        server = self.server
        selected_only = {"UID SEARCH", "UID FETCH", "UID STORE", "UID EXPUNGE", "EXPUNGE"}
        if command == "CAPABILITY":
            self.send("* CAPABILITY IMAP4rev1" + (" UIDPLUS" if server.uidplus else ""))
        elif command == "NOOP":
            pass
        elif command == "LOGOUT":
            self.send("* BYE logging out")
            self.send(f"{tag} OK LOGOUT completed")
            return False
        elif command == "LOGIN" and not self.logged_in:
            user, password = tokens(args)
            if user == USER and password == server.password:
                server.logins += 1
                self.logged_in = True
            else:
                server.failed_logins += 1
                echo = f" ({password} is wrong)" if server.echo_password else ""
                self.send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials{echo}")
                return True
        elif command == "SELECT" and self.logged_in:
            if tokens(args) != [FOLDER]:
                self.send(f"{tag} NO [NONEXISTENT] Unknown mailbox")
                return True
            self.selected = True
            self.send(f"* {len(server.mails)} EXISTS")
            self.send("* 0 RECENT")
            self.send(r"* FLAGS (\Seen \Deleted)")
            self.send("* OK [UIDVALIDITY 1] UIDs valid")
            self.send(f"* OK [UIDNEXT {server.next_uid}] Predicted next UID")
            self.send(f"{tag} OK [READ-WRITE] SELECT completed")
            return True
        elif command in selected_only and not self.selected:
            self.send(f"{tag} BAD No mailbox selected")
            return True
        elif command == "UID SEARCH" and args.upper() == "UNSEEN":
            unseen = [str(m.uid) for m in server.mails if "\\Seen" not in m.flags]
            self.send(" ".join(["* SEARCH", *unseen]))
        elif command == "UID FETCH":
            which, items = tokens(args)
            if not self.fetch(self.uids(which), items.strip("()").upper().split()):
                self.send(f"{tag} BAD Unknown FETCH item")
                return True
        elif command == "UID STORE":
            which, how, flags = tokens(args)
            if how.upper() not in ("+FLAGS", "+FLAGS.SILENT"):
                self.send(f"{tag} BAD Only +FLAGS here")
                return True
            for seq, mail in self.chosen(self.uids(which)):
                mail.flags.update(flags.strip("()").split())
                if how.upper() == "+FLAGS":
                    self.send(f"* {seq} FETCH (UID {mail.uid} FLAGS ({' '.join(mail.flags)}))")
        elif command == "EXPUNGE":
            self.expunge(lambda mail: True)
        elif command == "UID EXPUNGE" and server.uidplus:
            chosen = self.uids(args)
            self.expunge(lambda mail: mail.uid in chosen)
        else:
            self.send(f"{tag} BAD Unknown or misplaced command")
            return True
        self.send(f"{tag} OK {command} completed")
        return True

    def uids(self, text: str) -> set[int]:
        """A UID set: ``3``, ``1,4``, ``2:5``, ``7:*``."""
        last = max((m.uid for m in self.server.mails), default=0)
        found: set[int] = set()
        for part in text.split(","):
            low, _, high = part.partition(":")
            start = last if low == "*" else int(low)
            end = start if not high else (last if high == "*" else int(high))
            found.update(range(min(start, end), max(start, end) + 1))
        return found

    def chosen(self, uids: set[int]) -> Iterator[tuple[int, Mail]]:
        for seq, mail in enumerate(self.server.mails, start=1):
            if mail.uid in uids:
                yield seq, mail

    def fetch(self, uids: set[int], items: list[str]) -> bool:
        if not set(items) <= {"RFC822.SIZE", "RFC822", "BODY[]", "BODY.PEEK[]", "FLAGS", "UID"}:
            return False
        for seq, mail in self.chosen(uids):
            parts = [b"UID %d" % mail.uid]
            for item in items:
                if item == "RFC822.SIZE":
                    parts.append(b"RFC822.SIZE %d" % len(mail.data))
                elif item == "FLAGS":
                    parts.append(f"FLAGS ({' '.join(mail.flags)})".encode())
                elif item in ("RFC822", "BODY[]", "BODY.PEEK[]"):
                    self.server.body_fetches.append(mail.uid)
                    if item != "BODY.PEEK[]":
                        mail.flags.add("\\Seen")
                    label = b"RFC822" if item == "RFC822" else b"BODY[]"
                    parts.append(b"%s {%d}\r\n%s" % (label, len(mail.data), mail.data))
            self.send(b"* %d FETCH (%s)" % (seq, b" ".join(parts)))
        return True

    def expunge(self, chosen: Callable[[Mail], bool]) -> None:
        mails = self.server.mails
        at = 0
        while at < len(mails):
            if "\\Deleted" in mails[at].flags and chosen(mails[at]):
                del mails[at]
                self.send(f"* {at + 1} EXPUNGE")
            else:
                at += 1


# --------------------------------------------------------------------------- fixtures


@dataclass
class Tls:
    ca: trustme.CA
    ca_file: Path
    server: ssl.SSLContext

    def client(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Tls(ca=ca, ca_file=ca_file, server=server)


@pytest.fixture
def trusted(tls: Tls, monkeypatch: pytest.MonkeyPatch) -> Tls:
    """``ssl.create_default_context()`` trusts the test CA, as a system store would."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    return tls


@asynccontextmanager
async def imap_server(tls: Tls, **options: Any) -> AsyncIterator[ImapServer]:
    server = ImapServer(tls.server, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def write_config(
    directory: Path, port: int, *, password: str = PASSWORD, every: str = "100ms"
) -> Path:
    script = directory / "record.py"
    script.write_text(SCRIPT, encoding="utf-8")
    write_key(directory / "truck-1.key", SECRET)
    (directory / "imap.pw").write_text(password + "\n", encoding="ascii")
    argv = [sys.executable, str(script), "$request_id", "$content"]
    path = directory / "listener.yaml"
    path.write_text(
        f"""\
device: {DEVICE}
secret_file: truck-1.key
state_dir: state
channels:
  imap:
    host: 127.0.0.1
    port: {port}
    user: {USER}
    password_file: imap.pw
    every: {every}
handlers:
  - name: record
    subject: sync
    action: {{run: {json.dumps(argv)}, timeout: 10s}}
""",
        encoding="utf-8",
    )
    return path


@asynccontextmanager
async def listening(config_path: Path) -> AsyncIterator[Listener]:
    listener = Listener(load_config(config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    started = asyncio.create_task(listener.started.wait())
    await asyncio.wait({task, started}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        task.result()  # raise what went wrong
    assert listener.started.is_set()
    try:
        yield listener
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


def runs(directory: Path) -> list[dict[str, Any]]:
    out = directory / "runs.jsonl"
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def claimed(**changes: Any) -> Claimed:
    now = datetime.now(UTC)
    item = Claimed(
        request_id=uuid.uuid4(),
        rule="route_disruption",
        device_id=DEVICE,
        subject="sync",
        content="route 7 closed at Main St",
        priority="normal",
        gateway="smtp",
        created_at=now,
        expires_at=now + timedelta(hours=1),
        attempts=1,
        secret=SECRET,
        udp_address=None,
        email_address=USER,
    )
    return replace(item, **changes)


def mail(item: Claimed) -> bytes:
    gateway = SmtpGateway(host="smtp.invalid", sender_address="pushsync@example.org")
    return gateway.build_email(item).as_bytes()


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.name == "pushsync.listener.imap"
        and r.levelno == logging.WARNING
        and text in r.getMessage()
    )


# --------------------------------------------------------------------------- tests


@pytest.mark.asyncio
@pytest.mark.parametrize("uidplus", [True, False], ids=["uidplus", "plain-expunge"])
async def test_signed_mail_runs_once_a_copy_is_a_duplicate_and_forged_mail_is_expunged(
    trusted: Tls, tmp_path: Path, uidplus: bool
) -> None:
    async with imap_server(trusted, uidplus=uidplus) as server:
        old = server.add(mail(claimed()), "\\Seen")  # read before: not touched
        trashed = server.add(b"Subject: x\r\n\r\ndeleted by someone\r\n", "\\Seen", "\\Deleted")
        async with listening(write_config(tmp_path, server.port)) as listener:
            item = claimed()
            first = server.add(mail(item))
            await until_async(lambda: "\\Seen" in (server.flags(first) or ()))
            assert runs(tmp_path) == [
                {"request_id": str(item.request_id), "content": "route 7 closed at Main St"}
            ]
            assert listener.counters.handled == 1

            again = server.add(mail(item))
            await until_async(lambda: "\\Seen" in (server.flags(again) or ()))
            assert listener.counters.duplicates == 1
            assert len(runs(tmp_path)) == 1

            forged = server.add(mail(claimed(secret=OTHER)))
            await until_async(lambda: server.flags(forged) is None)
            assert listener.counters.rejected["BadSignature"] == 1
            assert len(runs(tmp_path)) == 1
            assert server.flags(first) == {"\\Seen"}
            assert old not in server.body_fetches
            assert listener.counters.acks_sent == 0  # email has no way back

        if uidplus:  # only the forged mail was expunged
            assert f"UID EXPUNGE {forged}" in server.commands
            assert server.flags(trashed) == {"\\Seen", "\\Deleted"}
        else:  # the folder's EXPUNGE takes every mail flagged \Deleted
            assert "EXPUNGE" in server.commands
            assert server.flags(trashed) is None
        assert server.logins == 1  # one connection, kept between rounds
        assert server.commands[-1] == "LOGOUT"


@pytest.mark.asyncio
async def test_an_oversized_mail_is_not_downloaded_and_is_deleted(
    trusted: Tls, tmp_path: Path
) -> None:
    async with imap_server(trusted) as server:
        big = server.add(mail(claimed()) + b"x" * MAX_MAIL)
        junk = server.add(b"\x00\xffnot a mail at all")
        good_item = claimed()
        good = server.add(mail(good_item))
        async with listening(write_config(tmp_path, server.port)) as listener:
            await until_async(lambda: "\\Seen" in (server.flags(good) or ()))
            await until_async(lambda: server.flags(big) is None and server.flags(junk) is None)
            assert big not in server.body_fetches
            assert listener.counters.rejected["Oversized"] == 1
            assert listener.counters.rejected["BadSignature"] == 1
            assert [r["request_id"] for r in runs(tmp_path)] == [str(good_item.request_id)]


@pytest.mark.asyncio
async def test_a_wrong_password_is_logged_without_it_and_retried(
    trusted: Tls, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with imap_server(trusted, echo_password=True) as server:
        item = claimed()
        uid = server.add(mail(item))
        config_path = write_config(tmp_path, server.port, password=WRONG)
        async with listening(config_path) as listener:
            await until_async(lambda: server.failed_logins >= 3)
            assert warnings_about(caplog, f"cannot log in as '{USER}'") >= 2
            assert "AUTHENTICATIONFAILED" in caplog.text
            assert runs(tmp_path) == []
            assert listener.started.is_set()

            # The password file is read at each login: fixing it is enough.
            (tmp_path / "imap.pw").write_text(PASSWORD + "\n", encoding="ascii")
            await until_async(lambda: "\\Seen" in (server.flags(uid) or ()))
            assert [r["request_id"] for r in runs(tmp_path)] == [str(item.request_id)]
    assert server.logins == 1
    for secret in (WRONG, PASSWORD, PASSWORD.replace('"', '\\"')):
        assert secret not in caplog.text
    assert "***" in caplog.text  # the echoed password was scrubbed


@pytest.mark.asyncio
async def test_a_server_that_is_down_is_retried_and_a_dropped_connection_reopened(
    trusted: Tls, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = ImapServer(trusted.server)
    await server.start()
    port = server.port
    await server.stop()  # nothing listens on the port now
    async with listening(write_config(tmp_path, port)) as listener:
        await until_async(lambda: warnings_about(caplog, "cannot connect") >= 2)
        assert listener.started.is_set()

        await server.start(port)
        try:
            first = claimed()
            uid = server.add(mail(first))
            await until_async(lambda: "\\Seen" in (server.flags(uid) or ()))
            assert server.logins == 1

            server.drop_connections()  # the kept connection dies between rounds
            second = claimed()
            uid = server.add(mail(second))
            await until_async(lambda: "\\Seen" in (server.flags(uid) or ()))
            assert server.logins == 2
            assert [r["request_id"] for r in runs(tmp_path)] == [
                str(first.request_id),
                str(second.request_id),
            ]
        finally:
            await server.stop()


@pytest.mark.asyncio
async def test_the_certificate_is_verified_and_ssl_context_can_trust_another_ca(
    tls: Tls, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with imap_server(tls) as server:
        item = claimed()
        uid = server.add(mail(item))
        # The listener's own channel uses the system's CAs, which do not know the test CA.
        async with listening(write_config(tmp_path, server.port)) as listener:
            await until_async(lambda: warnings_about(caplog, "certificate not accepted") >= 2)
            assert server.logins == 0
            assert server.flags(uid) == set()

            own = listener.channel(ImapChannel)
            trusting = ImapChannel(listener, own.config, ssl_context=tls.client())
            await trusting.start()
            try:
                await until_async(lambda: "\\Seen" in (server.flags(uid) or ()))
            finally:
                await trusting.close()
            assert server.logins == 1
            assert [r["request_id"] for r in runs(tmp_path)] == [str(item.request_id)]


@pytest.mark.asyncio
async def test_a_round_takes_at_most_batch_mails(trusted: Tls, tmp_path: Path) -> None:
    async with imap_server(trusted) as server:
        items = [claimed() for _ in range(5)]
        for item in items:
            server.add(mail(item))
        config_path = write_config(tmp_path, server.port, every="1h")
        async with listening(config_path) as listener:
            own = listener.channel(ImapChannel)
            await until_async(lambda: own.rounds == 1)
            assert len(runs(tmp_path)) == 5  # all five in its first round; the next is in 1h

            channel = ImapChannel(listener, own.config, batch=2, ssl_context=trusted.client())
            for item in items:
                server.add(mail(replace(item, request_id=uuid.uuid4())))
            try:
                assert [await channel.fetch_round() for _ in range(4)] == [2, 2, 1, 0]
            finally:
                await channel.close()
            assert len(runs(tmp_path)) == 10
        sizes = [c for c in server.commands if c.startswith("UID FETCH") and "RFC822.SIZE" in c]
        assert sizes[0] == "UID FETCH 1,2,3,4,5 (RFC822.SIZE)"
        assert sizes[1:] == [
            "UID FETCH 6,7 (RFC822.SIZE)",
            "UID FETCH 8,9 (RFC822.SIZE)",
            "UID FETCH 10 (RFC822.SIZE)",
        ]


@pytest.mark.asyncio
async def test_close_cuts_off_a_server_that_does_not_answer(trusted: Tls, tmp_path: Path) -> None:
    async with imap_server(trusted) as server:
        server.stall = True
        async with listening(write_config(tmp_path, server.port)):
            await until_async(lambda: server.sessions == 1)
            started = time.monotonic()
        assert time.monotonic() - started < 5.0  # not the 30 s network timeout


@pytest.mark.asyncio
async def test_config_starts_an_imap_channel_in_a_real_listener(
    trusted: Tls, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config_path = write_config(tmp_path, 993, every="45s")
    async with listening(config_path) as listener:
        channel = listener.channel(ImapChannel)
        assert channel.config == ImapConfig(
            host="127.0.0.1",
            port=993,
            user=USER,
            password_file=tmp_path / "imap.pw",
            folder="INBOX",
            every=timedelta(seconds=45),
        )
        context = channel.ssl_context
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert [c.name for c in listener.channels] == ["imap"]
    assert (
        f"listening as {DEVICE} on imap 127.0.0.1:993 folder 'INBOX' as '{USER}' every 0:00:45"
        in caplog.text
    )
    assert "not available" not in caplog.text


# --------------------------------------------------------------------------- small parts


def test_the_password_file_loses_one_trailing_newline_and_errors_never_show_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pw"
    for written, read in [
        ("secret\n", "secret"),
        ("secret\r\n", "secret"),
        ("secret", "secret"),
        ("secret \n\n", "secret \n"),  # refused below: a line break inside
    ]:
        path.write_text(written, encoding="utf-8", newline="")
        if "\n" in read:
            with pytest.raises(ImapError, match="line breaks") as caught:
                read_password(path)
            assert "secret" not in str(caught.value).replace(str(path), "")
        else:
            assert read_password(path) == read
    for written, error in [
        ("\n", "is empty"),
        ("geheimnis-ä\n", "only ASCII"),
        ("tab\there\n", "control characters"),
    ]:
        path.write_text(written, encoding="utf-8")
        with pytest.raises(ImapError, match=error) as caught:
            read_password(path)
        shown = str(caught.value).replace(str(path), "")
        assert "geheimnis" not in shown
        assert "tab" not in shown
    path.write_bytes(b"\xff\xfe-latin-1\n")
    with pytest.raises(ImapError, match="not UTF-8 text"):
        read_password(path)
    with pytest.raises(ImapError, match=r"cannot read password_file .*missing"):
        read_password(tmp_path / "missing")


def test_mailbox_names_are_quoted_and_in_modified_utf7() -> None:
    assert mailbox_name("INBOX") == '"INBOX"'
    assert mailbox_name("Push sync") == '"Push sync"'
    assert mailbox_name('a"b\\c') == '"a\\"b\\\\c"'
    assert mailbox_name("Entwürfe") == '"Entw&APw-rfe"'
    assert mailbox_name("R&D") == '"R&-D"'
    assert mailbox_name("台北") == '"&U,BTFw-"'


def test_the_test_server_tokenizer() -> None:
    assert tokens('"a \\"b\\"" atom (X Y) BODY.PEEK[]') == ['a "b"', "atom", "(X Y)", "BODY.PEEK[]"]


def test_closing_a_channel_that_never_started_is_quiet() -> None:
    async def main() -> None:
        listener: Any = object()
        config = ImapConfig(host="127.0.0.1", user=USER, password_file=Path("pw"))
        channel = ImapChannel(listener, config)
        await channel.close()
        assert channel.server == "127.0.0.1:993"

    asyncio.run(main())
