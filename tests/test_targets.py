"""Targets from the config file: defaults, strict checks, secrets that never show, TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trustme

from exporter.cli import main
from exporter.client import StatsClient
from exporter.config import Config, load_config
from exporter.errors import ConfigError, FetchError
from exporter.targets import TLS, Secret, Target

REPO = Path(__file__).resolve().parent.parent
#: Distinctive enough that finding it anywhere means it leaked.
SECRET = "s3cr3t-Kum9uat-b4nana"


def load(
    tmp_path: Path,
    text: str,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Config:
    file = tmp_path / "config.yml"
    file.write_text(text)
    return load_config({"config.file": str(file), **(flags or {})}, environ or {})


def refused(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


def one_target(extra: str = "", name: str = "prod") -> str:
    return f"targets:\n  - name: {name}\n    url: http://api.test/stats\n{extra}"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


# Defaults, overrides and the default target


def test_targets_take_the_api_settings_as_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "api:\n  timeout: 3s\n  max_body_size: 2KiB\n  min_interval: 30s\n"
        "targets:\n  - name: a\n    url: http://a.test/stats\n",
    )
    (target,) = config.targets
    assert (target.timeout, target.max_body_size, target.min_interval) == (3.0, 2048, 30.0)


def test_api_defaults_from_the_environment_reach_the_targets(tmp_path: Path) -> None:
    config = load(
        tmp_path, one_target(), {"JOBSTATS_API_TIMEOUT": "7s", "JOBSTATS_API_MIN_INTERVAL": "5s"}
    )
    assert (config.targets[0].timeout, config.targets[0].min_interval) == (7.0, 5.0)


def test_a_target_overrides_the_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "api:\n  timeout: 3s\n  min_interval: 30s\ntargets:\n"
        "  - name: a\n    url: http://a.test/stats\n"
        "  - name: b\n    url: https://b.test/stats\n    timeout: 500ms\n"
        "    max_body_size: 1MiB\n    min_interval: 0\n",
    )
    a, b = config.targets
    assert (a.timeout, a.min_interval) == (3.0, 30.0)
    assert (b.name, b.url) == ("b", "https://b.test/stats")
    assert (b.timeout, b.max_body_size, b.min_interval) == (0.5, 1024 * 1024, 0.0)


def test_without_api_min_interval_a_target_fetches_every_scrape(tmp_path: Path) -> None:
    assert load(tmp_path, one_target()).targets[0].min_interval == 0.0


def test_the_first_target_is_the_one_metrics_serves(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "targets:\n  - name: zeta\n    url: http://z.test/\n  - name: alpha\n    url: http://a.test/\n",
    )
    assert [t.name for t in config.targets] == ["zeta", "alpha"]


def test_without_targets_one_default_target_is_made_of_the_api_settings(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(f"{SECRET}\n")
    config = load_config(
        {"api.url": "http://api.test/stats", "api.bearer_token_file": str(token)},
        {"JOBSTATS_API_TIMEOUT": "4s", "JOBSTATS_API_MIN_INTERVAL": "1m"},
    )
    (target,) = config.targets
    assert (target.name, target.url, target.timeout, target.min_interval) == (
        "default",
        "http://api.test/stats",
        4.0,
        60.0,
    )
    assert target.request_headers() == {"Authorization": f"Bearer {SECRET}"}


def test_default_target_without_a_token_sends_no_authorization() -> None:
    (target,) = load_config({}, {}).targets
    assert target.name == "default"
    assert target.request_headers() == {}
    assert target.basic_auth() is None


@pytest.mark.parametrize(
    ("flags", "environ", "source"),
    [
        ({"api.url": "http://flag.test/"}, {}, "--api.url"),
        ({}, {"JOBSTATS_API_URL": "http://env.test/"}, "JOBSTATS_API_URL"),
    ],
)
def test_api_url_beside_targets_is_refused_naming_api_url(
    tmp_path: Path, flags: dict[str, str], environ: dict[str, str], source: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, one_target(), environ, flags)
    assert str(caught.value).startswith(f"api.url (from {source}): ")


def test_api_url_in_the_file_beside_targets_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, "api:\n  url: http://file.test/\n" + one_target())
    assert message.startswith("api.url (from ")


def test_api_bearer_token_file_beside_targets_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    with pytest.raises(ConfigError, match=r"^api\.bearer_token_file \(from --api"):
        load(tmp_path, one_target(), flags={"api.bearer_token_file": str(token)})


# Every bad target is one line naming its path

BAD_TARGETS = [
    (
        "targets:\n  - name: a\n    url: http://a/\n  - name: b\n    url: http://b/\n"
        "    tls:\n      ca_fil: x\n",
        "targets[1].tls.ca_fil: unknown key",
    ),
    ("targets:\n  - name: a\n    urll: http://a/\n", "targets[0].urll: unknown key"),
    (one_target("    basic_auth:\n      username: u\n      password: p\n"), "basic_auth.password:"),
    ("targets:\n  - name: a\n", "targets[0].url: missing"),
    ("targets:\n  - url: http://a/\n", "targets[0].name: missing"),
    (one_target(name='"a b"'), "targets[0].name: expected letters"),
    (one_target(name='"http://x"'), "targets[0].name: expected letters"),
    (one_target(name='"-a"'), "targets[0].name: expected letters"),
    (one_target(name="a" * 65), "targets[0].name: expected letters"),
    (
        "targets:\n  - name: a\n    url: http://a/\n  - name: a\n    url: http://b/\n",
        "targets[1].name: 'a' is given twice",
    ),
    ("targets:\n  - name: a\n    url: ftp://a/\n", "targets[0].url (from "),
    ("targets:\n  - name: a\n    url: localhost:3001\n", "targets[0].url (from "),
    (one_target("    timeout: soon\n"), "targets[0].timeout (from "),
    (one_target("    timeout: 0s\n"), "targets[0].timeout (from "),
    (one_target("    max_body_size: 5MB\n"), "targets[0].max_body_size (from "),
    (one_target("    min_interval: -1s\n"), "targets[0].min_interval (from "),
    (one_target("    headers:\n      X Bad: v\n"), "targets[0].headers.X Bad: not a valid header"),
    (one_target("    headers:\n      Authorization: t\n"), "headers.Authorization: set by the"),
    (one_target("    headers:\n      host: h\n"), "targets[0].headers.host: set by the"),
    (one_target('    headers:\n      X-A: "a\\nb"\n'), "targets[0].headers.X-A: a header value"),
    (one_target('    headers:\n      X-A: "a\\rb"\n'), "targets[0].headers.X-A: a header value"),
    (one_target("    headers:\n      X-A: {}\n"), "targets[0].headers.X-A: expected a value"),
    (one_target("    headers:\n      X-A:\n        value: v\n"), "headers.X-A.value: unknown"),
    (one_target("    headers: [a]\n"), "targets[0].headers: expected a mapping"),
    (one_target("    tls:\n      insecure_skip_verify: 'true'\n"), "insecure_skip_verify:"),
    (one_target("    tls:\n      insecure_skip_verify: 1\n"), "tls.insecure_skip_verify:"),
    (one_target("    tls: yes\n"), "targets[0].tls: expected a mapping"),
    (one_target("    tls:\n      ca_file: missing.pem\n"), "targets[0].tls.ca_file: cannot read"),
    ("targets: {name: a}\n", "targets: expected a list"),
    ("targets: a\n", "targets: expected a list"),
    ("targets: []\n", "targets: expected a non-empty list"),
    ("targets:\n  - a\n", "targets[0]: expected a mapping"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TARGETS)
def test_bad_target_is_one_line_naming_its_path(tmp_path: Path, text: str, message: str) -> None:
    assert message in refused(tmp_path, text)


@pytest.mark.parametrize(
    "name",
    ["User-Agent", "user-agent", "USER-AGENT", "uSeR-aGeNt", "Content-Length", "connection"],
)
def test_a_header_the_exporter_sets_itself_is_refused_in_any_case(
    tmp_path: Path, name: str
) -> None:
    # The exporter sends its own User-Agent; one set here would silently fight it.
    message = refused(tmp_path, one_target(f"    headers:\n      {name}: v\n"))
    assert message.startswith(f"targets[0].headers.{name}: set by the exporter")


def test_both_bearer_token_file_and_env_are_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    message = refused(
        tmp_path,
        one_target("    bearer_token_file: token\n    bearer_token_env: TOKEN\n"),
        {"TOKEN": "t"},
    )
    assert message.startswith("targets[0].bearer_token_env: ")


def test_basic_auth_with_a_bearer_token_is_refused(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        one_target("    bearer_token_env: TOKEN\n    basic_auth:\n      username: u\n"),
        {"TOKEN": "t"},
    )
    assert message.startswith("targets[0].basic_auth: ")


def test_basic_auth_without_a_username_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, one_target("    basic_auth:\n      password_env: P\n"), {"P": "p"})
    assert message.startswith("targets[0].basic_auth.username: missing")


def test_unreadable_secret_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    message = refused(tmp_path, one_target("    bearer_token_file: nope/token\n"))
    assert message.startswith("targets[0].bearer_token_file: cannot read ")
    assert str(tmp_path / "nope" / "token") in message


def test_secret_file_that_is_not_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    message = refused(tmp_path, one_target("    bearer_token_file: token\n"))
    assert message.startswith("targets[0].bearer_token_file: cannot read ")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("    bearer_token_env: NOT_SET\n", "targets[0].bearer_token_env"),
        (
            "    basic_auth:\n      username: u\n      password_env: NOT_SET\n",
            "targets[0].basic_auth.password_env",
        ),
    ],
)
def test_unset_variable_is_refused_naming_the_key(tmp_path: Path, extra: str, key: str) -> None:
    message = refused(tmp_path, one_target(extra), {"OTHER": "x"})
    assert message.startswith(f"{key}: the variable NOT_SET is not set")


def test_unset_header_variable_is_refused_naming_the_header(tmp_path: Path) -> None:
    message = refused(tmp_path, one_target("    headers:\n      X-Key:\n        env: NOT_SET\n"))
    assert message.startswith("targets[0].headers.X-Key")
    assert "NOT_SET is not set" in message


def test_unreadable_header_file_names_the_key_as_written(tmp_path: Path) -> None:
    message = refused(tmp_path, one_target("    headers:\n      X-Key:\n        file: nope\n"))
    assert message.startswith("targets[0].headers.X-Key.file: ")


def test_cert_file_without_key_file_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    ca.issue_cert("client.test").cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    message = refused(tmp_path, one_target("    tls:\n      cert_file: client.pem\n"))
    assert message.startswith("targets[0].tls: cert_file and key_file go together")


def test_ca_file_that_is_not_a_certificate_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    message = refused(tmp_path, one_target("    tls:\n      ca_file: ca.pem\n"))
    assert message.startswith("targets[0].tls: cannot load the certificates")


def test_an_empty_targets_key_is_refused(tmp_path: Path) -> None:
    try:
        load(tmp_path, "targets:\n")
    except ConfigError as error:
        message = str(error)
    else:
        message = "accepted"
    assert message.startswith("targets: ")


# Secrets: where they are read from, and that they never show


def test_relative_secret_files_are_read_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "token").write_text("from-the-folder\n")
    monkeypatch.chdir(tmp_path)
    config = load(folder, one_target("    bearer_token_file: secrets/token\n"))
    assert config.targets[0].request_headers() == {"Authorization": "Bearer from-the-folder"}


def test_secret_strips_the_trailing_newline_and_rereads_the_file(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("first\n")
    secret = Secret(f"file {file}", file=str(file))
    assert secret.read() == "first"
    file.write_text("second\r\n")
    assert secret.read() == "second"
    file.write_text("  spaces kept  ")
    assert secret.read() == "  spaces kept  "


def test_a_rotated_token_file_reaches_the_next_request(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("old\n")
    target = load(tmp_path, one_target("    bearer_token_file: token\n")).targets[0]
    assert target.request_headers()["Authorization"] == "Bearer old"
    (tmp_path / "token").write_text("new\n")
    assert target.request_headers()["Authorization"] == "Bearer new"


def test_a_secret_file_gone_after_start_is_an_os_error(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t\n")
    target = load(tmp_path, one_target("    bearer_token_file: token\n")).targets[0]
    (tmp_path / "token").unlink()
    with pytest.raises(OSError, match="No such file"):
        target.request_headers()


def test_bearer_token_from_a_variable(tmp_path: Path) -> None:
    config = load(tmp_path, one_target("    bearer_token_env: TOKEN\n"), {"TOKEN": SECRET})
    assert config.targets[0].request_headers() == {"Authorization": f"Bearer {SECRET}"}


def test_extra_headers_plain_from_a_file_and_from_a_variable(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file\n")
    config = load(
        tmp_path,
        one_target(
            "    bearer_token_env: TOKEN\n    headers:\n      X-Region: eu-west\n"
            "      X-Api-Key:\n        file: key\n      X-Tenant:\n        env: TENANT\n"
        ),
        {"TOKEN": "tok", "TENANT": "shop-7"},
    )
    assert config.targets[0].request_headers() == {
        "X-Region": "eu-west",
        "X-Api-Key": "from-file",
        "X-Tenant": "shop-7",
        "Authorization": "Bearer tok",
    }


@pytest.mark.parametrize(
    ("password", "environ", "expected"),
    [
        ("      password_file: password\n", {}, ("monitoring", "pw-file")),
        ("      password_env: PASSWORD\n", {"PASSWORD": "pw-env"}, ("monitoring", "pw-env")),
        ("", {}, ("monitoring", "")),
    ],
)
def test_basic_auth(
    tmp_path: Path, password: str, environ: dict[str, str], expected: tuple[str, str]
) -> None:
    (tmp_path / "password").write_text("pw-file\n")
    config = load(
        tmp_path, one_target(f"    basic_auth:\n      username: monitoring\n{password}"), environ
    )
    target = config.targets[0]
    assert target.basic_auth() == expected
    assert "Authorization" not in target.request_headers()


def test_no_secret_value_shows_in_a_repr_or_the_config(tmp_path: Path) -> None:
    for name in ("token", "password", "key"):
        (tmp_path / name).write_text(f"{SECRET}-{name}\n")
    environ = {"TOKEN": f"{SECRET}-env-token", "PASSWORD": f"{SECRET}-env-pw"}
    config = load(
        tmp_path,
        "targets:\n"
        "  - name: a\n    url: http://a.test/\n    bearer_token_file: token\n"
        "    headers:\n      X-Api-Key:\n        file: key\n      X-Other:\n        env: TOKEN\n"
        "  - name: b\n    url: http://b.test/\n    bearer_token_env: TOKEN\n"
        "  - name: c\n    url: http://c.test/\n"
        "    basic_auth:\n      username: u\n      password_file: password\n"
        "  - name: d\n    url: http://d.test/\n"
        "    basic_auth:\n      username: u\n      password_env: PASSWORD\n",
        environ,
    )
    shown = [str(config), repr(config), *(repr(t) for t in config.targets)]
    assert all(SECRET not in text for text in shown)
    # The secrets were read, so their absence above means something.
    a, _, c, d = config.targets
    assert a.request_headers()["X-Api-Key"] == f"{SECRET}-key"
    assert c.basic_auth() == ("u", f"{SECRET}-password")
    assert d.basic_auth() == ("u", f"{SECRET}-env-pw")
    assert "variable TOKEN" in repr(config.targets[1])


@pytest.fixture
def listening_port() -> Iterator[int]:
    # Accepts connections in its backlog and never answers: enough for a request to be sent.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_variable_secret_with_a_line_break_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, one_target("    bearer_token_env: TOKEN\n"), {"TOKEN": f"{SECRET}\nline"})
    assert str(caught.value).startswith("targets[0].bearer_token_env: ")
    assert SECRET not in str(caught.value)


def test_a_rotated_token_file_with_a_line_break_fails_the_scrape_without_showing_it(
    tmp_path: Path, listening_port: int
) -> None:
    (tmp_path / "token").write_text(f"{SECRET}\n")
    config = load(
        tmp_path,
        one_target("    bearer_token_file: token\n").replace(
            "http://api.test/stats", f"http://127.0.0.1:{listening_port}/stats"
        ),
    )
    # Rotated after start into something no header can carry.
    (tmp_path / "token").write_text(f"{SECRET}\nsecond-line\n")
    client = StatsClient(config.targets[0])
    try:
        with pytest.raises(FetchError) as caught:
            asyncio.run(client.fetch(2))
    finally:
        asyncio.run(client.close())
    assert caught.value.reason == "connect"
    assert "line break" in str(caught.value)
    assert SECRET not in str(caught.value)


# TLS


def test_tls_verifies_with_the_system_cas_by_default() -> None:
    assert TLS().verify() is True


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake in memory; raises ssl.SSLError when the client refuses the server."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side, outgoing, incoming in (
            ("client", client_side, c_out, s_in),
            ("server", server_side, s_out, c_in),
        ):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            incoming.write(outgoing.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def server_context(ca: trustme.CA, hostname: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(hostname).configure_cert(context)
    return context


def test_a_ca_file_gives_a_context_that_trusts_that_ca_only(tmp_path: Path, ca: trustme.CA) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    target = load(tmp_path, one_target("    tls:\n      ca_file: ca.pem\n")).targets[0]
    context = target.tls.verify()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    handshake(context, server_context(ca, "api.test"), "api.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, server_context(trustme.CA(), "api.test"), "api.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, server_context(ca, "other.test"), "api.test")


def test_insecure_skip_verify_accepts_any_certificate(tmp_path: Path) -> None:
    target = load(tmp_path, one_target("    tls:\n      insecure_skip_verify: true\n")).targets[0]
    context = target.tls.verify()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    handshake(context, server_context(trustme.CA(), "elsewhere.test"), "api.test")


def test_client_certificate_is_loaded(tmp_path: Path, ca: trustme.CA) -> None:
    client_cert = ca.issue_cert("client.test")
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    target = load(
        tmp_path,
        one_target(
            "    tls:\n      ca_file: ca.pem\n      cert_file: client.pem\n"
            "      key_file: client.key\n"
        ),
    ).targets[0]
    assert target.tls == TLS(
        ca_file=str(tmp_path / "ca.pem"),
        cert_file=str(tmp_path / "client.pem"),
        key_file=str(tmp_path / "client.key"),
    )
    server = server_context(ca, "api.test")
    server.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server)
    context = target.tls.verify()
    assert isinstance(context, ssl.SSLContext)
    handshake(context, server, "api.test")


# The shipped example


def test_the_example_config_passes_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    example = REPO / "examples" / "config.yml"
    assert main(["--config.file", str(example), "--config.check"], environ={}) == 0
    assert "valid" in capsys.readouterr().out


def test_the_example_config_lists_its_targets() -> None:
    config = load_config({"config.file": str(REPO / "examples" / "config.yml")}, {})
    assert [t.name for t in config.targets] == ["production", "staging"]
    production = config.targets[0]
    assert production.min_interval == 10.0
    assert production.bearer_token is not None
    assert production.tls == TLS()


def test_a_target_can_be_built_directly_with_defaults() -> None:
    target = Target(name="t", url="http://t.test/", timeout=1.0, max_body_size=10)
    assert (target.min_interval, target.headers, target.tls) == (0.0, (), TLS())
    assert target.request_headers() == {}
