"""Configuration: flags over variables over the file over defaults, strictly checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.cli import main
from exporter.config import Config, load_config, parse_listen_address
from exporter.errors import ConfigError


def test_defaults_without_flags_variables_or_file() -> None:
    assert load_config({}, {}) == Config()
    assert Config().targets[0].url == "http://localhost:3001/api/jobs/stats"
    assert Config().api_timeout == 10.0
    assert Config().web_listen_address == ":9787"
    assert Config().cron_timezone == "UTC"


def test_flag_beats_variable_beats_file(tmp_path: Path) -> None:
    file = tmp_path / "config.yml"
    file.write_text("api:\n  url: http://file/\n  timeout: 3s\nlog:\n  level: debug\n")
    config = load_config(
        {"config.file": str(file), "api.url": "http://flag/"},
        {"JOBSTATS_API_URL": "http://env/", "JOBSTATS_API_TIMEOUT": "2s"},
    )
    assert config.api_url == "http://flag/"
    assert config.api_timeout == 2.0
    assert config.log_level == "debug"


def test_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    file = tmp_path / "config.yml"
    file.write_text("cron:\n  timezone: Europe/Berlin\n")
    assert load_config({}, {"JOBSTATS_CONFIG_FILE": str(file)}).cron_timezone == "Europe/Berlin"


@pytest.mark.parametrize(
    ("raw", "seconds"), [("10s", 10.0), ("500ms", 0.5), ("1m", 60.0), ("2.5", 2.5), ("1h", 3600.0)]
)
def test_durations(raw: str, seconds: float) -> None:
    assert load_config({"api.timeout": raw}, {}).api_timeout == seconds


@pytest.mark.parametrize(
    ("raw", "size"), [("5MiB", 5 * 1024 * 1024), ("512KiB", 512 * 1024), ("1000", 1000)]
)
def test_sizes(raw: str, size: int) -> None:
    assert load_config({"api.max_body_size": raw}, {}).api_max_body_size == size


BAD_VALUES = [
    ("api.url", "localhost:3001"),
    ("api.url", "ftp://host/x"),
    ("api.url", "http://127.0.0.1:99999/x"),
    ("api.url", "http://h:abc/x"),
    ("api.url", "http://xn--zz/x"),
    ("api.url", "http:///x"),
    ("api.timeout", "abc"),
    ("api.timeout", "0s"),
    ("api.timeout", "-1s"),
    ("api.timeout", "2d"),
    ("api.max_body_size", "0"),
    ("api.max_body_size", "5MB"),
    ("web.listen_address", "9787"),
    ("web.listen_address", ":99999"),
    ("web.listen_address", "a:b:9787"),
    ("web.listen_address", "[::1:80"),
    ("cron.timezone", "Mars/Olympus"),
    ("log.level", "verbose"),
    ("log.format", "xml"),
]


@pytest.mark.parametrize(("key", "raw"), BAD_VALUES)
def test_bad_value_is_one_line_naming_the_key_and_its_source(key: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({key: raw}, {})
    message = str(caught.value)
    assert message.startswith(f"{key} (from --{key.replace('_', '-')}): ")
    assert "\n" not in message


def test_bad_variable_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"api\.timeout \(from JOBSTATS_API_TIMEOUT\)"):
        load_config({}, {"JOBSTATS_API_TIMEOUT": "soon"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api:\n  urll: http://x/\n", "api.urll: unknown key"),
        ("web:\n  port: 1\n", "web.port: unknown key"),
        ("api: http://x/\n", "api: unknown key"),
        ("api:\n  timeout: [1, 2]\n", "api.timeout (from"),
        ("api:\n  timeout: abc\n", "api.timeout (from"),
        ("- a\n- b\n", "config.file: expected a mapping"),
        ("api: [\n", "is not valid YAML"),
        ("api.url: http://x/\n", "api.url: unknown key"),
        ("api:\n  timeout: 5s\n  timeout: 6s\n", "timeout: given twice"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "config.yml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config({"config.file": str(file)}, {})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.file: cannot read"):
        load_config({"config.file": str(tmp_path / "nope.yml")}, {})


def test_yaml_numbers_are_accepted_as_values(tmp_path: Path) -> None:
    file = tmp_path / "config.yml"
    file.write_text("api:\n  timeout: 3\n")
    assert load_config({"config.file": str(file)}, {}).api_timeout == 3.0


@pytest.mark.parametrize(
    ("address", "expected"),
    [(":9787", ("", 9787)), ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:9787", ("::1", 9787))],
)
def test_listen_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(address) == expected


def test_config_check_accepts_a_good_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config.check", "--api.timeout", "5s"], environ={}) == 0
    assert "valid" in capsys.readouterr().out


def test_config_check_rejects_a_bad_one_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config.check", "--api.timeout", "abc"], environ={}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "api.timeout" in err


def test_unknown_flag_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--api.urll", "x"], environ={})
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--api.urll" in err


def test_flags_work_after_the_subcommand_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config.check", "--api.timeout", "abc"], environ={}) == 2
    assert "api.timeout" in capsys.readouterr().err
