"""Metric families of one scrape, and the Prometheus text format written directly.

A `Family` holds what prometheus_client would hold, kept lean; `render_text()`
writes byte for byte what prometheus_client's `generate_latest` writes, without
its per-sample cost. Nothing here reads the upstream, Redis or the clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "Family",
    "Histogram",
    "SampleWriter",
    "StaticCollector",
    "go_float",
    "openmetrics",
    "render_chunks",
    "render_text",
    "sample_writers",
    "single",
]


@dataclass(slots=True)
class Family:
    """One metric family of a scrape: gauge, counter or info samples."""

    name: str  # as prometheus_client names it: no `_total` on a counter, no `_info` on info
    help: str
    kind: str  # gauge, counter or info
    labels: tuple[str, ...] = ()
    rows: list[tuple[tuple[str, ...], float]] = field(default_factory=list)
    #: The sample lines, encoded and joined, when the caller kept them rendered (by a
    #: SampleWriter): then they are written as they are, and `rows` is not read.
    text: bytes | bytearray | None = None

    def add(self, values: tuple[str, ...], value: float) -> None:
        self.rows.append((values, value))

    def metric(self) -> Metric:
        """The same family as a prometheus_client Metric, for its encoders."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        if self.text is not None:
            raise ValueError(f"{self.name}: only rendered lines, no rows to encode")
        if self.kind == "info":
            ((values, _),) = self.rows
            return InfoMetricFamily(
                self.name, self.help, value=dict(zip(self.labels, values, strict=True))
            )
        family: Metric
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        else:
            family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for values, value in self.rows:
            family.add_metric(list(values), value)
        return family


@dataclass(slots=True)
class Histogram:
    """One histogram family: per label set, cumulative counts over `bounds`, and the sum."""

    name: str
    help: str
    bounds: tuple[float, ...]  # upper bounds, ascending, without +Inf
    labels: tuple[str, ...] = ()
    #: (label values, cumulative count per bound then +Inf, sum of observations)
    rows: list[tuple[tuple[str, ...], Sequence[int], float]] = field(default_factory=list)

    def add(self, values: tuple[str, ...], cumulative: Sequence[int], total: float) -> None:
        if len(cumulative) != len(self.bounds) + 1:
            raise ValueError(f"{self.name}: expected {len(self.bounds) + 1} bucket counts")
        self.rows.append((values, cumulative, total))

    def metric(self) -> Metric:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        edges = [*map(go_float, self.bounds), "+Inf"]
        for values, cumulative, total in self.rows:
            family.add_metric(list(values), list(zip(edges, cumulative, strict=True)), total)
        return family


def single(name: str, help_text: str, value: float) -> Family:
    """A gauge family of one unlabelled sample."""
    return Family(name, help_text, "gauge", (), [((), value)])


def render_text(families: Sequence[Family | Histogram]) -> str:
    """The families in the Prometheus text format 0.0.4, as generate_latest writes them."""
    return b"".join(render_chunks(families)).decode()


def render_chunks(families: Sequence[Family | Histogram]) -> list[bytes | bytearray]:
    """The same text, encoded one family at a time.

    Only one family's lines exist as strings at once: a large scrape's peak memory is
    the encoded answer and one family, not every line, their join and its encoding.
    """
    return [chunk.encode() if isinstance(chunk, str) else chunk for chunk in _rendered(families)]


class SampleWriter:
    """Writes one family's sample lines, one at a time, as render_text would."""

    def __init__(self, family: Family, escape: Callable[[str], str] | None = None) -> None:
        self._template = _template(_sample_name(family), family.labels)
        self._escape = escape or _escaper()

    def line(self, values: tuple[str, ...], value: float) -> str:
        return self._template.format(*map(self._escape, values), _number(value))

    def lines(self, rows: Sequence[tuple[tuple[str, ...], float]]) -> bytes:
        """The sample lines of `rows`, encoded."""
        return "".join([self.line(*row) for row in rows]).encode()


def sample_writers(families: Sequence[Family]) -> list[SampleWriter]:
    """A writer per family, sharing one memo of escaped label values."""
    escape = _escaper()
    return [SampleWriter(family, escape) for family in families]


