"""Dependency analysis: tracing, channel propagation by registered rules, coupled groups."""

from . import rules  # noqa: F401 - registers the built-in operation rules
