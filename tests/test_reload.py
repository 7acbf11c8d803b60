"""Reload without a restart: SIGHUP and POST /-/reload re-read the config, or keep the old.

Run as a user runs it: the exporter is a process, its config a file, its upstream a real
HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from samples import sample
from upstream import (
    HOST,
    Answer,
    ExporterProcess,
    FakeStatsApi,
    exporter_command,
    free_port,
    running_exporter,
    wait_until,
)

PATIENCE = 20.0


def answer(status: int = 200) -> Answer:
    return Answer(status=status, body=json.dumps(sample("enabled")).encode())


def write(path: Path, targets: dict[str, str], extra: dict[str, Any] | None = None) -> None:
    document = {"targets": [{"name": name, "url": url} for name, url in targets.items()]}
    path.write_text(yaml.safe_dump(document | (extra or {})), encoding="utf-8")


def value(text: bytes, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def post(exporter: ExporterProcess, path: str, headers: dict[str, str] | None = None) -> int:
    connection = http.client.HTTPConnection(HOST, exporter.port, timeout=PATIENCE)
    try:
        connection.request("POST", path, headers=headers or {})
        with connection.getresponse() as response:
            response.read()
            return response.status
    finally:
        connection.close()


@pytest.fixture
def apis() -> Iterator[tuple[FakeStatsApi, FakeStatsApi]]:
    with FakeStatsApi(answer(503)) as shop, FakeStatsApi(answer()) as admin:
        yield shop, admin


def test_sighup_adds_a_target_and_keeps_the_state_of_those_that_did_not_change(
    tmp_path: Path, apis: tuple[FakeStatsApi, FakeStatsApi]
) -> None:
    shop, admin = apis
    config = tmp_path / "config.yml"
    write(config, {"shop": shop.url})
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        _, body = exporter.get("/probe?target=shop")
        assert value(body, "jobstats_scrape_errors_total", reason="http_status") == 1
        assert exporter.get("/probe?target=admin")[0] == 400

        write(config, {"shop": shop.url, "admin": admin.url})
        os.kill(exporter.pid, signal.SIGHUP)
        wait_until(
            lambda: exporter.get("/probe?target=admin")[0] == 200, PATIENCE, "the new target"
        )

        _, body = exporter.get("/probe?target=shop")
        # The same target, kept: its count goes on from 1.
        assert value(body, "jobstats_scrape_errors_total", reason="http_status") == 2
        assert value(exporter.get("/probe?target=admin")[1], "jobstats_up") == 1
        assert "config reloaded" in exporter.stderr()

        # A target whose settings change is built anew, its counts from 0.
        write(config, {"shop": shop.url + "?v=2", "admin": admin.url})
        assert post(exporter, "/-/reload") == 200
        _, body = exporter.get("/probe?target=shop")
        assert value(body, "jobstats_scrape_errors_total", reason="http_status") == 1
    assert "Traceback" not in exporter.stderr()


@pytest.mark.parametrize("how", ["SIGHUP", "POST"])
def test_a_config_that_fails_the_check_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, apis: tuple[FakeStatsApi, FakeStatsApi], how: str
) -> None:
    _, admin = apis
    config = tmp_path / "config.yml"
    write(config, {"admin": admin.url})
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        mark = exporter.stderr_mark()
        write(config, {"admin": admin.url}, {"limits": {"max_queues": -1, "no_such_key": 1}})
        if how == "POST":
            assert post(exporter, "/-/reload") == 500
        else:
            os.kill(exporter.pid, signal.SIGHUP)
        wait_until(lambda: "reload refused" in exporter.stderr_since(mark), PATIENCE, "a line")
        refused = [line for line in exporter.stderr_since(mark).splitlines() if "refused" in line]
        assert len(refused) == 1
        assert "limits." in refused[0]  # the key at fault is named
        assert value(exporter.get("/probe?target=admin")[1], "jobstats_up") == 1
        assert exporter.process.poll() is None
    assert "Traceback" not in exporter.stderr()


def test_reload_answers_only_post_and_asks_for_the_web_configs_credentials(
    tmp_path: Path, apis: tuple[FakeStatsApi, FakeStatsApi]
) -> None:
    _, admin = apis
    config = tmp_path / "config.yml"
    write(config, {"admin": admin.url})
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {"prom": hashed}}), encoding="utf-8")
    args = ["--config.file", str(config), "--web.config.file", str(web)]
    credentials = {"Authorization": "Basic " + base64.b64encode(b"prom:s3cret").decode()}
    with running_exporter(args, tmp_path) as exporter:
        assert post(exporter, "/-/reload") == 401
        assert exporter.get("/-/reload", credentials)[0] == 405
        assert post(exporter, "/-/reload", credentials) == 200


def test_the_open_files_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024 and soft == hard:
        pytest.skip("the hard limit leaves nothing to raise")
    port = free_port()

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

    process = subprocess.Popen(
        exporter_command("demo", "--web.listen-address", f"{HOST}:{port}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=low_soft_limit,
    )
    try:
        exporter = ExporterProcess(process, port, tmp_path / "unused")
        wait_until(exporter.serves, PATIENCE, "the demo")
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        exporter.stop()


def test_a_new_log_level_applies_at_once(
    tmp_path: Path, apis: tuple[FakeStatsApi, FakeStatsApi]
) -> None:
    shop, _ = apis  # answers 503: every scrape logs a warning
    config = tmp_path / "config.yml"
    write(config, {"shop": shop.url})
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        mark = exporter.stderr_mark()
        exporter.get("/metrics")
        assert "scrape failed" in exporter.stderr_since(mark)
        write(config, {"shop": shop.url}, {"log": {"level": "error"}})
        assert post(exporter, "/-/reload") == 200
        mark = exporter.stderr_mark()
        exporter.get("/metrics")
        assert exporter.stderr_since(mark) == ""
