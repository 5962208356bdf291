"""Pruned models a user loads without pickle: a *recipe* (which indices of which parameter
dimensions were kept, group by group) plus the pruned weights in safetensors.

``apply_recipe(model, recipe)`` replays the recipe on a fresh instance of the user's own class:
every recorded parameter dimension is cut to its kept indices (by qualified name), the layers'
size attributes follow (their rules' ``resize``; attention head counts and MLP widths, see
:func:`bmrs_surgery.hf.update_size_attributes`; a cut residual stream rescales its RMSNorms' eps
and sets ``hidden_size``), then the pruned weights are loaded. The result
is the pruned model with its original class and forward. Works for models analysed through
torch.export (see :mod:`bmrs_surgery.graph.export_trace`), whose surgery slices the eager model.

A recipe folder holds ``recipe.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError

FORMAT = "bmrs-surgery/recipe/1"


def make_recipe(analysis, keep: dict[int, np.ndarray], model: nn.Module | None = None) -> dict:
    """The recipe of keep-mask ``keep`` (group id -> kept structures) over ``analysis``: the kept
    structures of each group, and the kept indices of every parameter dimension surgery cuts, in
    the order surgery cuts them."""
    model = analysis.model if model is None else model
    groups = [{"name": g.name, "kind": g.kind, "structures": g.size,
               "kept": np.flatnonzero(np.asarray(keep[g.id], dtype=bool)).tolist()} for g in analysis.groups]
    cuts = []
    for slot in analysis.propagation.slots:
        alive = analysis.kept(slot.ids, keep)
        if alive.all():
            continue
        cuts.append({"target": slot.target, "dim": slot.dim, "size": int(alive.size),
                     "keep": np.flatnonzero(alive).tolist()})
    return {"format": FORMAT, "class": f"{type(model).__module__}.{type(model).__qualname__}", "groups": groups,
            "cuts": cuts}


def _owner(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    module, _, name = target.rpartition(".")
    return (root.get_submodule(module) if module else root), name


def _load(recipe) -> tuple[dict, dict | None]:
    """(recipe dict, weights or None) from a dict or a recipe folder."""
    if isinstance(recipe, dict):
        return recipe, None
    folder = Path(recipe)
    path = folder / "recipe.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no recipe.json (a recipe folder holds recipe.json and model.safetensors)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a recipe ({exc})") from None
    weights = None
    wpath = folder / "model.safetensors"
    if wpath.is_file():
        from safetensors.torch import load_file

        weights = load_file(str(wpath))
    return data, weights


def apply_recipe(model: nn.Module, recipe, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Cut ``model`` (a fresh instance of the pruned model's class, same configuration) as
    ``recipe`` says (a dict from :func:`make_recipe` or a recipe folder) and load the pruned
    ``weights`` (default: the folder's ``model.safetensors``). Changes ``model`` in place and
    returns it; a model the recipe does not fit is refused with the first mismatch named."""
    from .graph import registry
    from .hf import update_size_attributes

    data, stored = _load(recipe)
    if data.get("format") != FORMAT:
        raise ModelLoadError(f"not a bmrs-surgery recipe (format {data.get('format')!r}, expected {FORMAT})")
    weights = stored if weights is None else weights
    registry._load_builtin()
    from .graph.rules import transformers_layers

    transformers_layers.register()
    widths = transformers_layers.stream_norm_widths(model)  # RMSNorms whose stream the recipe may cut
    touched: set[str] = set()
    with torch.no_grad():
        for cut in data["cuts"]:
            try:
                owner, name = _owner(model, cut["target"])
                t = getattr(owner, name)
            except AttributeError:
                raise ModelLoadError(f"the recipe cuts {cut['target']}, which this model does not have") from None
            if t.shape[cut["dim"]] != cut["size"]:
                raise ModelLoadError(f"{cut['target']} has {t.shape[cut['dim']]} entries on dim {cut['dim']}, "
                                     f"the recipe expects {cut['size']}: not the recipe's model")
            idx = torch.as_tensor(cut["keep"], dtype=torch.long, device=t.device)
            new = t.detach().index_select(cut["dim"], idx).clone()
            if isinstance(t, nn.Parameter):
                setattr(owner, name, nn.Parameter(new, requires_grad=t.requires_grad))
            elif name in owner._buffers:
                owner._buffers[name] = new
            else:
                setattr(owner, name, new)
            touched.add(cut["target"].rpartition(".")[0])
    for name in touched:
        mod = model.get_submodule(name) if name else model
        rule = registry.module_rule(mod)
        if rule is not None:
            rule.resize(mod)
    hidden = transformers_layers.rescale_stream_norms(model, widths)  # eps * C/C' (the weights come below)
    if hidden is not None:
        from .hf import update_hidden_size

        update_hidden_size(model, *hidden)
    update_size_attributes(model)
    if weights is not None:
        state = model.state_dict()
        for k, v in weights.items():
            if k in state and tuple(state[k].shape) != tuple(v.shape):
                raise ModelLoadError(f"weight {k} has shape {tuple(v.shape)}, the cut model {tuple(state[k].shape)}")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise ModelLoadError(f"the weights hold {unexpected[0]}, which the model does not have")
        params = {n for n, _ in model.named_parameters()}
        lost = [k for k in missing if k in params]
        if lost:
            raise ModelLoadError(f"the weights lack parameter {lost[0]}")
    model.eval()
    return model


def save_recipe(pruned: nn.Module, recipe: dict, folder: str | Path) -> Path:
    """Write ``recipe.json`` and the pruned weights (``model.safetensors``) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    state = {}
    seen: dict[int, str] = {}
    for k, v in pruned.state_dict().items():
        if v.data_ptr() in seen and v.numel():  # tied weights are stored once (safetensors refuses shared memory)
            continue
        seen[v.data_ptr()] = k
        state[k] = v.detach().contiguous().cpu()
    save_file(state, str(folder / "model.safetensors"))
    return folder
