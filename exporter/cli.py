"""The `jobstats-exporter` command: serve (default), check, demo, simulate.

Turns flags and environment into a Config, and a ConfigError into one line on
stderr and exit status 2. An upstream fault is never a traceback here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import FrameType
from typing import Any, NoReturn, TypeVar

from . import __version__
from .card import render_card
from .client import Fetched, StatsClient, redact_url
from .config import DEFAULT_PORT, SETTINGS, Config, load_config, parse_listen_address
from .errors import ConfigError, FetchError, ParseError
from .logs import configure_logging
from .model import parse_stats
from .schedule import CronSchedules
from .server import Exporter, MetricsServer, log, source_of
from .targets import Target
from .webconfig import WebConfig, load_web_config

__all__ = ["main"]

PROG = "jobstats-exporter"
_T = TypeVar("_T")
#: Seconds the simulation has run before its first answer, so the first scrape is not all zeros.
SIMULATION_WARM_UP = 600


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other configuration error, instead of usage plus message.
        self.exit(2, f"{PROG}: {message} (see {PROG} --help)\n")


def _setting_flags() -> _Parser:
    flags = _Parser(add_help=False, allow_abbrev=False)
    for setting in SETTINGS:
        flags.add_argument(
            setting.flag,
            dest=setting.key,
            default=argparse.SUPPRESS,
            metavar=setting.key.rpartition(".")[2].upper(),
            help=f"{setting.help} (env {setting.env})",
        )
    flags.add_argument(
        "--config.file",
        dest="config.file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="YAML file with the same settings (env JOBSTATS_CONFIG_FILE)",
    )
    flags.add_argument(
        "--config.check",
        dest="config.check",
        action="store_true",
        default=argparse.SUPPRESS,
        help="validate the configuration and exit (0 valid, 2 invalid)",
    )
    return flags


def _parser() -> _Parser:
    common = _setting_flags()
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        parents=[common],
        description="Prometheus exporter for the background job stats API "
        f"(BullMQ queues over Redis). Serves /metrics on :{DEFAULT_PORT} by default.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="serve /metrics (the default)")
    check = commands.add_parser(
        "check", parents=[common], help="fetch the stats once and print them like the admin card"
    )
    check.add_argument(
        "--target", dest="check_target", default=None, help="a target of the config file by name"
    )
    demo = commands.add_parser(
        "demo", parents=[common], help="run a simulated stats API and serve the exporter on it"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    commands.add_parser(
        "healthcheck",
        parents=[common],
        help="exit 0 when the exporter on --web.listen-address answers /-/healthy (for containers)",
    )
    simulate = commands.add_parser("simulate", help="run only the simulated stats API")
    simulate.add_argument(
        "--simulate.listen-address",
        dest="simulate_address",
        default="127.0.0.1:3001",
        help="address of the simulated API (default 127.0.0.1:3001)",
    )
    simulate.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    return parser


def _reject_unknown_flags(parser: _Parser, argv: Sequence[str]) -> None:
    """Name an unknown flag first: argparse would blame the value after it as a COMMAND."""
    known = {"--"}
    for action in parser._actions:
        known.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known.update(o for a in sub._actions for o in a.option_strings)
    for token in argv:
        if token.startswith("--") and token.split("=", 1)[0] not in known:
            parser.error(f"unknown flag {token.split('=', 1)[0]}")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    _reject_unknown_flags(parser, argv)
    args = vars(parser.parse_args(argv))
    environ = os.environ if environ is None else environ
    command = args.pop("command", None) or "serve"
    check_only = bool(args.pop("config.check", False))
    flags = {key: value for key, value in args.items() if isinstance(value, str) and "." in key}
    if command == "demo" and "web.listen_address" not in flags:
        flags["web.listen_address"] = f"127.0.0.1:{DEFAULT_PORT}"
    load = _loader(flags, environ)
    try:
        config, web = load()
        if command == "simulate":
            parse_listen_address(args["simulate_address"])
    except (ConfigError, ValueError) as error:
        print(f"{PROG}: config error: {error}", file=sys.stderr)
        return 2
    if check_only:
        print(f"{PROG}: configuration is valid")
        return 0
    configure_logging(config.log_level, config.log_format)
    if command == "healthcheck":
        return _healthcheck(config, web)
    if command == "check":
        return _check(config, args.get("check_target"))
    if command == "simulate":
        return _simulate(args["simulate_address"], args["seed"])
    if command == "demo":
        return _demo(config, args["seed"], web, flags, environ)
    return _serve(config, web, load)


Loader = Callable[[], tuple[Config, WebConfig | None]]


def _loader(flags: Mapping[str, str], environ: Mapping[str, str], **overrides: Any) -> Loader:
    """What reads the config (flags, environment, files) and the web config: at start and
    at each reload. ConfigError when they do not pass the check."""

    def load() -> tuple[Config, WebConfig | None]:
        try:
            config = load_config(flags, environ)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if overrides:
            config = dataclasses.replace(config, **overrides)
        web = load_web_config(config.web_config_file) if config.web_config_file else None
        return config, web

    return load


def _serve(config: Config, web: WebConfig | None, load: Loader, announce: str | None = None) -> int:
    raise_open_files_limit()
    return asyncio.run(_serve_until_stopped(config, web, load, announce))


async def _serve_until_stopped(
    config: Config, web: WebConfig | None, load: Loader, announce: str | None
) -> int:
    exporter = Exporter(config)
    server = MetricsServer(exporter, config.web_listen_address, web, load=load)
    try:
        await server.start()
    except OSError as error:
        await exporter.close()
        print(
            f"{PROG}: cannot listen on {config.web_listen_address}: {error.strerror}",
            file=sys.stderr,
        )
        return 1
    await exporter.start()
    # What start-up made (modules, classes, the config) lasts as long as the process: kept
    # out of the collector's passes, each pass visits only what came later. Under a flood
    # of connections a full pass then stalls every scrape for less. (A start-up object a
    # reload drops is still freed by its reference count; one in a reference cycle stays,
    # once, as only start-up's objects are frozen.)
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(server))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info(
        "listening",
        extra={
            "address": server.url,
            "api_url": source_of(config.targets[0]),
            "targets": ",".join(target.name for target in config.targets),
            "version": __version__,
        },
    )
    if announce:
        print(announce.format(url=server.url), flush=True)
    await stop.wait()
    log.info("shutting down")
    await server.close()
    await exporter.close()
    return 0


async def _reload(server: MetricsServer) -> None:
    """SIGHUP: the new config, or (logged by the server) the old one keeps serving."""
    with contextlib.suppress(ConfigError):
        await server.reload()


def raise_open_files_limit() -> None:
    """Raise the open-files soft limit to the hard one, as Go programs do at start: a
    container's default soft limit of 1,024 would otherwise cap the connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _check(config: Config, name: str | None) -> int:
    names = [target.name for target in config.targets]
    if name is not None and name not in names:
        print(
            f"{PROG} check: no target {name!r}; the targets are {', '.join(names)}", file=sys.stderr
        )
        return 2
    target = next(t for t in config.targets if t.name == (name or names[0]))
    if target.url is None:
        return _check_redis_only(config, target)
    try:
        stats = parse_stats(asyncio.run(_fetch_once(target)).body, config.limits)
    except (FetchError, ParseError) as error:
        print(f"{PROG} check: {error.reason}: {error}", file=sys.stderr)
        return 1
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    schedules = CronSchedules(config.cron_timezone)
    sys.stdout.write(render_card(stats, time.time(), schedules, redact_url(target.url), color))
    redis_usable = _check_redis(target) if target.redis is not None else True
    return 1 if stats.invalid or not redis_usable else 0


