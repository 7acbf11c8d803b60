"""The Redis source of a target: strictly checked, and its password never shown."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from exporter.bullmq import Queues, queue_of_meta_key, where, workers_per_queue
from exporter.cli import main
from exporter.config import load_config
from exporter.errors import ConfigError
from exporter.targets import RedisSource, Secret

from samples import bullmq_capture

SECRET = "r3dis-Pa55-Kum9uat"


def load_file(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> RedisSource:
    file = tmp_path / "config.yml"
    file.write_text(text)
    (target,) = load_config({"config.file": str(file)}, environ or {}).targets
    assert target.redis is not None
    return target.redis


def refused(tmp_path: Path, text: str) -> str:
    file = tmp_path / "config.yml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config({"config.file": str(file)}, {})
    message = str(caught.value)
    assert "\n" not in message
    assert SECRET not in message
    return message


def target(redis: str) -> str:
    return f"targets:\n  - name: prod\n    url: http://api.test/stats\n    redis:\n{redis}"


def test_a_target_s_redis_section_with_every_key(tmp_path: Path) -> None:
    (tmp_path / "redis_password").write_text(SECRET + "\n")
    source = load_file(
        tmp_path,
        target(
            "      url: redis://redis.shop.internal:6379/2\n"
            "      prefix: shop\n"
            "      username: monitoring\n"
            "      password_file: redis_password\n"
            "      discovery_interval: 5s\n"
            "      queue_names:\n        inventory-sync: inventory\n"
        ),
    )
    assert source.url == "redis://redis.shop.internal:6379/2"
    assert source.prefix == "shop"
    assert source.username == "monitoring"
    assert source.password is not None
    assert source.password.read() == SECRET
    assert source.discovery_interval == 5.0
    assert source.label("inventory-sync") == "inventory"
    assert source.label("product") == "product"
    assert SECRET not in repr(source)


def test_prefix_defaults_to_bullmq_s_own(tmp_path: Path) -> None:
    assert load_file(tmp_path, target("      url: redis://r\n")).prefix == "bull"


def test_the_password_may_come_from_a_variable(tmp_path: Path) -> None:
    source = load_file(
        tmp_path,
        target("      url: rediss://r\n      password_env: REDIS_PW\n"),
        {"REDIS_PW": SECRET},
    )
    assert source.password == Secret("variable REDIS_PW", value=SECRET)


BAD_REDIS = [
    ("      url: http://r/\n", "targets[0].redis.url (from"),
    ("      url: redis://\n", "targets[0].redis.url (from"),
    (f"      url: redis://:{SECRET}@r/\n", "the URL holds user info"),
    (f"      url: redis://u:{SECRET}@r/\n", "the URL holds user info"),
    (f"      url: redis://:{SECRET}@:6379\n", "the URL holds user info"),
    (f"      url: redis://:{SECRET}@r:99999\n", "expected a port"),
    (f"      url: http://:{SECRET}@r:6379\n", "the URL holds user info"),
    (f"      url: redis//:{SECRET}@r\n", "targets[0].redis.url (from"),
    (f"      url: redis://r/0?password={SECRET}\n", "expected no query"),
    ("      url: redis://r/db\n", "expected a database number"),
    ("      url: redis://r:99999\n", "expected a port"),
    ("      prefix: bull\n", "targets[0].redis.url: missing"),
    ("      url: redis://r\n      prefix: 'b*'\n", "targets[0].redis.prefix: expected"),
    ("      url: redis://r\n      password: x\n", "targets[0].redis.password: unknown key"),
    ("      url: redis://r\n      password_file: nope\n", "redis.password_file: cannot read"),
    ("      url: redis://r\n      password_env: NOPE\n", "the variable NOPE is not set"),
    ("      url: redis://r\n      queue_names: [a]\n", "redis.queue_names: expected a mapping"),
    ("      url: redis://r\n      queue_names:\n        'a:b': x\n", "queue_names.a:b:"),
    ("      url: redis://r\n      discovery_interval: often\n", "discovery_interval (from"),
    (
        "      url: redis://r\n      queue_names:\n        a: x\n        b: x\n",
        "queue_names.b: the label 'x' is given to another queue too",
    ),
    ("      url: redis://r\n      tls:\n        ca_file: none.pem\n", "redis.tls.ca_file: cannot"),
]


@pytest.mark.parametrize(("redis", "message"), BAD_REDIS)
def test_a_bad_redis_section_is_one_line_naming_its_key(
    tmp_path: Path, redis: str, message: str
) -> None:
    assert message in refused(tmp_path, target(redis))


def test_the_command_line_makes_the_default_target_s_redis_source(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET)
    config = load_config(
        {"redis.url": "redis://127.0.0.1:6379/0", "redis.password_file": str(tmp_path / "pw")},
        {"JOBSTATS_REDIS_PREFIX": "shop"},
    )
    (default,) = config.targets
    assert default.redis is not None
    assert default.redis.prefix == "shop"
    assert default.redis.password is not None
    assert default.redis.password.read() == SECRET


def test_without_a_redis_url_there_is_no_redis_source() -> None:
    (default,) = load_config({}, {}).targets
    assert default.redis is None


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1/",
        f"redis://:{SECRET}@:6379",
        f"redis://:{SECRET}@host:99999",
        f"http://:{SECRET}@host:6379",
        f"redis//:{SECRET}@host",
        f"redis://host/0?password={SECRET}",
    ],
)
def test_a_password_in_the_redis_url_flag_exits_2_without_echoing_it(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code = main(["--config.check", f"--redis.url={url}"], {})
    err = capsys.readouterr().err
    assert code == 2
    assert "redis.url (from --redis.url)" in err
    assert SECRET not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "url",
    [f"http://user:{SECRET}@host:99999/x", f"ftp://u:{SECRET}@h/", f"http://h:99999/?t={SECRET}"],
)
def test_a_bad_api_url_is_refused_without_echoing_its_credentials(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    assert main(["--config.check", f"--api.url={url}"], {}) == 2
    assert SECRET not in capsys.readouterr().err


def test_a_redis_url_beside_targets_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "config.yml"
    file.write_text(target("      url: redis://r\n"))
    with pytest.raises(ConfigError, match=r"redis\.url .*the config file lists targets"):
        load_config({"config.file": str(file)}, {"JOBSTATS_REDIS_URL": "redis://other"})


def test_where_shows_no_credentials() -> None:
    assert where(RedisSource(url="rediss://monitoring@redis.test:6380/1")) == (
        "rediss://redis.test:6380/1"
    )


@pytest.mark.parametrize(
    ("key", "queue"),
    [
        ("bull:inventory:meta", "inventory"),
        ("bull:product-sync:meta", "product-sync"),
        ("bull:inventory:job:meta", None),  # a job's key whose id ends in ":meta"
        ("bull::meta", None),
        ("other:inventory:meta", None),
        ("bull:inventory:events", None),
    ],
)
def test_a_queue_is_found_by_its_meta_key(key: str, queue: str | None) -> None:
    assert queue_of_meta_key("bull", key) == queue


def test_workers_are_counted_from_bullmq_s_connection_names() -> None:
    queues = Queues("bull", {"inventory": "inventory", "product": "products"})
    names = [
        *bullmq_capture()["worker_client_names"],
        "bull:aW52ZW50b3J5",  # an unnamed worker of inventory
        "bull:aW52ZW50b3J5:qe",  # inventory's QueueEvents: no worker
        "shop:aW52ZW50b3J5:w:x",  # another prefix
        "",
    ]
    assert workers_per_queue(names, queues) == {"inventory": 2, "products": 1}


def test_every_queue_has_a_worker_count_even_with_none_connected() -> None:
    queues = Queues("bull", {"inventory": "inventory"})
    assert workers_per_queue([], queues) == {"inventory": 0}


def test_a_redis_url_without_an_api_url_is_a_target_without_a_stats_api() -> None:
    (default,) = load_config({"redis.url": "redis://127.0.0.1/0"}, {}).targets
    assert default.url is None
    assert default.redis is not None


def test_with_an_api_url_given_the_redis_source_is_read_beside_it() -> None:
    (default,) = load_config(
        {"redis.url": "redis://127.0.0.1/0"}, {"JOBSTATS_API_URL": "http://api.test/stats"}
    ).targets
    assert default.url == "http://api.test/stats"
    assert default.redis is not None


def test_a_target_with_a_redis_section_needs_no_url(tmp_path: Path) -> None:
    file = tmp_path / "config.yml"
    file.write_text("targets:\n  - name: shop\n    redis:\n      url: redis://r\n")
    (target,) = load_config({"config.file": str(file)}, {}).targets
    assert target.url is None
