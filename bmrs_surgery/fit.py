"""The fitting loop: weights and gate posteriors on the negative ELBO, two pruning modes.

* post-training: fit for ``epochs``, score once and mask every structure with dF >= 0, then
  fine-tune ``finetune_epochs`` with the masks frozen;
* continuous: re-score every ``prune_every`` epochs while fitting (masks are recomputed from the
  current posterior each time, not accumulated), then fine-tune with the masks frozen.

Loss per step = mean cross-entropy + kl_scale * warm-up(epoch) * KL term, where the KL term is the
mean KL over structures (``kl_weighting="mean"``) or summed KL / training-set size ("elbo"). Token
data without labels replaces the cross entropy by the mean distillation loss to the original
network's outputs (distill.OutputDistiller, the teacher given to fit), on the same per-example
scale, and measures the validation split by the mean cosine to those outputs instead of accuracy.
The loop reports through an optional ``reporter`` (see :mod:`progress`); it never prints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import defaults
from .accounting import compression
from .criteria import CRITERIA, Decision, PruneResult, apply_decision, criterion_for, decision
from .data import DataSplits, eval_batch_size, split_batches
from .distill import SCHEDULES, Distiller, OutputDistiller, cosine_factor, forward, mean_cosine, outputs_on
from .errors import DataError, FitError, JobError
from .gated import KL_WEIGHTINGS, gate_bank, kl_term, network
from .settling import SettleState, observe, summary

MODES = ("post-training", "continuous")
AUTO = "auto"  # epochs=AUTO: fit until the gates settle (see settling.py)
REPORT_EVERY = 25  # steps between progress updates (each one syncs the device)


FINETUNE_GATES = ("sampled", "expected")  # choices; the default is defaults.FINETUNE_GATES


@dataclass
class FitConfig:
    """How to fit: every default comes from :mod:`defaults` (the command line's too)."""

    epochs: int | str = defaults.EPOCHS  # or "auto": fit until the gates settle, at most max_steps steps
    max_steps: int = defaults.MAX_STEPS  # epochs="auto": the most optimiser steps of the fit phase
    max_minutes: float | None = None  # epochs="auto": and the most wall time (None: no limit)
    mode: str = defaults.MODE
    prior: str = defaults.PRIOR
    precision_bits: int = defaults.PRECISION_BITS
    prune_every: int = defaults.PRUNE_EVERY
    finetune_epochs: int = defaults.FINETUNE_EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    lr: float | None = None  # the weights'; None: defaults.LR, or DISTILL_LR on data without labels (weights_lr)
    gate_lr: float | None = defaults.GATE_LR  # learning rate of the gate posteriors; None: same as lr
    kl_weighting: str = defaults.KL_WEIGHTING
    kl_scale: float = defaults.KL_SCALE
    kl_warmup_epochs: int = defaults.KL_WARMUP_EPOCHS
    device: str = defaults.DEVICE
    seed: int = defaults.SEED
    amp: bool = False  # bf16 autocast for the network; the gate math stays in float32/float64
    # masks from another criterion of :mod:`criteria` (snr, expected, l2, bmrs_n_code) instead of
    # the prior's BMRS rule, with its options (threshold, target_compression); for baselines
    criterion: str | None = None
    criterion_opts: dict | None = None
    # fine-tuning sees the gates as the deployed constants "expected" (E[theta] * mask, posteriors
    # frozen, no KL: the network fine-tuned is exactly the one surgery produces; +1.0 point on
    # LeNet5, +-0 on the MLP, docs/results.md) or "sampled" (noisy, posteriors still trained, KL
    # on: the paper)
    finetune_gates: str = defaults.FINETUNE_GATES
    distill: bool = False  # also match the original network's logits (distill.py; the teacher is given to fit)
    # (data without labels is always fitted to the original network's outputs: distill.OutputDistiller)
    lr_schedule: str = defaults.LR_SCHEDULE  # "constant" or "cosine" within each phase (distill.py)

    def validate(self) -> None:
        """Every field in range (a :class:`~.errors.JobError` naming the field otherwise)."""
        if self.mode not in MODES:
            raise JobError(f"must be one of {MODES}, got {self.mode!r}", param="mode")
        if self.prior not in ("normal", "uniform"):
            raise JobError(f"must be 'normal' or 'uniform', got {self.prior!r}", param="prior")
        if self.epochs != AUTO and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0):
            raise JobError(f"must be an integer >= 0 or {AUTO}, got {self.epochs!r}", param="epochs")
        if self.finetune_epochs < 0:
            raise JobError(f"must be >= 0, got {self.finetune_epochs}", param="finetune_epochs")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise JobError(f"must be an integer >= 1, got {self.max_steps!r}", param="max_steps")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float))
                                                 and math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise JobError(f"must be a positive number of minutes, got {self.max_minutes!r}", param="max_minutes")
        if self.prune_every < 1 or self.batch_size < 1:
            raise JobError("must be >= 1", param="prune_every" if self.prune_every < 1 else "batch_size")
        for name in ("lr", "gate_lr", "kl_scale"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise JobError(f"must be a finite number >= 0, got {v}", param=name)
        if self.kl_weighting not in KL_WEIGHTINGS:
            raise JobError(f"must be one of {KL_WEIGHTINGS}, got {self.kl_weighting!r}", param="kl_weighting")
        if self.lr_schedule not in SCHEDULES:
            raise JobError(f"must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}", param="lr_schedule")
        if self.finetune_gates not in FINETUNE_GATES:
            raise JobError(f"must be one of {FINETUNE_GATES}, got {self.finetune_gates!r}", param="finetune_gates")
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise JobError(f"must be one of {', '.join(CRITERIA)}, got {self.criterion!r}", param="criterion")


@dataclass
class EpochRecord:
    epoch: int
    phase: str  # "fit" or "finetune"
    loss: float
    kl: float
    train_accuracy: float
    val_accuracy: float
    kept_fraction: float
    seconds: float
    steps: int = 0  # optimiser steps done in the fit phase by the end of this epoch
    # data without labels (the accuracies NaN): mean cosine to the original outputs on the validation split
    val_cosine: float | None = None


@dataclass
class FitResult:
    config: FitConfig
    history: list[EpochRecord] = field(default_factory=list)
    prune: PruneResult | None = None
    seconds: float = 0.0
    # whether the gates settled (settling.summary, plus "stopped": why the fit phase ended); None
    # when nothing was fitted (only fine-tuning)
    settling: dict | None = None

    @property
    def settled(self) -> bool | None:
        return None if self.settling is None else bool(self.settling["settled"])

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "history": [asdict(h) for h in self.history],
            "seconds": self.seconds,
            "settling": self.settling,
        }


