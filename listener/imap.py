"""The IMAP channel: signed mails fetched from a mailbox over IMAP4rev1 with TLS.

:class:`ImapChannel` looks into ``channels.imap.folder`` every ``every``, takes
the unseen mails, verifies each as the maildir channel does
(:func:`~pushsync.listener.channels.message_from_mail`) and flags it seen, or
deletes it when it was rejected. Login, limits and flags are in
``docs/listener.md`` ("How the channels behave"). Only the standard library is used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import logging
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pushsync.listener.channels import MAX_MAIL, message_from_mail
from pushsync.listener.config import ImapChannel as ImapConfig
from pushsync.wire import protocol
from pushsync.wire.addresses import Address

if TYPE_CHECKING:
    from pushsync.listener.runtime import Listener

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PER_ROUND: Final = 100
"""Most mails taken in one round; the rest wait for the next."""

TIMEOUT: Final = 30.0
"""Seconds any one network operation (connect, a command's answer) may take."""

CLOSE_GRACE: Final = 1.0
"""Seconds a closing channel waits for an IMAP command before cutting the connection."""

LOGOUT_TIMEOUT: Final = 2.0
"""Seconds a closing channel waits for the answer to LOGOUT."""

MAX_PASSWORD_FILE: Final = 4096
"""Largest password file read, in bytes."""

MAX_ERROR_TEXT: Final = 200
"""Characters of a server's answer kept in a log line."""

_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_BODY = re.compile(rb"\b(BODY\[\]|RFC822)(\s|$)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class ImapError(Exception):
    """A failed round, as one line for the log; never contains the password."""


class ImapChannel:
    """Fetches signed mails from an IMAP folder every ``every``.

    One round: ``NOOP`` on the kept connection (or a new TLS login, password
    read from ``password_file`` each time), ``UID SEARCH UNSEEN``, at most
    :data:`MAX_PER_ROUND` lowest UIDs; one ``UID FETCH (RFC822.SIZE)``, then
    ``BODY.PEEK[]`` one mail at a time, skipping those over
    :data:`~pushsync.listener.channels.MAX_MAIL` (``Oversized``). Each is handed
    on with ``reply=None`` and flagged ``\\Seen``, or ``\\Seen \\Deleted`` and
    expunged (``UID EXPUNGE`` with ``UIDPLUS``) when rejected. A failed round
    is one log line; nothing raises. ``imaplib`` blocks, so every IMAP command
    runs in a worker thread (:func:`asyncio.to_thread`), one at a time;
    verifying and handling run on the event loop.
    """

    name = "imap"

    def __init__(
        self,
        listener: Listener,
        config: ImapConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        batch: int = MAX_PER_ROUND,
        timeout: float = TIMEOUT,
    ) -> None:
        """``ssl_context`` defaults to ``ssl.create_default_context()`` (the system's CAs)."""
        self.listener = listener
        self.config = config
        self.ssl_context = ssl_context
        self.batch = batch
        self.timeout = timeout
        self.rounds = 0
        """Rounds completed since start (a failed round is not counted)."""
        self.connections = 0
        """Logins since start."""
        self._conn: _Connection | None = None
        self._sock: ssl.SSLSocket | None = None
        self._uidplus = False
        self._blocking = False
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    @property
    def server(self) -> str:
        """``host:port`` (``[v6]:port``) of the IMAP server."""
        return str(Address(host=self.config.host, port=self.config.port))

    async def start(self) -> None:
        """Start looking in the background: a server that is down is retried, not fatal."""
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self._task = asyncio.create_task(self._loop(), name="pushsync imap channel")

    async def _loop(self) -> None:
        every = self.config.every.total_seconds()
        while not self._closing.is_set():
            try:
                await self.fetch_round()
            except ImapError as exc:
                self._drop()
                if self._closing.is_set():  # cut off by close()
                    logger.debug("imap: %s: %s while closing", self.server, exc)
                else:
                    logger.warning("imap: %s: %s; retrying in %gs", self.server, exc, every)
            except Exception:  # a bug must not end the channel
                self._drop()
                logger.exception("imap: %s: the round failed; retrying in %gs", self.server, every)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), every)

    async def fetch_round(self) -> int:
        """One look into the folder; how many mails were taken. Raises :class:`ImapError`."""
        uids = await self._call(self._unseen)
        sizes = await self._call(self._sizes, uids) if uids else {}
        taken = 0
        for uid in uids:
            if self._closing.is_set():
                break
            size = sizes.get(uid)
            if size is None:
                continue  # expunged meanwhile by another client
            if await self._take(uid, size):
                taken += 1
        self.rounds += 1
        if taken:
            logger.debug("imap: %d mails from %s", taken, self.server)
        return taken

    async def _take(self, uid: int, size: int) -> bool:
        """Fetch, verify, hand on and flag one mail; False if it was gone."""
        peer = f"{self.server} {self.config.folder} uid {uid}"
        data: bytes | None = None
        if size <= MAX_MAIL:
            data = await self._call(self._fetch, uid)
            if data is None:
                return False
        listener = self.listener

        def decode() -> protocol.Message:
            if data is None:
                raise protocol.Oversized(f"mail larger than {MAX_MAIL} bytes")
            return message_from_mail(data, listener.secret, listener.clock())

        msg = listener.verify(decode, channel=self.name, peer=peer)
        if msg is None:
            status = "rejected"
        else:
            status = await listener.handle(msg, reply=None, channel=self.name, peer=peer)
        if status == "deferred":
            return True  # left unseen: taken again at the next look
        await self._call(self._mark, uid, status == "rejected")
        return True

    async def close(self) -> None:
        """Stop looking; a mail being handled is finished first (the runtime bounds the wait).

        An IMAP command still waiting for the server after :data:`CLOSE_GRACE`
        seconds is cut off by shutting the connection down.
        """
        self._closing.set()
        task = self._task
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=CLOSE_GRACE)
            if pending and self._blocking:
                self._abort()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn, self._sock = self._conn, None, None
        if conn is not None:
            await asyncio.to_thread(_logout, conn)

    # ------------------------------------------------------------------ in the worker thread

    async def _call(self, blocking: Callable[..., T], *args: Any) -> T:
        """Run one blocking IMAP step in a worker thread; its failures become ImapError."""
        self._blocking = True
        try:
            return await asyncio.to_thread(self._guarded, blocking, *args)
        finally:
            self._blocking = False

    def _guarded(self, blocking: Callable[..., T], *args: Any) -> T:
        try:
            return blocking(*args)
        except ImapError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ImapError(f"certificate not accepted: {exc.verify_message}") from None
        except (imaplib.IMAP4.error, OSError, EOFError, ValueError) as exc:
            raise ImapError(_why(exc)) from None

    def _connected(self) -> _Connection:
        """The kept connection if it still answers NOOP, else a new one."""
        conn = self._conn
        if conn is not None:
            try:
                _check(conn.noop(), "NOOP")
                return conn
            except (imaplib.IMAP4.abort, OSError, EOFError) as exc:
                logger.debug("imap: %s: the kept connection failed (%s)", self.server, _why(exc))
                self._drop()
        return self._connect()

    def _connect(self) -> _Connection:
        config = self.config
        password = read_password(config.password_file)
        if not _printable(config.user):
            raise ImapError("user must be ASCII text without control characters")
        context = self.ssl_context or ssl.create_default_context()
        try:
            conn = _Connection(
                config.host,
                config.port,
                ssl_context=context,
                timeout=self.timeout,
                on_socket=self._connecting,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ImapError(f"certificate not accepted: {exc.verify_message}") from None
        except (imaplib.IMAP4.error, OSError, EOFError) as exc:
            raise ImapError(f"cannot connect: {_why(exc, password)}") from None
        self._conn = conn
        try:
            try:
                conn.login(_quote(config.user), password)
            except imaplib.IMAP4.abort as exc:
                raise ImapError(f"connection lost logging in: {_why(exc, password)}") from None
            except imaplib.IMAP4.error as exc:
                why = _why(exc, password)
                raise ImapError(f"cannot log in as {config.user!r}: {why}") from None
            except OSError as exc:
                raise ImapError(f"connection lost logging in: {_why(exc, password)}") from None
            self._uidplus = "UIDPLUS" in _capabilities(conn)
            typ, data = conn.select(mailbox_name(config.folder))
            if typ != "OK":
                raise ImapError(f"cannot select folder {config.folder!r}: {_answer(data)}")
        except BaseException:
            self._drop()
            raise
        self.connections += 1
        logger.info(
            "imap: logged in to %s as %r, folder %r", self.server, config.user, config.folder
        )
        return conn

    def _connecting(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def _unseen(self) -> list[int]:
        """The UIDs of up to ``batch`` unseen mails, lowest first."""
        conn = self._connected()
        conn.untagged_responses.clear()  # unsolicited answers a kept connection collected
        data = _check(conn.uid("SEARCH", "UNSEEN"), "UID SEARCH")
        uids: set[int] = set()
        for item in data:
            if isinstance(item, bytes):
                uids.update(int(word) for word in item.split() if word.isdigit())
        return sorted(uids)[: self.batch]

    def _sizes(self, uids: list[int]) -> dict[int, int]:
        """RFC822.SIZE of each of ``uids`` still there."""
        conn = self._ready()
        data = _check(conn.uid("FETCH", ",".join(map(str, uids)), "(RFC822.SIZE)"), "UID FETCH")
        sizes: dict[int, int] = {}
        for item in data:
            head = item[0] if isinstance(item, tuple) else item
            if not isinstance(head, bytes):
                continue
            uid, size = _UID.search(head), _SIZE.search(head)
            if uid is not None and size is not None:
                sizes[int(uid[1])] = int(size[1])
        return sizes

    def _fetch(self, uid: int) -> bytes | None:
        """The raw mail ``uid``, left unseen; None if it is gone."""
        conn = self._ready()
        data = _check(conn.uid("FETCH", str(uid), "(BODY.PEEK[])"), "UID FETCH")
        for at, item in enumerate(data):
            if not (isinstance(item, tuple) and len(item) == 2):
                continue
            head, body = item
            after = data[at + 1] if at + 1 < len(data) else b""
            rest = after if isinstance(after, bytes) else b""  # "UID n" may follow the literal
            found = _UID.search(head + b" " + rest)
            if _BODY.search(head) and found is not None and int(found[1]) == uid:
                return bytes(body)
        return None

    def _mark(self, uid: int, delete: bool) -> None:
        conn = self._ready()
        flags = r"(\Seen \Deleted)" if delete else r"(\Seen)"
        _check(conn.uid("STORE", str(uid), "+FLAGS", flags), "UID STORE")
        if delete:
            if self._uidplus:
                _check(conn.uid("EXPUNGE", str(uid)), "UID EXPUNGE")
            else:
                _check(conn.expunge(), "EXPUNGE")
            conn.untagged_responses.clear()

    def _ready(self) -> _Connection:
        if self._conn is None:
            raise ImapError("the connection was closed")
        return self._conn

    # ------------------------------------------------------------------ connection state

    def _drop(self) -> None:
        """Forget the connection after a failure (no LOGOUT: it may not answer)."""
        conn, self._conn, self._sock = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.shutdown()

    def _abort(self) -> None:
        """Shut the socket down under a blocked command, which then fails at once."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Connection(imaplib.IMAP4_SSL):
    """``IMAP4_SSL`` that shows its socket before the TLS handshake, so it can be cut off."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        timeout: float,
        on_socket: Callable[[ssl.SSLSocket], None],
    ) -> None:
        self._verify_context = ssl_context
        self._on_socket = on_socket
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> ssl.SSLSocket:
        plain: Any = imaplib.IMAP4  # its _create_socket: the TCP connection, not yet TLS
        raw: socket.socket = plain._create_socket(self, timeout)
        try:
            sock = self._verify_context.wrap_socket(
                raw, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        self._on_socket(sock)
        try:
            sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        return sock


def _logout(conn: imaplib.IMAP4) -> None:
    """LOGOUT, briefly; a server that does not answer is just left."""
    with contextlib.suppress(Exception):
        conn.sock.settimeout(LOGOUT_TIMEOUT)
        conn.logout()
    with contextlib.suppress(Exception):
        conn.shutdown()


# --------------------------------------------------------------------------- small parts


def read_password(path: Path) -> str:
    """The password in ``path``, without one trailing newline; :class:`ImapError` if unusable.

    Error texts name the file, never its content.
    """
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_PASSWORD_FILE + 1)
    except OSError as exc:
        raise ImapError(
            f"cannot read password_file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    if len(raw) > MAX_PASSWORD_FILE:
        raise ImapError(f"password_file {path} is larger than {MAX_PASSWORD_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImapError(f"password_file {path} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ImapError(f"password_file {path} is empty")
    if not _printable(text):
        raise ImapError(
            f"password_file {path}: LOGIN can send only ASCII passwords without control "
            "characters or line breaks"
        )
    return text


def mailbox_name(folder: str) -> str:
    """``folder`` as an IMAP mailbox argument: modified UTF-7 (RFC 3501 5.1.3), quoted."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            encoded = base64.b64encode("".join(run).encode("utf-16-be"))
            out.append("&" + encoded.rstrip(b"=").replace(b"/", b",").decode("ascii") + "-")
            run.clear()

    for char in folder:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return _quote("".join(out))


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _printable(text: str) -> bool:
    return all(" " <= char <= "~" for char in text)


def _check(result: tuple[str, list[Any]], what: str) -> list[Any]:
    """The data of an OK answer; :class:`ImapError` for NO (imaplib raises BAD itself)."""
    typ, data = result
    if typ != "OK":
        raise ImapError(f"{what} refused: {_answer(data)}")
    return data


def _capabilities(conn: imaplib.IMAP4) -> set[str]:
    """The capabilities as of now: many servers announce more after LOGIN."""
    typ, data = conn.capability()
    found = set(conn.capabilities)
    if typ == "OK":
        for item in data:
            if isinstance(item, bytes):
                found.update(item.decode("ascii", "replace").upper().split())
    return found


def _answer(data: list[Any]) -> str:
    """A server's answer text, as one short line."""
    last = data[-1] if data else None
    if isinstance(last, tuple):
        last = last[0]
    if isinstance(last, bytes):
        last = last.decode("utf-8", "replace")
    return _one_line("" if last is None else str(last))


def _why(exc: BaseException, password: str | None = None) -> str:
    """An exception as one short line; imaplib's bytes arguments are decoded.

    With ``password``, any copy of it (a server may echo what it got) is replaced.
    """
    parts = [
        arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg) for arg in exc.args
    ]
    text = " ".join(parts) if len(parts) == 1 else str(exc)
    if password:
        text = _scrub(text, password)
    text = _one_line(text)
    name = type(exc).__name__
    if isinstance(exc, imaplib.IMAP4.error):  # imaplib's classes are error, abort, readonly
        name = f"IMAP {name}"
    return f"{name}: {text}" if text else name


def _one_line(text: str) -> str:
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 1] + "…"
    return text


def _scrub(text: str, password: str) -> str:
    """``text`` with the password, as sent or quoted, replaced (a server may echo it)."""
    for form in sorted({password, _quote(password)[1:-1]}, key=len, reverse=True):
        text = text.replace(form, "***")
    return text
