"""Sample values are written as prometheus_client writes them, without importing it."""

from __future__ import annotations

import math

from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client.utils import floatToGoString

from exporter.exposition import go_float


@given(st.floats() | st.integers(min_value=-(2**63), max_value=2**63))
@example(math.inf)
@example(-math.inf)
@example(math.nan)
@example(9_999_999.0)
@example(10_000_000.0)
@example(12_345_678.5)
@example(1_795_772_160.0)
@example(1e16)
@example(-12_345_678.5)
@example(0.0)
@example(-0.0)
def test_go_float_is_what_prometheus_client_writes(value: float) -> None:
    assert go_float(value) == floatToGoString(value)
