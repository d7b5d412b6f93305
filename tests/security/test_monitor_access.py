"""Who may see the web console (``pushsync monitor``), and what a request can make it do.

A network attacker reaching a console bound off loopback meets a bearer token
on every route, the live event stream and the static files included; a web
page elsewhere cannot reach a loopback console through DNS rebinding; and
nothing a request sends becomes SQL (docs/monitor.md, "Access").
"""

from __future__ import annotations

import ast
import ssl
import uuid
from pathlib import Path

import psycopg
import pytest
import trustme

import pushsync.monitor
from tests.support.cli import Run
from tests.support.dispatching import add_device, enqueue
from tests.support.http import EventStream, get
from tests.support.monitor import console

TOKEN = "s3cret-token-0123456789abcdef"
ROUTES = (
    "/",
    "/static/console.js",
    "/static/console.css",
    "/static/index.html",
    "/api/pulse",
    "/api/fleet",
    "/api/flow",
    "/api/latency",
    "/api/timeline",
    f"/api/request/{uuid.uuid4()}",
    "/events",
    "/nothing",
)
WRONG = {
    "none": {},
    "wrong bearer": {"Authorization": "Bearer " + TOKEN[:-1] + "x"},
    "longer bearer": {"Authorization": "Bearer " + TOKEN + "x"},
    "empty bearer": {"Authorization": "Bearer "},
    "other scheme": {"Authorization": "Basic " + TOKEN},
    "wrong cookie": {"Cookie": "pushsync_monitor=" + TOKEN[:-1] + "x"},
    "other cookie": {"Cookie": "session=" + TOKEN},
    "broken cookie": {"Cookie": 'pushsync_monitor="' + TOKEN},
}


def test_a_bind_off_loopback_without_a_token_is_refused(pushsync: Run) -> None:
    dsn = "postgresql://nobody@127.0.0.1:1/none"
    given = pushsync("monitor", "--dsn", dsn, "--listen", "0.0.0.0:0")
    from_env = pushsync("monitor", "--dsn", dsn, env={"PUSHSYNC_LISTEN": "[::]:0"})
    assert (given.returncode, from_env.returncode) == (2, 2)
    assert given.stderr == (
        "pushsync: --listen 0.0.0.0:0: 0.0.0.0 is not a loopback address; anyone who can "
        "reach it would see the fleet: give --token-file (or --tls-client-ca with --tls-cert "
        "and --tls-key)\n"
    )
    assert from_env.stderr.startswith("pushsync: --listen [::]:0: :: is not a loopback address")


def test_a_weak_or_missing_token_file_is_refused(pushsync: Run, tmp_path: Path) -> None:
    (tmp_path / "weak").write_text("password\n")
    weak = pushsync("monitor", "--listen", "0.0.0.0:0", "--token-file", "weak")
    missing = pushsync("monitor", "--listen", "0.0.0.0:0", "--token-file", "absent")
    assert (weak.returncode, missing.returncode) == (2, 2)
    assert weak.stderr == "pushsync: --token-file weak: the token must be at least 16 characters\n"
    assert missing.stderr.startswith("pushsync: --token-file: cannot read absent")
    assert "password" not in weak.stderr


@pytest.mark.asyncio
async def test_every_route_wants_the_token(db: psycopg.Connection, dsn: str) -> None:
    add_device(db, "truck-1")
    async with console(dsn, token=TOKEN) as served:
        refused = {
            (route, name): await get(served.address, route, headers)
            for route in ROUTES
            for name, headers in WRONG.items()
        }
        in_query = {route: await get(served.address, f"{route}?token={TOKEN}") for route in ROUTES}
        allowed = {
            route: await get(served.address, route, {"Authorization": f"Bearer {TOKEN}"})
            for route in ROUTES
            if route != "/events"
        }
        stream = await EventStream.open(served.address, {"Authorization": f"Bearer {TOKEN}"})
        await stream.next()
        await stream.close()
    for (route, name), answer in refused.items():
        assert (route, name, answer.status) == (route, name, 401)
        assert answer.headers["www-authenticate"] == 'Bearer realm="pushsync monitor"'
        assert answer.body == b"a valid token is required\n"
        assert "set-cookie" not in answer.headers
    # The token in the address is taken on the page alone, and only to set the cookie.
    assert {route: a.status for route, a in in_query.items()} == {
        route: 303 if route == "/" else 401 for route in ROUTES
    }
    assert {route: a.status for route, a in allowed.items()} == {
        route: 404 if route in (ROUTES[-3], "/nothing") else 200
        for route in ROUTES
        if route != "/events"
    }
    assert stream.status == 200
    assert b"truck-1" in allowed["/api/fleet"].body


