"""The console's access decisions (pushsync.monitor.access) and the checks of its settings."""

from __future__ import annotations

import pytest

from pushsync.monitor.access import Policy, Verdict, check_token, host_of, is_loopback, same_token
from pushsync.monitor.server import MonitorSettings, exposure_problem

TOKEN = "0123456789abcdef-token"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),  # noqa: S104  the address under test, not a bind
        ("::", False),
        ("192.0.2.1", False),
        ("localhost.attacker.example", False),
        ("127.0.0.1.nip.io", False),
        ("", False),
    ],
)
def test_loopback_is_an_address_or_the_name_localhost(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("header", "host"),
    [("localhost:8439", "localhost"), ("[::1]:8439", "[::1]"), ("[::1]", "[::1]"),
     ("example.org", "example.org")],
)  # fmt: skip
def test_the_host_of_a_host_header(header: str, host: str) -> None:
    assert host_of(header) == host


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:0", "[::]:0", "192.0.2.1:8439", "monitor.example:8439"]
)
def test_off_loopback_needs_a_token_or_client_certificates(listen: str) -> None:
    bare = MonitorSettings(dsn="", listen=listen)
    problem = exposure_problem(bare)
    assert problem is not None
    assert problem.startswith(f"--listen {listen}: ")
    assert exposure_problem(MonitorSettings(dsn="", listen=listen, token=TOKEN)) is None
    with_certs = MonitorSettings(
        dsn="", listen=listen, tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem"
    )
    assert exposure_problem(with_certs) is None


def test_tls_options_go_together() -> None:
    assert exposure_problem(MonitorSettings(dsn="", tls_cert="c.pem")) == (
        "--tls-cert and --tls-key go together"
    )
    assert exposure_problem(MonitorSettings(dsn="", tls_client_ca="ca.pem")) == (
        "--tls-client-ca needs --tls-cert and --tls-key"
    )
    assert exposure_problem(MonitorSettings(dsn="", listen="localhost")) == (
        "--listen: bad address 'localhost': expected HOST:PORT (IPv6 as [::1]:2439), "
        "port 0 to 65535"
    )


@pytest.mark.parametrize(
    "text", ["", "short", "  fifteen-chars  ", "has space inside!!", "semi;colon-token-x"]
)
def test_weak_or_unsendable_tokens_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="the token must"):
        check_token(text)


def test_a_token_is_compared_whole() -> None:
    assert check_token(f"  {TOKEN}\n") == TOKEN
    assert same_token(TOKEN, TOKEN)
    assert not same_token(TOKEN[:-1], TOKEN)
    assert not same_token(TOKEN + "x", TOKEN)
    assert not same_token("", TOKEN)


def decide(policy: Policy, **given: str | None) -> Verdict:
    request: dict[str, str | None] = {
        "method": "GET", "path": "/api/fleet", "host": "127.0.0.1:8439",
        "authorization": None, "cookie": None, "query_token": None,
    }  # fmt: skip
    request.update(given)
    return policy.decide(**request)  # type: ignore[arg-type]


def test_the_policy_with_a_token() -> None:
    policy = Policy(token=TOKEN)
    assert decide(policy) is Verdict.DENY
    assert decide(policy, authorization=f"Bearer {TOKEN}") is Verdict.ALLOW
    assert decide(policy, authorization=f"bearer  {TOKEN} ") is Verdict.ALLOW
    assert decide(policy, authorization=f"Basic {TOKEN}") is Verdict.DENY
    # a wrong header is not rescued by a right cookie: one credential, judged
    wrong_header = decide(policy, authorization="Bearer x", cookie=f"pushsync_monitor={TOKEN}")
    assert wrong_header is Verdict.DENY
    assert decide(policy, cookie=f"a=b; pushsync_monitor={TOKEN}") is Verdict.ALLOW
    assert decide(policy, query_token=TOKEN) is Verdict.DENY
    assert decide(policy, path="/", query_token=TOKEN) is Verdict.LOGIN
    assert decide(policy, path="/", query_token="nope") is Verdict.DENY
    assert decide(policy, host="attacker.example", authorization=f"Bearer {TOKEN}") is (
        Verdict.ALLOW
    )


def test_the_policy_without_a_token() -> None:
    assert decide(Policy(token=None)) is Verdict.ALLOW
    assert decide(Policy(token=None), host="attacker.example:8439") is Verdict.WRONG_HOST
    assert decide(Policy(token=None, client_certs=True), host="monitor.example") is Verdict.ALLOW


def test_the_login_cookie() -> None:
    assert Policy(token=TOKEN).cookie_header(secure=True) == (
        f"pushsync_monitor={TOKEN}; Path=/; HttpOnly; SameSite=Strict; Secure"
    )
