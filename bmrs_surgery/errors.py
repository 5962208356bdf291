"""Typed errors: one class per kind of user mistake. The CLI turns each into a one-line message."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


class BmrsError(Exception):
    """Base class of every error a user can cause; the CLI exits with code 2 on these."""


class ModelLoadError(BmrsError):
    """A model name or file that cannot be turned into an nn.Module."""


class DataError(BmrsError):
    """A dataset that is missing, malformed or does not fit the model."""


class GatePlacementError(BmrsError):
    """A model where gates cannot be placed (nothing prunable, unsupported structure)."""


class NoGatesError(BmrsError):
    """An operation that needs gates on a model that has none."""


class GraphError(BmrsError):
    """The model cannot be traced or analysed (names the module and why)."""
