"""Estimates of memory before a large allocation: refuse with the numbers instead of a MemoryError."""

from __future__ import annotations

import os

from .errors import InputError

__all__ = ["available_memory_bytes", "check_memory", "format_bytes"]


def available_memory_bytes() -> int:
    """Memory this process may still use: ``MemAvailable`` (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 2**63


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def check_memory(n_bytes: float, what: str, advice: str = "", *, per_item_bytes: float | None = None,
                 items: str = "") -> None:
    """An :class:`InputError` naming ``what`` (the cause) if ``n_bytes`` exceed the memory available now,
    followed by ``advice``; with ``per_item_bytes``, also how many ``items`` would fit."""
    available = available_memory_bytes()
    if n_bytes > available:
        fits = f"; about {int(available // per_item_bytes):,} {items} would fit" if per_item_bytes else ""
        raise InputError(f"{what} would need about {format_bytes(n_bytes)} of memory, more than the "
                         f"{format_bytes(available)} available{fits}" + (f"; {advice}" if advice else ""))
