"""The registry of operation rules: one place per layer or operation kind.

A *module rule* says, for one kind of layer, everything the toolkit needs to know about it:

* ``propagate(ctx, node, module, x)``: how channels flow through the layer during analysis (which
  parameter dimensions follow which channels, where a gate can read them); returns the output's
  :class:`~bmrs_surgery.graph.labels.Label`;
* ``resize(module)``: after surgery sliced its parameters, make its size attributes agree
  (``in_features``, ``out_channels``, ``num_features``...);
* ``fold(module, factor)``: multiply a gate's value, one factor per input channel, into the layer's
  weights (only layers that read channels through their weights, i.e. that hold gates, need it);
* ``freeze(module)`` (optional): a plainer equivalent layer swapped in before surgery, for a layer
  whose parameters cannot be sliced exactly as they are (weight standardisation).

A *function rule* is ``rule(ctx, node) -> Label`` for a ``call_function`` / ``call_method`` node
(``torch.cat``, ``x.view``, ``F.batch_norm`` ...), registered under the operation's name.
``ctx`` is the running :class:`~bmrs_surgery.graph.propagate.Propagator`; its helpers
(``label``, ``block``, ``channelwise``, ``dense``, ``opaque`` ...) are what rules are written with.
An operation without a rule keeps every channel it touches: always safe, only less compressed.

A layer with a module rule is traced as one call (a leaf), also when it is a subclass of a
registered type that keeps the registered type's ``forward``.

Worked example: a layer of your own that scales each channel by a learned factor::

    import torch
    from torch import nn
    from bmrs_surgery import rules

    class ChannelScale(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))

        def forward(self, x):                       # x: (batch, channels, height, width)
            return x * self.weight[:, None, None]

    @rules.register_module(ChannelScale)
    class ChannelScaleRule(rules.ModuleRule):
        def propagate(self, ctx, node, module, x):
            # ``weight`` entry c belongs to channel c on axis 1: it is sliced with the channel
            return ctx.channelwise(node, x, ("weight",), axis=1)

        def resize(self, module):
            pass                                    # no size attribute to update

Now a channel removed before the layer also removes its ``weight`` entry, and ``check`` proves it.
A layer that mixes channels through a weight matrix (like ``nn.Linear``) is written with
``ctx.dense`` and needs ``fold`` (see :mod:`bmrs_surgery.graph.rules.layers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ModuleRule:
    """Base class of module rules (see the module docstring)."""

    #: ``propagate`` is only called with a labelled input (else the call is opaque: channels kept)
    needs_input: bool = True

    def propagate(self, ctx, node, module: nn.Module, x):
        raise NotImplementedError

    def resize(self, module: nn.Module) -> None:
        """Size attributes after slicing; nothing to do for layers that have none."""

    def fold(self, module: nn.Module, factor: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(module).__name__} reads channels but its rule has no fold")

    def width(self, module: nn.Module) -> int | None:
        """The channel count a rule's :meth:`rescale` needs from before slicing (None: no rescale)."""
        return None

    def freeze(self, module: nn.Module) -> nn.Module | None:
        """Before surgery: a plainer layer that computes exactly what ``module`` computes and whose
        rule can fold and slice it (a weight-standardised convolution as a plain convolution with
        its standardised weight), or None to keep ``module`` as it is."""
        return None

    def rescale(self, module: nn.Module, width: int) -> None:
        """After slicing: make the layer compute on its kept channels what it computed on ``width``
        (a norm over channels whose removed channels were zero)."""


_MODULE_RULES: dict[type, ModuleRule] = {}
_FUNCTION_RULES: dict[str, Callable] = {}


def register_module(*types: type, replace: bool = False):
    """Class decorator: ``@register_module(nn.Linear)`` over a :class:`ModuleRule` subclass (or call
    it with an instance). ``replace=True`` overrides an existing rule for the same type."""

    def deco(rule):
        instance = rule() if isinstance(rule, type) else rule
        if not isinstance(instance, ModuleRule):
            raise TypeError(f"{rule!r} is not a ModuleRule")
        for t in types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(f"register_module: {t!r} is not an nn.Module class")
            if t in _MODULE_RULES and not replace:
                raise ValueError(f"{t.__name__} already has a rule ({type(_MODULE_RULES[t]).__name__}); "
                                 "pass replace=True to override it")
            _MODULE_RULES[t] = instance
        return rule

    return deco


def register_function(*names: str, replace: bool = False):
    """Decorator: ``@register_function("cat", "concat")`` over ``rule(ctx, node) -> Label``."""

    def deco(fn: Callable):
        for name in names:
            if name in _FUNCTION_RULES and not replace:
                raise ValueError(f"operation {name!r} already has a rule ({_FUNCTION_RULES[name].__name__}); "
                                 "pass replace=True to override it")
            _FUNCTION_RULES[name] = fn
        return fn

    return deco


def unregister_module(t: type) -> None:
    _MODULE_RULES.pop(t, None)


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule for ``module``: its type's, or that of the nearest registered base class whose
    ``forward`` it keeps (a subclass with its own forward computes something else)."""
    cls = type(module)
    for base in cls.__mro__:
        rule = _MODULE_RULES.get(base)
        if rule is not None:
            return rule if base is cls or cls.forward is base.forward else None
    return None


def function_rule(name: str) -> Callable | None:
    return _FUNCTION_RULES.get(name)


def module_rules() -> dict[type, ModuleRule]:
    """Every registered module rule (a copy), for listings and tests."""
    _load_builtin()
    return dict(_MODULE_RULES)


def function_rules() -> dict[str, Callable]:
    _load_builtin()
    return dict(_FUNCTION_RULES)


def _load_builtin() -> None:
    from . import rules  # noqa: F401 - registers the built-in rules on import
