"""Generation: showers from a trained model in any geometry, in batches, seeded, digitised."""

from __future__ import annotations

from .generator import iter_generate

__all__ = ["iter_generate"]
