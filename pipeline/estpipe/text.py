"""Words in messages: counts ("1 evaluation", "2 evaluations") and alternatives ("a, b or c")."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None, thousands: bool = False) -> str:
    """n and the noun, singular for n == 1 (plural: the plural when it is not noun + "s";
    thousands: 1,000 separators)."""
    number = f"{n:,}" if thousands else f"{n}"
    return f"{number} {noun if n == 1 else (plural or noun + 's')}"


def either(words) -> str:
    """'a', 'a or b', 'a, b or c'."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
