"""Post-training sweep: remove structures in score order at K compression levels, per criterion.

The paper's Figure 2 as a feature: for BMRS_N, BMRS_U, SNR and L2 the structures are ranked
(highest dF, lowest SNR, smallest incoming L2 first) and removed from the fitted gated model in that
order; at each level the parameter compression (as the paper counts it) and the accuracy are
measured, optionally after a short fine-tune with the masks frozen. BMRS's own stopping point
(prune where dF >= 0) is marked, and the knee of each curve is found (the point farthest above
the chord from the first to the last level), so the distance between the two can be read off.
"""

from __future__ import annotations

import copy

import torch

from .accounting import compression
from .criteria import decide, incoming_l2
from .fit import FitConfig, accuracy, fit
from .gated import gate_bank, network
from .plan import plan_keep

SWEEP_CRITERIA = ("bmrs_n", "bmrs_u", "snr", "l2")


def ranking(gated, criterion: str, precision_bits: int = 8) -> torch.Tensor:
    """Structure indices, first to remove first."""
    bank = gate_bank(gated)
    if criterion == "l2":
        return torch.argsort(incoming_l2(network(gated), bank), stable=True)
    dec = decide(network(gated), bank, criterion, precision_bits=precision_bits)
    score = dec.score
    return torch.argsort(-score if criterion.startswith("bmrs") else score, stable=True)


def knee(points: list[dict]) -> dict | None:
    """The point of an accuracy-compression curve farthest above its end-to-end chord."""
    if len(points) < 3:
        return None
    xs = [p["compression"] for p in points]
    ys = [p["accuracy"] for p in points]
    x0, y0, x1, y1 = xs[0], ys[0], xs[-1], ys[-1]
    dx, dy = x1 - x0, y1 - y0
    norm = (dx * dx + dy * dy) ** 0.5 or 1.0
    dist = [((x - x0) * dy - (y - y0) * dx) / norm for x, y in zip(xs, ys)]
    best = max(range(len(points)), key=lambda i: -dist[i])  # above the chord: negative cross product
    return dict(points[best])


def sweep(gated, data, criteria=SWEEP_CRITERIA, levels: int = 10, finetune_epochs: int = 0,
          precision_bits: int = 8, cfg: FitConfig | None = None, split: str = "test", progress=None) -> dict:
    """Accuracy against compression for each criterion at ``levels`` levels; ``progress(text)``, if
    given, is called after every point (the CLI prints it)."""
    bank = gate_bank(gated)
    net = network(gated)
    evalset = getattr(data, split)
    saved_mask = bank.mask.clone()
    n = bank.num_gates
    fractions = [i / levels for i in range(levels)] + [1.0]
    curves: dict[str, list[dict]] = {}
    try:
        for crit in criteria:
            order = ranking(gated, crit, precision_bits)
            pts = []
            for f in fractions:
                keep = torch.ones(n, dtype=torch.bool)
                keep[order[: int(round(f * n))]] = False
                keep = plan_keep(bank, keep)  # a group keeps at least one structure
                model = gated
                if finetune_epochs:
                    model = copy.deepcopy(gated)
                    gate_bank(model).mask.copy_(keep.float())
                    c = copy.copy(cfg or FitConfig())
                    c.epochs, c.finetune_epochs = 0, finetune_epochs
                    fit(model, data, c)
                    model.to("cpu")
                else:
                    with torch.no_grad():
                        bank.mask.copy_(keep.float())
                pts.append({"fraction_removed": 1.0 - float(keep.float().mean()),
                            "compression": compression(net, bank, keep).ratio,
                            "accuracy": accuracy(model, evalset)})
                if progress is not None:
                    p = pts[-1]
                    progress(f"sweep {crit} {len(pts)}/{len(fractions)}: compression {p['compression']:.1%}, "
                             f"accuracy {p['accuracy']:.4f}")
            curves[crit] = pts
        stop = None
        for crit in ("bmrs_u", "bmrs_n"):
            if crit in criteria:
                dec = decide(net, bank, crit, precision_bits=precision_bits)
                keep = plan_keep(bank, dec.keep, dec.score)
                with torch.no_grad():
                    bank.mask.copy_(keep.float())
                stop = {"criterion": dec.criterion, "compression": compression(net, bank, keep).ratio,
                        "accuracy": accuracy(gated, evalset)}
                break
    finally:
        with torch.no_grad():
            bank.mask.copy_(saved_mask)
    knees = {c: knee(p) for c, p in curves.items()}
    result = {"levels": levels, "finetune_epochs": finetune_epochs, "split": split, "curves": curves,
              "knees": knees, "bmrs_stop": stop}
    if stop is not None:
        ref = knees.get("bmrs_u") or knees.get("bmrs_n")
        if ref:
            result["stop_minus_knee"] = {"compression_points": 100 * (stop["compression"] - ref["compression"]),
                                         "accuracy_points": 100 * (stop["accuracy"] - ref["accuracy"])}
    return result