async def _fetch_once(target: Target) -> Fetched:
    client = StatsClient(target)
    try:
        return await client.fetch(target.timeout)
    finally:
        await client.close()


def _read_redis(read: Coroutine[Any, Any, _T], failed: str) -> _T | None:
    """What `read` returns from a Redis source; None, with one line on stderr (`failed`,
    then why), when the source cannot be read."""
    from redis.exceptions import RedisError

    try:
        return asyncio.run(read)
    except (RedisError, OSError) as error:
        text = str(error).strip() or "no answer in time"
        print(f"{PROG} check: {failed}: {type(error).__name__}: {text}", file=sys.stderr)
        return None


def _check_redis_only(config: Config, target: Target) -> int:
    """The card of a target without a stats API, read once from its Redis source."""
    from .bullmq import read_card, where

    assert target.redis is not None
    source = target.redis
    stats = _read_redis(
        read_card(source, target.timeout, config.limits), f"connect: {where(source)}"
    )
    if stats is None:
        return 1
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    schedules = CronSchedules(config.cron_timezone)
    sys.stdout.write(render_card(stats, time.time(), schedules, where(source), color))
    return 1 if stats.invalid else 0


def _check_redis(target: Target) -> bool:
    """One line on the target's Redis source: its queues, or why it cannot be read."""
    from .bullmq import check_source, where

    assert target.redis is not None
    source = target.redis
    queues = _read_redis(
        check_source(source, target.timeout), f"Redis source {where(source)}: unavailable"
    )
    if queues is None:
        return False
    shown = ", ".join(source.label(name) for name in queues) or "none"
    print(
        f"Redis source {where(source)}: reachable; {len(queues)} BullMQ queues under prefix"
        f" {source.prefix!r}: {shown}"
    )
    return True


def _healthcheck(config: Config, web: WebConfig | None) -> int:
    host, port = parse_listen_address(config.web_listen_address)
    # An exporter listening on every interface answers on the loopback too.
    host = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    scheme = "https" if web is not None and web.tls else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/-/healthy"
    # This asks our own process on the loopback: its certificate need not name the address.
    context = ssl._create_unverified_context() if scheme == "https" else None
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            healthy = response.status == 200
    except OSError as error:
        print(f"{PROG} healthcheck: {url}: {error}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


def _start_simulator(address: str, seed: int) -> tuple[object, str]:
    from .demo import Simulation, make_simulator_server

    server = make_simulator_server(
        parse_listen_address(address), Simulation(seed=seed, start=time.time() - SIMULATION_WARM_UP)
    )
    threading.Thread(target=server.serve_forever, name="simulator", daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host!s}:{port}/api/jobs/stats"


def _simulate(address: str, seed: int) -> int:
    try:
        _server, url = _start_simulator(address, seed)
    except OSError as error:
        print(f"{PROG}: cannot listen on {address}: {error.strerror}", file=sys.stderr)
        return 1
    _stop_on_sigterm()
    print(f"simulated stats API at {url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0


def _demo(
    config: Config,
    seed: int,
    web: WebConfig | None,
    flags: Mapping[str, str],
    environ: Mapping[str, str],
) -> int:
    _server, url = _start_simulator("127.0.0.1:0", seed)
    print(f"demo: simulated stats API at {url}", flush=True)
    demo_config = dataclasses.replace(config, api_url=url)
    return _serve(
        demo_config,
        web,
        _loader(flags, environ, api_url=url),
        announce="demo: exporter at {url}/metrics (Ctrl-C stops)",
    )


def _stop_on_sigterm() -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def main_entry() -> NoReturn:
    """The console script: `main()` with the process's arguments and environment."""
    sys.exit(main())
