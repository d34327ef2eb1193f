"""Help texts that list a registry's choices (Registry.help()), filled in when a help page is drawn.

The registries live in the layers that implement the choices: models, the kernel's derivative
modes, the estimator's optimizers, the batch systems, the simulation designs. Importing those
loads numpy, scipy and the kernel, which `estpipe --help` and the commands that do not use them
should not wait for (measured: `estpipe --help` 0.29 s, 0.75 s with every registry imported). So
a help text names its registry, as `{estpipe.models:MODELS}`, and `Command`, the class of every
estpipe command, puts that registry's help() there just before click draws the page.
"""

from __future__ import annotations

import importlib
import re

import typer.core

_REGISTRY = re.compile(r"\{([\w.]+):(\w+)\}")


def fill(text: str | None) -> str | None:
    """`text` with each `{module:NAME}` replaced by that registry's help()."""
    if not text:
        return text
    return _REGISTRY.sub(lambda m: getattr(importlib.import_module(m[1]), m[2]).help(), text)


class Command(typer.core.TyperCommand):
    """A Typer command whose help texts may name registries (see the module's docstring)."""

    def format_help(self, ctx, formatter) -> None:
        self.help, self.epilog = fill(self.help), fill(self.epilog)
        for param in self.params:
            if getattr(param, "help", None):
                param.help = fill(param.help)
        super().format_help(ctx, formatter)
