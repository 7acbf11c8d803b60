"""The captured upstream answers (tests/fixtures/samples), for every test to use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).parent / "fixtures" / "samples"


def sample(name: str) -> dict[str, Any]:
    """A captured answer (tests/fixtures/samples/NAME.json) as a dict, to edit freely."""
    document: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    return document


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / f"{name}.json").read_bytes()


def bullmq_capture() -> dict[str, Any]:
    """The captured BullMQ 6.7 Redis: keys, event streams and worker connection names."""
    path = SAMPLES.parent / "bullmq-redis-capture.json"
    document: dict[str, Any] = json.loads(path.read_text())
    return document
