"""A list of choices (models, optimizers, derivative modes, designs, back ends), owned by the
layer that implements them; help texts, job-spec checks and error messages read it from there.

    OPTIMIZERS = Registry("optimizer", [GaussNewton(), Bfgs(), Lbfgsb()])
    OPTIMIZERS.get("bfgs")          the entry, or a UserError listing the allowed names
    OPTIMIZERS.names                ("gauss-newton", "bfgs", "l-bfgs-b")
    OPTIMIZERS.help()               "gauss-newton (...), bfgs (...) or l-bfgs-b (...)"

An entry is any object with a `name` and a one-line `description` (a `Choice` when that is all
there is to it).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Generic, Iterable, Iterator, TypeVar

from estpipe.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Choice:
    """An entry that is only a name and what it means."""

    name: str
    description: str = ""


def did_you_mean(word, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the choice closest to `word`, or '' when none is close."""
    guess = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {guess[0]!r}?)" if guess else ""


class Registry(Generic[T]):
    def __init__(self, what: str, entries: Iterable[T], argument: str | None = None):
        """what: the kind of choice ("optimizer"); argument: the API argument that takes it
        (default: `what`), named in messages."""
        self.what = what
        self.argument = argument or what
        self._entries: dict[str, T] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: T) -> T:
        name = getattr(entry, "name")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def values(self) -> list[T]:
        return list(self._entries.values())

    def problem(self, name) -> str | None:
        """Why `name` is not a choice (one line, with the allowed ones and a guess), or None."""
        if name in self:
            return None
        return f"unknown {self.what} {name!r}; allowed: {', '.join(self.names)}{did_you_mean(name, self.names)}"

    def get(self, name: str) -> T:
        problem = self.problem(name)
        if problem is not None:
            raise UserError(problem)
        return self._entries[name]

    def help(self) -> str:
        """'a (what a does), b (what b does) or c (...)' for --help texts."""
        parts = [f"{name} ({getattr(e, 'description', '')})" if getattr(e, "description", "") else name
                 for name, e in self._entries.items()]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