def _decision(gated, cfg: FitConfig):
    """The configured rule's decision now: BMRS for ``cfg.prior``, or ``cfg.criterion``."""
    return decision(gated, cfg.criterion or criterion_for(cfg.prior), precision_bits=cfg.precision_bits,
                        **(cfg.criterion_opts or {}))


def _prune(gated, cfg: FitConfig):
    """Mask by the configured rule."""
    return apply_decision(gated, _decision(gated, cfg))


def _criteria_decision(gated, cfg: FitConfig, keep: torch.Tensor):
    """The decision a resumed fit had made (its scores recomputed from the restored posteriors)."""
    dec = _decision(gated, cfg)
    return Decision(dec.criterion, dec.score, keep.bool())


def batches(n: int, batch_size: int, generator: torch.Generator | None):
    """Index tensors of a shuffled (or, without a generator, ordered) pass over ``n`` items."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train_plain(model: nn.Module, train, *, epochs: int, batch_size: int, lr: float, seed: int,
                device: str = "cpu", after_epoch=None) -> nn.Module:
    """Train a network without gates: Adam, cross-entropy, shuffled batches drawn from a generator
    seeded with ``seed``; ``after_epoch(epoch)`` is called after each epoch. The unpruned baseline
    of the benchmarks, and how the bundled checkpoints are made."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x, y = train.tensors
    model.to(device)
    for epoch in range(epochs):
        model.train()
        for idx in batches(len(y), batch_size, gen):
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(epoch)
    return model


def scores(model: nn.Module, x) -> torch.Tensor:
    """The model's class scores on a batch: one tensor as the argument, or named inputs (a dict of
    tensors, token data) as keyword arguments, whose output's ``logits`` are taken."""
    return class_scores(forward(model, x), x)


