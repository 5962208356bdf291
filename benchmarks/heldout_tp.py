"""A held-out CNN, pruned by this toolkit and by Torch-Pruning, each compared with the network it
claims to compute.

The network was written for this comparison and is in no test of either tool: a residual addition, a
concatenation of two branches, a grouped convolution and a channel shuffle (ShuffleNet's
``view -> transpose -> reshape``). Both tools remove 30% of every prunable group (this toolkit at
random, as ``check`` does; Torch-Pruning by L2 magnitude, its default), on the same random weights.

What each pruned network is compared with:
* this toolkit: the gated network with the same keep-mask (``check``'s proof);
* Torch-Pruning: the *masked original*, the unpruned network in which every channel Torch-Pruning
  removed is set to zero at the output of each layer it cut (forward hooks with the indices of every
  ``prune_out_channels`` step of its groups). A correct structural pruning computes exactly that.

Output: the largest absolute difference on random inputs against the output scale, and the share
of parameters kept. ``python benchmarks/heldout_tp.py --out benchmarks/results/heldout_tp/cpu``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform

import torch
from torch import nn


class HeldOut(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.left = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    @staticmethod
    def shuffle(x: torch.Tensor, groups: int = 4) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = self.shuffle(self.grouped(x))
        x = self.mix(x)
        return self.head(x.mean((2, 3)))


def toolkit(net: nn.Module, shape, seed: int) -> dict:
    from bmrs_surgery.check import check_model

    res = check_model(copy.deepcopy(net), (2,) + shape, ratio=0.3, onnx=False, seed=seed, keep_weights=True)
    return {"ok": res.ok, "stages": res.stages, "max_abs_diff": res.max_abs_diff, "output_scale": res.output_scale,
            "params_ratio": res.params_after / res.params_before if res.params_after else None}


def pruned_by_torch_pruning(net: nn.Module, shape, inputs: list[torch.Tensor]) -> dict:
    import torch_pruning as tp

    model = copy.deepcopy(net).eval()
    reference = copy.deepcopy(net).eval()
    n0 = sum(p.numel() for p in model.parameters())
    cut: dict[str, set[int]] = {}
    names = {m: n for n, m in model.named_modules()}
    try:
        pruner = tp.pruner.MagnitudePruner(model, torch.randn((1,) + shape), importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.3, ignored_layers=[model.head])
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                if getattr(dep.handler, "__name__", "") == "prune_out_channels":
                    name = names.get(dep.target.module)
                    if name is not None:
                        cut.setdefault(name, set()).update(int(i) for i in idxs)
            group.prune()
    except Exception as exc:  # noqa: BLE001 - reported
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    hooks = []
    for name, idx in cut.items():  # the masked original: each cut channel zero where its layer writes it
        index = torch.tensor(sorted(idx))

        def zero(mod, args, out, index=index):
            out = out.clone()
            out[:, index] = 0
            return out
        hooks.append(reference.get_submodule(name).register_forward_hook(zero))
    with torch.no_grad():
        ref = [reference(x) for x in inputs]
        try:
            got = [model(x) for x in inputs]
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "error": f"pruned network fails to run: {type(exc).__name__}"}
    for h in hooks:
        h.remove()
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    scale = max(float(a.abs().max()) for a in ref)
    return {"ok": diff <= 1e-4 * scale, "max_abs_diff": diff, "output_scale": scale,
            "params_ratio": sum(p.numel() for p in model.parameters()) / n0,
            "layers_cut": sorted(cut)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/heldout_tp/cpu")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    import torch_pruning as tp

    from bmrs_surgery.check import randomized_copy

    shape = (3, 32, 32)
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        net = randomized_copy(HeldOut().eval(), torch.Generator().manual_seed(seed)).eval()
        inputs = [torch.randn((4,) + shape, generator=torch.Generator().manual_seed(100 + seed)) for _ in range(2)]
        rows.append({"seed": seed, "toolkit": toolkit(net, shape, seed), "torch_pruning": pruned_by_torch_pruning(net, shape, inputs)})
        print(json.dumps(rows[-1], default=str), flush=True)
    doc = {"command": "python benchmarks/heldout_tp.py --out " + args.out + (f" --seeds {args.seeds}" if args.seeds != 3 else ""),
           "torch": torch.__version__, "torch_pruning": tp.__version__, "machine": platform.platform(),
           "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    lines = [f"Command: `{doc['command']}` (torch {doc['torch']}, Torch-Pruning {doc['torch_pruning']})", "",
             "| seed | tool | pruned network equals what it claims | max abs diff | output scale | parameters kept |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for tool, label in (("toolkit", "bmrs-surgery (vs gated)"), ("torch_pruning", "Torch-Pruning (vs masked original)")):
            x = r[tool]
            if x.get("max_abs_diff") is None:
                lines.append(f"| {r['seed']} | {label} | no: {x.get('error') or x.get('stages')} | | | |")
                continue
            lines.append(f"| {r['seed']} | {label} | {'yes' if x['ok'] else 'no'} | {x['max_abs_diff']:.3g} | "
                         f"{x['output_scale']:.3g} | {x['params_ratio']:.3f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
