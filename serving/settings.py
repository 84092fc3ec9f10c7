"""Server configuration, read once from environment variables (never from a request).

The variables, their defaults and meanings: docs/http-api.md, "Configuration".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from seg.errors import SegError
from seg.inference.runtime import BUNDLED_MODEL, PRECISIONS
from seg.inference.tiling import MIN_TILE

BODY_GRACE = 10.0  # seconds a body may take before SEG_MIN_BODY_RATE applies


@dataclass(frozen=True)
class Settings:
    model: Path = BUNDLED_MODEL
    device: str = "auto"
    precision: str = "auto"
    api_key: str | None = None
    max_bytes: int = 128 << 20
    max_pixels: int = 100_000_000
    max_side: int = 65536
    max_decode_bytes: int = 512 << 20  # 100 MP of 8-bit RGBA fit, 100 MP of 16-bit RGB(A) do not
    max_tile: int = 1024
    timeout: float = 300.0
    concurrency: int = 32
    workers: int = 1
    header_timeout: float = 60.0  # seconds a new connection has to send its request headers (nginx's client_header_timeout)
    body_timeout: float = 60.0  # most seconds between two reads of a request body (nginx's client_body_timeout)
    min_body_rate: int = 65536  # bytes/s a body must average once it has taken BODY_GRACE seconds
    job_dir: Path = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "seg" / "jobs"
    job_ttl: float = 86400.0  # seconds an ended job and its result are kept
    job_queue: int = 16  # jobs queued or running at once
    job_max_pixels: int = 4_000_000_000
    job_max_bytes: int = 4 << 30

    @property
    def upload_seconds(self) -> float:
        """The longest a body of max_bytes may take to arrive at the slowest rate allowed."""
        return BODY_GRACE + self.max_bytes / self.min_body_rate

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """Settings from SEG_* variables; SegError names a variable that does not parse."""

        def number(name: str, kind: type, default, low) -> int | float:
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                value = kind(text)
            except ValueError:
                raise SegError(f"{name}={text!r}: expected a number") from None
            if value < low:
                raise SegError(f"{name}={text!r}: must be at least {low}")
            return value

        precision = env.get("SEG_PRECISION") or "auto"
        if precision not in PRECISIONS:
            raise SegError(f"SEG_PRECISION={precision!r}: choose one of {', '.join(PRECISIONS)}")
        return cls(
            model=Path(env.get("SEG_MODEL") or BUNDLED_MODEL),
            device=env.get("SEG_DEVICE") or "auto",
            precision=precision,
            api_key=env.get("SEG_API_KEY") or None,
            max_bytes=number("SEG_MAX_BYTES", int, cls.max_bytes, 1),
            max_pixels=number("SEG_MAX_PIXELS", int, cls.max_pixels, 1),
            max_side=number("SEG_MAX_SIDE", int, cls.max_side, 1),
            max_decode_bytes=number("SEG_MAX_DECODE_BYTES", int, cls.max_decode_bytes, 1),
            max_tile=number("SEG_MAX_TILE", int, cls.max_tile, MIN_TILE),
            timeout=number("SEG_TIMEOUT", float, cls.timeout, 0.1),
            concurrency=number("SEG_CONCURRENCY", int, cls.concurrency, 1),
            workers=number("SEG_WORKERS", int, cls.workers, 1),
            header_timeout=number("SEG_HEADER_TIMEOUT", float, cls.header_timeout, 0.1),
            body_timeout=number("SEG_BODY_TIMEOUT", float, cls.body_timeout, 0.1),
            min_body_rate=number("SEG_MIN_BODY_RATE", int, cls.min_body_rate, 1),
            job_dir=Path(env.get("SEG_JOB_DIR") or cls.job_dir),
            job_ttl=number("SEG_JOB_TTL", float, cls.job_ttl, 0.0),
            job_queue=number("SEG_JOB_QUEUE", int, cls.job_queue, 1),
            job_max_pixels=number("SEG_JOB_MAX_PIXELS", int, cls.job_max_pixels, 1),
            job_max_bytes=number("SEG_JOB_MAX_BYTES", int, cls.job_max_bytes, 1),
        )
