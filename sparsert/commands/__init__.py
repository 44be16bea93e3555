"""One module per CLI command; each defines a click command named ``command``."""

from __future__ import annotations

import click
from click.core import ParameterSource


def option_given(ctx: click.Context, name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or through its environment variable)."""
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
