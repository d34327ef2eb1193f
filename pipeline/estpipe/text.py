"""Counts in messages: "1 evaluation", "2 evaluations"."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None, thousands: bool = False) -> str:
    """n and the noun, singular for n == 1 (plural: the plural when it is not noun + "s";
    thousands: 1,000 separators)."""
    number = f"{n:,}" if thousands else f"{n}"
    return f"{number} {noun if n == 1 else (plural or noun + 's')}"