def class_scores(out, x) -> torch.Tensor:
    """The class scores of a model's raw output on the batch ``x``: the output itself for one
    tensor, its ``logits`` for named inputs."""
    if isinstance(x, dict):
        from .tokens import logits

        return logits(out)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, dataset, device: str = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (gates at E[theta] * mask); restores the training flag."""
    n = len(dataset)
    if n == 0:
        return float("nan")
    if getattr(dataset, "labels", 0) is None:
        raise DataError("the data has no labels, so there is no accuracy: measure the mean cosine to the original "
                        "outputs (distill.mean_cosine)", param="data")
    was = model.training
    model.eval()
    correct = 0
    for x, y in split_batches(dataset, batches(n, eval_batch_size(dataset, batch_size), None), device):
        correct += int((scores(model, x).argmax(1) == y).sum())
    model.train(was)
    return correct / n


def _kl_factor(cfg: FitConfig, epoch: int, step: int, steps: int) -> float:
    if cfg.kl_warmup_epochs <= 0:
        return cfg.kl_scale
    progress = (epoch + step / max(steps, 1)) / cfg.kl_warmup_epochs
    return cfg.kl_scale * min(1.0, progress)


def make_optimizer(gated: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    """Adam over the weights (lr) and the gate posteriors (gate_lr, default lr)."""
    bank = gate_bank(gated)
    gate_ids = {id(p) for p in bank.parameters()}
    weights = [p for p in gated.parameters() if id(p) not in gate_ids]
    groups = [{"params": weights}, {"params": list(bank.parameters()), "lr": _gate_lr(cfg)}]  # GATE_GROUP last
    return torch.optim.Adam(groups, lr=cfg.lr)


GATE_GROUP = 1  # index of the gate posteriors' parameter group in make_optimizer's Adam


def _gate_lr(cfg: FitConfig) -> float:
    return cfg.gate_lr or cfg.lr


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def training_state(gated: nn.Module, opt: torch.optim.Optimizer, result: FitResult, gen: torch.Generator,
                   epoch: int, progress: dict | None = None) -> dict:
    """Everything needed to continue a fit after ``epoch`` completed epochs, bit for bit on CPU
    (``progress``: the settling record, steps done and where the fit phase ended)."""
    return {
        **(progress or {}),
        "epochs_done": epoch,
        "model": {k: v.detach().cpu().clone() for k, v in gated.state_dict().items()},
        "optimizer": opt.state_dict(),
        "history": [asdict(h) for h in result.history],
        "batch_generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "prune_keep": result.prune.keep.clone() if result.prune is not None else None,
    }


def _stop_on_nonfinite(first_bad: torch.Tensor, epoch: int, phase: str) -> None:
    """A NaN or infinite loss stops the fit (before the epoch's resume state is saved)."""
    bad = int(first_bad)
    if bad >= 0:
        raise FitError(f"the loss became non-finite at epoch {epoch} ({phase}), step {bad}: the weights or gate "
                       "posteriors diverged (try a smaller --lr / --gate-lr); nothing written")


def weights_lr(cfg: FitConfig, data: DataSplits) -> float:
    """The weights' learning rate: ``cfg.lr`` when set, else ``defaults.LR`` on labelled data and
    ``defaults.DISTILL_LR`` on data without labels (a pretrained model distilled to its own outputs,
    which ``LR`` moves away from them within a few steps)."""
    if cfg.lr is not None:
        return cfg.lr
    return defaults.LR if getattr(data, "labelled", True) else defaults.DISTILL_LR


def fit(gated: nn.Module, data: DataSplits, cfg: FitConfig, reporter=None, *, checkpoint=None,
        resume: dict | None = None, planner=None, teacher: nn.Module | None = None) -> FitResult:
    """Train ``gated`` (a GatedModel) on ``data.train``; mask structures by ``cfg.mode``.

    ``checkpoint(state)``, if given, is called after every epoch with :func:`training_state`;
    ``resume`` (such a state) continues from where it was taken.

    The settling signal (:mod:`settling`) is checked every ``defaults.SETTLE_CHECK_STEPS`` steps of
    the fit phase and at its end. With ``cfg.epochs == "auto"`` the fit phase ends at the first epoch
    end after the gates settled, or at ``cfg.max_steps`` steps (``cfg.max_minutes``), whichever comes
    first; ``result.settling`` says which.
    """
    cfg.validate()
    cfg = dataclasses.replace(cfg, lr=weights_lr(cfg, data))  # the report records the rate used
    gate_bank(gated)
    rank, world = distributed_rank()
    torch.manual_seed(cfg.seed)  # every rank draws the same noise for the global batch ...
    gen = torch.Generator().manual_seed(cfg.seed)  # ... and makes the same shuffle
    device = torch.device(cfg.device)
    n = len(data.train)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    result = FitResult(cfg)
    first = 0
    auto = cfg.epochs == AUTO
    fit_max = max(1, math.ceil(cfg.max_steps / max(steps, 1))) if auto else cfg.epochs  # epochs at most
    fit_end = None if auto else cfg.epochs  # epochs of the fit phase, once known
    finetune = cfg.finetune_epochs
    if auto and finetune:  # fine-tuning measured in steps too: at least AUTO_FINETUNE_STEPS of them
        finetune = max(finetune, math.ceil(defaults.AUTO_FINETUNE_STEPS / max(steps, 1)))
    settle = SettleState()
    done_steps = 0
    stopped = None
    if resume is not None:
        gated.load_state_dict(resume["model"])
        result.history = [EpochRecord(**h) for h in resume["history"]]
        gen.set_state(resume["batch_generator"])
        torch.set_rng_state(resume["torch_rng"])
        first = int(resume["epochs_done"])
        settle = SettleState.from_state(resume.get("settle"))
        done_steps = int(resume.get("steps_done", min(first, fit_max) * steps))
        fit_end = resume.get("fit_end", fit_end)
        stopped = resume.get("stopped")
    gated.to(device)
    net = gated
    if world > 1:  # gradients (weights and gate posteriors) averaged over ranks: same parameters everywhere
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(gated, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(gated, cfg)
    # --distill (the original network's logits), or without labels the original network's outputs as
    # the likelihood, and the schedule; planner: the job's widths and budget
    own = _output_distiller(data, teacher, device)
    distiller = Distiller(teacher, device) if cfg.distill and teacher is not None and own is None else None
    val_reference = outputs_on(own.teacher, data.val, cfg.device) if own is not None else None
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        if resume.get("prune_keep") is not None:
            result.prune = apply_decision(gated, _criteria_decision(gated, cfg, resume["prune_keep"]))
    start = time.perf_counter()
    interval = {"sum": torch.zeros((), device=device), "n": 0}  # the objective since the last check

    def check(epoch_done: float) -> None:
        dec = _decision(gated, cfg)
        objective = float(interval["sum"]) / max(interval["n"], 1)
        found = observe(settle, step=done_steps, epoch=epoch_done, score=dec.score, keep=dec.keep,
                        objective=objective, kl=float(kl_term(gated, n, cfg.kl_weighting).detach()),
                        boundary=0.0 if dec.criterion.startswith("bmrs") else None,
                        lower_is_better=dec.lower_is_better,
                        measure=lambda keep: compression(network(gated), gate_bank(gated), keep).ratio)
        interval["sum"].zero_()
        interval["n"] = 0
        if reporter and hasattr(reporter, "check"):
            reporter.check(found)

    epoch = first
    while True:
        if fit_end is None or epoch < fit_end:
            phase = "fit"
        elif epoch < fit_end + finetune:
            phase = "finetune"
        else:
            break
        total_epochs = (fit_end if fit_end is not None else fit_max) + finetune
        if phase == "finetune" and epoch == fit_end and cfg.mode == "post-training" and fit_end > 0:
            result.prune = _prune(gated, cfg)
        if phase == "finetune" and epoch == fit_end and planner is not None and fit_end > 0:
            result.prune = apply_decision(gated, planner(_decision(gated, cfg)))  # fine-tune what is deployed
        t0 = time.perf_counter()
        gated.train()
        frozen = phase == "finetune" and cfg.finetune_gates == "expected"
        if frozen:  # deterministic gates; lr 0 keeps the posteriors exactly (and DDP's gradients intact)
            gate_bank(gated).eval()
        opt.param_groups[GATE_GROUP]["lr"] = 0.0 if frozen else _gate_lr(cfg)
        if reporter:
            reporter.start_epoch(epoch, total_epochs, phase, steps)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first step with a non-finite loss
        seen = 0
        order = list(batches(n, cfg.batch_size, gen))  # the global batches; this rank reads its share
        loaded = split_batches(data.train, [idx[rank::world] for idx in order], device)
        for step, (idx, (x, y)) in enumerate(zip(order, loaded)):
            total = len(idx)
            if world > 1:  # this rank's share of the global batch, and its rows of the gate noise
                gate_bank(gated).rows = (rank, world, total)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                raw = forward(net, x)
            # the global batch's mean loss: DDP averages the ranks' gradients, hence the factor world
            if cfg.lr_schedule == "cosine":
                f = cosine_factor(epoch, step, steps, 0 if phase == "fit" else fit_end,
                                  (fit_end or fit_max) if phase == "fit" else finetune)
                opt.param_groups[0]["lr"] = cfg.lr * f
                opt.param_groups[GATE_GROUP]["lr"] = 0.0 if frozen else _gate_lr(cfg) * f
            if own is not None:  # no labels: the original network's outputs are the likelihood
                task = own.loss(raw, x) * (world / total)
            else:
                out = class_scores(raw, x)
                task = (distiller.loss(out, y, x) if distiller else F.cross_entropy(out.float(), y, reduction="sum")) \
                    * (world / total)
            # frozen posteriors: the KL is a constant, not computed
            loss = task if frozen else task + _kl_factor(cfg, epoch, step, steps) * kl_term(gated, n, cfg.kl_weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            if phase == "fit":
                done_steps += 1
                interval["sum"] += loss.detach()
                interval["n"] += 1
                if done_steps % defaults.SETTLE_CHECK_STEPS == 0:
                    _stop_on_nonfinite(first_bad, epoch, phase)
                    check(epoch + (step + 1) / steps)
            # recorded on the device (no sync per step), checked at every progress update and epoch end
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            if own is None:
                correct += (out.detach().argmax(1) == y).sum()
                seen += len(y)
            if step % REPORT_EVERY == REPORT_EVERY - 1 or step == steps - 1:
                _stop_on_nonfinite(first_bad, epoch, phase)
                if reporter:
                    reporter.step(step + 1, float(loss_sum) / (step + 1))
        if cfg.mode == "continuous" and phase == "fit" and (epoch + 1) % cfg.prune_every == 0:
            result.prune = _prune(gated, cfg)
        bank = gate_bank(gated)
        record = EpochRecord(
            epoch=epoch,
            phase=phase,
            loss=float(loss_sum) / steps,
            kl=float(kl_term(gated, n, cfg.kl_weighting).detach()),
            train_accuracy=int(correct) / max(seen, 1) if own is None else float("nan"),
            val_accuracy=accuracy(gated, data.val, cfg.device) if own is None else float("nan"),
            kept_fraction=float(bank.mask.mean()),
            seconds=time.perf_counter() - t0,
            steps=done_steps,
            val_cosine=mean_cosine(gated, data.val, val_reference, cfg.device) if own is not None else None,
        )
        result.history.append(record)
        if reporter:
            reporter.end_epoch(record)
        if phase == "fit":
            last = epoch + 1 >= fit_max or (auto and (settle.settled or _out_of_time(cfg, start)))
            if last:
                if not settle.checks or settle.checks[-1].step != done_steps:
                    check(float(epoch + 1))  # the fit phase's own last check
                fit_end = epoch + 1
                stopped = ("settled" if auto and settle.settled else "epochs" if not auto
                           else "max_minutes" if _out_of_time(cfg, start) else "max_steps")
        if checkpoint is not None:
            progress = {"settle": settle.to_state(), "steps_done": done_steps, "fit_end": fit_end, "stopped": stopped}
            checkpoint(training_state(gated, opt, result, gen, epoch + 1, progress))
        epoch += 1
    gate_bank(gated).rows = None
    if fit_end and result.prune is None:  # no scoring happened yet: score once now
        result.prune = _prune(gated, cfg)
    if fit_end:
        result.settling = {**summary(settle, cfg.max_steps if auto else None), "stopped": stopped,
                           "auto": auto, "fit_epochs": fit_end}
    result.seconds = time.perf_counter() - start
    return result


def _output_distiller(data: DataSplits, teacher: nn.Module | None, device) -> OutputDistiller | None:
    """The likelihood of data without labels (None for labelled data): distillation to ``teacher``."""
    if data.labelled:
        return None
    if teacher is None:
        from .tokens import NO_LABELS

        raise FitError(NO_LABELS, param="data")
    return OutputDistiller(teacher, device)


def _out_of_time(cfg: FitConfig, start: float) -> bool:
    return cfg.max_minutes is not None and time.perf_counter() - start >= 60.0 * cfg.max_minutes
