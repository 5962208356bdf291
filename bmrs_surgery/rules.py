"""Operation rules for your own layers: the public face of :mod:`bmrs_surgery.graph.registry`
(its docstring has a worked example, and docs/rules.md explains the helpers).

    from bmrs_surgery import rules

    @rules.register_module(MyLayer)
    class MyLayerRule(rules.ModuleRule):
        def propagate(self, ctx, node, module, x): ...
        def resize(self, module): ...
        def fold(self, module, factor): ...
"""

from .graph.labels import Label, fixed
from .graph.registry import (
    ModuleRule,
    function_rule,
    function_rules,
    module_rule,
    module_rules,
    register_function,
    register_module,
    unregister_module,
)

__all__ = [
    "Label", "ModuleRule", "fixed", "function_rule", "function_rules", "module_rule", "module_rules",
    "register_function", "register_module", "unregister_module",
]
