"""The web config file: strict loading, TLS settings, and basic auth with bcrypt hashes."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
import trustme

from exporter.errors import ConfigError
from exporter.webconfig import WebConfig, load_web_config

#: Cost 4, the lowest bcrypt takes: these tests check logic, not bcrypt's slowness.
PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))
#: Something a person might paste where a hash belongs; it must never be echoed.
PLAINTEXT = "hunter2-Zq8v-plaintext"


def basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode()


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    files = {
        "cert_file": tmp_path / "server.pem",
        "key_file": tmp_path / "server.key",
        "client_ca_file": tmp_path / "clients-ca.pem",
    }
    server.cert_chain_pems[0].write_to_path(str(files["cert_file"]))
    server.private_key_pem.write_to_path(str(files["key_file"]))
    ca.cert_pem.write_to_path(str(files["client_ca_file"]))
    return {key: str(path) for key, path in files.items()}


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], str]:
    def write_file(text: str) -> str:
        path = tmp_path / "web-config.yml"
        path.write_text(text)
        return str(path)

    return write_file


def refused(path: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_full_file_loads(write: Callable[[str], str], tls_files: dict[str, str]) -> None:
    path = write(
        "tls_server_config:\n"
        f"  cert_file: {tls_files['cert_file']}\n"
        f"  key_file: {tls_files['key_file']}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {tls_files['client_ca_file']}\n"
        "  min_version: TLS13\n"
        f"basic_auth_users:\n  prometheus: {HASH.decode()}\n"
    )
    config = load_web_config(path)
    assert config.tls
    assert config.cert_file == tls_files["cert_file"]
    assert config.client_auth_type == "RequireAndVerifyClientCert"
    assert dict(config.users) == {"prometheus": HASH}
    context = config.ssl_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_tls_alone_defaults_to_tls12_and_no_client_cert(
    write: Callable[[str], str], tls_files: dict[str, str]
) -> None:
    path = write(
        f"tls_server_config:\n  cert_file: {tls_files['cert_file']}\n"
        f"  key_file: {tls_files['key_file']}\n"
    )
    config = load_web_config(path)
    assert not config.users
    context = config.ssl_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE


def test_users_alone_mean_no_tls(write: Callable[[str], str]) -> None:
    config = load_web_config(write(f"basic_auth_users:\n  prometheus: {HASH.decode()}\n"))
    assert not config.tls
    assert dict(config.users) == {"prometheus": HASH}


def test_an_empty_file_means_no_tls_and_no_users(write: Callable[[str], str]) -> None:
    config = load_web_config(write(""))
    assert not config.tls
    assert config.authorized(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_server_confg: {}\n", "tls_server_confg: unknown key"),
        ("basic_auth_user: {}\n", "basic_auth_user: unknown key"),
        ("tls_server_config:\n  certfile: x\n", "tls_server_config.certfile: unknown key"),
        ("tls_server_config:\n  cipher_suites: [x]\n", "tls_server_config.cipher_suites: unknown"),
        ("- a\n", "web.config_file: expected a mapping"),
        ("tls_server_config: [a]\n", "tls_server_config: expected a mapping"),
        ("basic_auth_users: [a]\n", "basic_auth_users: expected a mapping"),
        ("tls_server_config:\n  min_version: TLS12\n", "tls_server_config.cert_file: missing"),
        ("tls_server_config: [\n", "is not valid YAML"),
    ],
)
def test_a_bad_file_names_the_key(write: Callable[[str], str], text: str, message: str) -> None:
    assert message in refused(write(text))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    assert refused(str(tmp_path / "nope.yml")).startswith("web.config_file: cannot read")


def test_cert_without_key_is_refused(
    write: Callable[[str], str], tls_files: dict[str, str]
) -> None:
    message = refused(write(f"tls_server_config:\n  cert_file: {tls_files['cert_file']}\n"))
    assert message.startswith("tls_server_config: cert_file and key_file go together")


def test_key_without_cert_is_refused(
    write: Callable[[str], str], tls_files: dict[str, str]
) -> None:
    message = refused(write(f"tls_server_config:\n  key_file: {tls_files['key_file']}\n"))
    assert message.startswith("tls_server_config: cert_file and key_file go together")


def tls_text(tls_files: dict[str, str], extra: str) -> str:
    return (
        f"tls_server_config:\n  cert_file: {tls_files['cert_file']}\n"
        f"  key_file: {tls_files['key_file']}\n{extra}"
    )


def test_an_unknown_client_auth_type_is_refused(
    write: Callable[[str], str], tls_files: dict[str, str]
) -> None:
    message = refused(write(tls_text(tls_files, "  client_auth_type: RequestClientCert\n")))
    assert message.startswith("tls_server_config.client_auth_type: expected one of")


def test_verifying_client_certs_needs_a_client_ca(
    write: Callable[[str], str], tls_files: dict[str, str]
) -> None:
    message = refused(
        write(tls_text(tls_files, "  client_auth_type: RequireAndVerifyClientCert\n"))
    )
    assert message.startswith("tls_server_config.client_ca_file: needed")


@pytest.mark.parametrize("version", ["TLS11", "TLS10", "tls12", "1.2"])
def test_an_unknown_min_version_is_refused(
    write: Callable[[str], str], tls_files: dict[str, str], version: str
) -> None:
    message = refused(write(tls_text(tls_files, f"  min_version: {version}\n")))
    assert message.startswith("tls_server_config.min_version: expected TLS12 or TLS13")


def test_a_certificate_that_does_not_load_is_refused(
    write: Callable[[str], str], tls_files: dict[str, str]
) -> None:
    Path(tls_files["key_file"]).write_text("not a key\n")
    message = refused(write(tls_text(tls_files, "")))
    assert message.startswith("tls_server_config: cannot load the certificate")


def test_a_password_where_a_hash_belongs_is_refused_without_echoing_it(
    write: Callable[[str], str],
) -> None:
    message = refused(write(f"basic_auth_users:\n  prometheus: {PLAINTEXT}\n"))
    assert message.startswith("basic_auth_users.prometheus: expected a bcrypt hash")
    assert PLAINTEXT not in message


@pytest.mark.parametrize("value", ["", "~", "[a]", "true"])
def test_a_user_without_a_hash_is_refused(write: Callable[[str], str], value: str) -> None:
    message = refused(write(f"basic_auth_users:\n  prometheus: {value}\n"))
    assert message.startswith("basic_auth_users.prometheus: ")


def test_a_malformed_bcrypt_hash_is_refused_at_load(write: Callable[[str], str]) -> None:
    path = write(f"basic_auth_users:\n  prometheus: $2b${PLAINTEXT}\n")
    try:
        load_web_config(path)
    except ConfigError as error:
        message = str(error)
    else:
        message = "accepted"
    assert message.startswith("basic_auth_users.prometheus: ")
    assert PLAINTEXT not in message


# authorized()


@pytest.fixture
def web() -> WebConfig:
    return WebConfig(users={"prometheus": HASH})


def test_without_users_every_request_is_authorized() -> None:
    config = WebConfig()
    assert config.authorized(None)
    assert config.authorized("Basic garbage")


def test_the_right_password_is_authorized(web: WebConfig) -> None:
    assert web.authorized(basic(f"prometheus:{PASSWORD}".encode()))


def test_a_password_with_a_colon_is_read_whole() -> None:
    config = WebConfig(users={"u": bcrypt.hashpw(b"a:b", bcrypt.gensalt(rounds=4))})
    assert config.authorized(basic(b"u:a:b"))
    assert not config.authorized(basic(b"u:a"))


@pytest.mark.parametrize(
    "credentials",
    [
        b"prometheus:wrong",
        b"prometheus:",
        b"prometheus:" + PASSWORD.encode() + b" ",
        b"Prometheus:" + PASSWORD.encode(),
        b"stranger:" + PASSWORD.encode(),
        b":" + PASSWORD.encode(),
    ],
)
def test_wrong_credentials_are_not_authorized(web: WebConfig, credentials: bytes) -> None:
    assert not web.authorized(basic(credentials))


def test_a_header_without_a_colon_is_refused_even_for_an_empty_password() -> None:
    config = WebConfig(users={"u": bcrypt.hashpw(b"", bcrypt.gensalt(rounds=4))})
    assert config.authorized(basic(b"u:"))
    assert not config.authorized(basic(b"u"))


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic cHJvbWV0aGV1cw",  # base64 without its padding
        basic(b"prometheus"),  # no colon
        basic(b"prometheus\xff:" + PASSWORD.encode()),  # not UTF-8
        basic(b"prometheus:\xc3\x28"),
    ],
)
def test_malformed_headers_are_not_authorized(web: WebConfig, header: str | None) -> None:
    assert not web.authorized(header)


RIGHT = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
WRONG = base64.b64encode(b"prometheus:wrong").decode()


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_the_basic_scheme_is_read_in_any_case(web: WebConfig, scheme: str) -> None:
    # RFC 7617: the scheme name is case-insensitive, and some clients send it in lowercase.
    assert web.authorized(f"{scheme} {RIGHT}")


@pytest.mark.parametrize("scheme", ["basic", "BASIC"])
def test_a_wrong_password_is_refused_whatever_the_case_of_the_scheme(
    web: WebConfig, scheme: str
) -> None:
    assert not web.authorized(f"{scheme} {WRONG}")


@pytest.mark.parametrize(
    "header",
    [
        "basic",
        "basic ",
        f"basic{RIGHT}",  # no space after the scheme
        f"basic:{RIGHT}",
        "basic !!!not-base64!!!",
        f"basic {RIGHT[:-1]}",  # cut short: no longer valid base64
        f"basic {RIGHT}!",  # a stray character a lenient decoder would drop
        f"Bearer {RIGHT}",  # the right credentials under another scheme
        f"Basicx {RIGHT}",
        f"Digest {RIGHT}",
        RIGHT,  # no scheme at all
    ],
)
def test_right_credentials_in_a_malformed_header_are_refused(web: WebConfig, header: str) -> None:
    assert not web.authorized(header)


@pytest.mark.parametrize("user", ["prometheus", "stranger"])
def test_a_password_over_72_bytes_is_not_authorized(web: WebConfig, user: str) -> None:
    assert not web.authorized(basic(f"{user}:{'x' * 73}".encode()))


class CountingCheckpw:
    def __init__(self) -> None:
        self.calls = 0
        self.real = bcrypt.checkpw

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls += 1
        return self.real(password, hashed)


@pytest.fixture
def checkpw(monkeypatch: pytest.MonkeyPatch) -> CountingCheckpw:
    counting = CountingCheckpw()
    # webconfig looks bcrypt.checkpw up at each call.
    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return counting


def test_a_verified_password_is_not_checked_again(web: WebConfig, checkpw: CountingCheckpw) -> None:
    header = basic(f"prometheus:{PASSWORD}".encode())
    assert web.authorized(header)
    assert checkpw.calls == 1
    assert web.authorized(header)
    assert checkpw.calls == 1


def test_a_refused_password_is_remembered_too(web: WebConfig, checkpw: CountingCheckpw) -> None:
    header = basic(b"prometheus:wrong")
    assert not web.authorized(header)
    assert not web.authorized(header)
    assert checkpw.calls == 1


def test_the_memory_is_per_password_not_per_user(web: WebConfig, checkpw: CountingCheckpw) -> None:
    assert web.authorized(basic(f"prometheus:{PASSWORD}".encode()))
    assert not web.authorized(basic(b"prometheus:wrong"))
    assert checkpw.calls == 2
    assert web.authorized(basic(f"prometheus:{PASSWORD}".encode()))
    assert checkpw.calls == 2


def test_the_memory_is_per_user_so_one_users_password_never_opens_another() -> None:
    config = WebConfig(
        users={
            "alice": bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=4)),
            "bob": bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(rounds=4)),
        }
    )
    assert config.authorized(basic(b"alice:alice-pw"))
    assert not config.authorized(basic(b"bob:alice-pw"))
    assert config.authorized(basic(b"bob:bob-pw"))
    assert not config.authorized(basic(b"alice:bob-pw"))


#: What webconfig remembers at most before it starts over.
REMEMBERED = 256


def test_the_memory_starts_over_past_256_credentials(
    web: WebConfig, checkpw: CountingCheckpw
) -> None:
    # A client cycling through passwords must not grow the memory without end.
    right = basic(f"prometheus:{PASSWORD}".encode())
    assert web.authorized(right)
    for attempt in range(REMEMBERED - 1):
        assert not web.authorized(basic(f"prometheus:wrong-{attempt}".encode()))
    assert checkpw.calls == REMEMBERED
    assert web.authorized(right)  # the 256th remembered pair: still no check
    assert checkpw.calls == REMEMBERED
    assert not web.authorized(basic(b"prometheus:one-too-many"))
    assert len(web._verified) == 1
    assert web.authorized(right)  # forgotten with the rest: checked again
    assert checkpw.calls == REMEMBERED + 2


def test_another_web_config_does_not_trust_what_this_one_verified() -> None:
    old = WebConfig(users={"prometheus": HASH})
    assert old.authorized(basic(f"prometheus:{PASSWORD}".encode()))
    rotated = WebConfig(users={"prometheus": bcrypt.hashpw(b"new", bcrypt.gensalt(rounds=4))})
    assert not rotated.authorized(basic(f"prometheus:{PASSWORD}".encode()))
    assert rotated.authorized(basic(b"prometheus:new"))


def test_an_unknown_user_costs_a_bcrypt_check_like_a_known_one(
    web: WebConfig, checkpw: CountingCheckpw
) -> None:
    assert not web.authorized(basic(b"stranger:whatever"))
    assert checkpw.calls == 1


def test_the_memory_holds_no_password(web: WebConfig) -> None:
    assert web.authorized(basic(f"prometheus:{PASSWORD}".encode()))
    remembered = repr(web._verified)
    assert PASSWORD not in remembered
    assert PASSWORD.encode().hex() not in remembered


def test_users_and_hashes_stay_out_of_the_repr(web: WebConfig) -> None:
    assert HASH.decode() not in repr(web)