def _sample_name(family: Family) -> str:
    if family.kind == "counter":
        return family.name + "_total"
    if family.kind == "info":
        return family.name + "_info"
    return family.name


def _escaper() -> Callable[[str], str]:
    """Label values escaped once per distinct value: a queue's name is in many samples.

    A closure over a dict, not an object: it is called for every label of every sample.
    """
    done: dict[str, str] = {}

    def escape(raw: str) -> str:
        text = done.get(raw)
        if text is None:
            text = done[raw] = raw.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
        return text

    return escape


@functools.lru_cache(maxsize=1024)
def _template(name: str, keys: tuple[str, ...]) -> str:
    """`name{a="{0}",b="{1}"} {2}\\n`, labels sorted by name as prometheus_client writes them:
    each sample then costs one format call."""
    count = len(keys)
    if not count:
        return f"{name} {{0}}\n"
    pairs = ",".join(f'{keys[i]}="{{{i}}}"' for i in sorted(range(count), key=keys.__getitem__))
    return f"{name}{{{{{pairs}}}}} {{{count}}}\n"


@functools.lru_cache(maxsize=1024)
def _header(name: str, help_text: str, kind: str) -> str:
    help_text = help_text.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _rendered(families: Sequence[Family | Histogram]) -> Iterator[str | bytes | bytearray]:
    escape = _escaper()
    for family in families:
        if isinstance(family, Histogram):
            yield _rendered_histogram(family, escape)
            continue
        name = _sample_name(family)
        lines = [_header(name, family.help, "counter" if family.kind == "counter" else "gauge")]
        if family.text is not None:
            # Encoded already: written as it is, never copied into one more buffer.
            yield lines[0].encode()
            yield family.text
            continue
        if not family.labels:
            lines.extend(f"{name} {_number(value)}\n" for _, value in family.rows)
            yield "".join(lines)
            continue
        template = _template(name, family.labels)
        for values, value in family.rows:
            lines.append(template.format(*map(escape, values), _number(value)))
        yield "".join(lines)


def _rendered_histogram(family: Histogram, escape: Callable[[str], str]) -> str:
    name = family.name
    lines = [_header(name, family.help, "histogram")]
    bucket = _template(f"{name}_bucket", (*family.labels, "le"))
    count = _template(f"{name}_count", family.labels)
    total = _template(f"{name}_sum", family.labels)
    edges = [*map(go_float, family.bounds), "+Inf"]
    for values, cumulative, observed in family.rows:
        shown = [escape(value) for value in values]
        for edge, number in zip(edges, cumulative, strict=True):
            lines.append(bucket.format(*shown, edge, _number(number)))
        lines.append(count.format(*shown, _number(cumulative[-1])))
        lines.append(total.format(*shown, _number(observed)))
    return "".join(lines)


def _number(value: float) -> str:
    # go_float's result for a small whole number, without its float round trip.
    if type(value) is int and -1_000_000 < value < 1_000_000:
        return f"{value}.0"
    return go_float(value)


def go_float(value: float) -> str:
    """A sample value as the Prometheus clients write it (prometheus_client's
    floatToGoString): Python's shortest repr, but an exponent from 10 million up, as Go."""
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    text = repr(number)
    point = text.find(".")
    if number > 0 and point > 6:
        # 12345678.5 -> 1.23456785e+07: every digit after the first moves behind the point.
        digits = (text[1:point] + text[point + 1 :]).rstrip("0")
        mantissa = f"{text[0]}.{digits}".rstrip(".")
        return f"{mantissa}e+{point - 1:02d}"
    return text


class StaticCollector:
    """Families built already, as a prometheus_client collector (for its encoders)."""

    def __init__(self, families: Sequence[Family | Histogram]) -> None:
        self._metrics = [family.metric() for family in families]

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def openmetrics(families: Sequence[Family | Histogram], accept: str) -> tuple[bytes, str]:
    """The families in the format `accept` asks for, by prometheus_client's encoders, and
    its content type. prometheus_client is imported here, for the clients that ask."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector(families))
    return encoder(registry), content_type