@pytest.mark.asyncio
async def test_the_token_in_the_address_becomes_a_strict_http_only_cookie(dsn: str) -> None:
    async with console(dsn, token=TOKEN) as served:
        login = await get(served.address, f"/?token={TOKEN}")
        cookie = login.headers["set-cookie"]
        by_cookie = await get(served.address, "/api/pulse", {"Cookie": cookie.split(";")[0]})
        stream = await EventStream.open(served.address, {"Cookie": cookie.split(";")[0]})
        pulse = await stream.next()
        await stream.close()
    assert login.status == 303
    assert login.headers["location"] == "/"
    assert cookie == f"pushsync_monitor={TOKEN}; Path=/; HttpOnly; SameSite=Strict"
    assert login.headers["referrer-policy"] == "no-referrer"
    assert by_cookie.status == 200
    assert stream.status == 200
    assert pulse["devices"] == 0


@pytest.mark.asyncio
async def test_a_loopback_console_answers_loopback_host_names_only(dsn: str) -> None:
    async with console(dsn) as served:
        port = served.address[1]
        rebound = {
            route: await get(served.address, route, host=f"attacker.example:{port}")
            for route in ROUTES
        }
        local = [
            await get(served.address, "/api/pulse", host=host)
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost")
        ]
    assert {a.status for a in rebound.values()} == {421}
    assert all(b"devices" not in a.body for a in rebound.values())
    assert [a.status for a in local] == [200, 200, 200]


@pytest.mark.asyncio
async def test_every_answer_carries_the_content_security_policy(dsn: str) -> None:
    async with console(dsn, token=TOKEN) as served:
        answers = [
            await get(served.address, "/"),
            await get(served.address, "/", {"Authorization": f"Bearer {TOKEN}"}),
            await get(served.address, "/api/flow?window=x", {"Authorization": f"Bearer {TOKEN}"}),
            await get(served.address, "/static/console.js", {"Authorization": f"Bearer {TOKEN}"}),
        ]
    assert [a.status for a in answers] == [401, 200, 400, 200]
    for answer in answers:
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "default-src 'none'" in policy
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"


INJECTIONS = (
    "' OR '1'='1",
    "x'); DELETE FROM pushsync.devices; --",
    "%' UNION SELECT secret::text FROM pushsync.devices --",
    "\\'; DROP TABLE pushsync.outbox; --",
)


@pytest.mark.asyncio
async def test_request_parameters_are_bound_values_only(db: psycopg.Connection, dsn: str) -> None:
    add_device(db, "truck-1")
    enqueue(db, "truck-1")
    before = db.execute("SELECT count(*), md5(string_agg(secret::text, '')) FROM pushsync.devices")
    counts_before = before.fetchone()
    async with console(dsn) as served:
        answers = [
            await get(served.address, f"/api/{view}?{name}={_quoted(text)}")
            for text in INJECTIONS
            for view, name in (("fleet", "search"), ("fleet", "after"), ("timeline", "search"))
        ]
        windows = [await get(served.address, f"/api/flow?window={_quoted(t)}") for t in INJECTIONS]
    assert {a.status for a in answers} == {200}
    for answer in answers:
        body = answer.json()
        found = body.get("devices", body.get("pushes", []))
        # "after" an injection text sorts before "truck-1"... or after it; never more than it
        assert [d["device_id"] for d in found] in ([], ["truck-1"])
        assert b"\\\\x" not in answer.body
    assert {a.status for a in windows} == {400}
    after = db.execute("SELECT count(*), md5(string_agg(secret::text, '')) FROM pushsync.devices")
    assert after.fetchone() == counts_before
    assert db.execute("SELECT count(*) FROM pushsync.outbox").fetchone() == (1,)


def test_the_console_runs_named_statements_only() -> None:
    """Every ``execute`` in pushsync.monitor runs ``query(name)`` or ``query_as_json(name)``:
    a block of sql/monitor.sql (the latter inside a constant wrapper), never text composed
    from a request."""
    package = Path(pushsync.monitor.__file__).parent
    calls = []
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text("utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "execute":
                calls.append((source.name, node))
    assert calls, "the console runs no statement?"
    for name, call in calls:
        statement = call.args[0]
        assert isinstance(statement, ast.Call), name
        assert getattr(statement.func, "id", "") in ("query", "query_as_json"), name
        (argument,) = statement.args
        assert isinstance(argument, ast.Name | ast.Constant), name


def _quoted(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


@pytest.mark.asyncio
async def test_with_client_certificates_only_their_holders_get_in(dsn: str, tmp_path: Path) -> None:
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    server.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "clients-ca.pem")

    def client(issuer: trustme.CA | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        if issuer is not None:
            issuer.issue_cert("operator@example.org").configure_cert(context)
        return context

    async with console(
        dsn,
        tls_cert=str(tmp_path / "cert.pem"),
        tls_key=str(tmp_path / "key.pem"),
        tls_client_ca=str(tmp_path / "clients-ca.pem"),
    ) as served:
        assert served.url.startswith("https://")
        holder = await get(served.address, "/api/pulse", tls=client(ca), host="monitor.example")
        for context in (client(None), client(other_ca)):
            # TLS 1.3: the refusal may come at the handshake or on the first read
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await get(served.address, "/api/pulse", tls=context)
    assert holder.status == 200
    assert holder.json()["devices"] == 0
