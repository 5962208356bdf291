"""Multiplicative noise gates with truncated log-normal posteriors.

All gates of a model share one :class:`GateBank`: flat ``mu`` / ``log_sigma`` parameters and a
``mask`` buffer for every structure. A :class:`Gate` is a forward pre-hook on a layer that reads a
group's channels: it scales that layer's *input* along the group's axis, holding only its slice of
the bank. Keeping the parameters flat means one sampling call
and one KL call per training step for the whole network instead of a dozen small kernels per gate:
that is what keeps a gated training step close to the plain one.

Noise (``noise=``):
  * ``"sample"`` (default): one theta per structure and per example in the batch,
  * ``"structure"``: one theta per structure per step (the original SBP code),
  * ``"element"``: one theta per element of the activation tensor (the BMRS authors' code).
In eval mode every gate is the constant E[theta] * mask.
"""

from __future__ import annotations

import torch
from torch import nn

from . import bmrs, defaults, fused
from .errors import JobError
from .graph.group import Group

NOISE_MODES = ("sample", "structure", "element")


class GateBank(nn.Module):
    """Posterior parameters, masks and sampling for every gate of one model: structure ``j`` of
    ``groups[i]`` is entry ``slice_of(i).start + j`` of ``mu``, ``log_sigma`` and ``mask``."""

    def __init__(
        self,
        groups: list[Group],
        noise: str = defaults.NOISE,
        bounds: tuple[float, float] = (bmrs.LOWER, bmrs.UPPER),
        init_mu: float = defaults.INIT_MU,
        init_log_sigma: float = defaults.INIT_LOG_SIGMA,
    ):
        super().__init__()
        if noise not in NOISE_MODES:
            raise JobError(f"must be one of {NOISE_MODES}, got {noise!r}", param="noise")
        self.groups = list(groups)
        self.noise = noise
        self.a, self.b = float(bounds[0]), float(bounds[1])
        self.offsets = []
        n = 0
        for g in self.groups:
            self.offsets.append(n)
            n += g.size
        # one parameter for both (a single optimizer slot and autograd leaf): row 0 mu, row 1 log sigma
        self.posterior = nn.Parameter(torch.stack([torch.full((n,), float(init_mu)), torch.full((n,), float(init_log_sigma))]))
        self.register_buffer("mask", torch.ones(n))
        self._cache: dict | None = None
        self._graphs: dict = {}
        self._pending_kl: torch.Tensor | None = None
        self._tap_cache: dict = {}
        self.rows: tuple[int, int, int] | None = None  # (rank, world, global batch) under DDP
        self.cuda_graphs = True  # replay the gate math as CUDA graphs on CUDA devices

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_graphs"] = {}  # captured graphs belong to one process and one device
        state["_cache"] = None
        state["_pending_kl"] = None
        state["_tap_cache"] = {}
        state["rows"] = None
        return state

    def _graphs_on(self, tensor: torch.Tensor) -> bool:
        return self.cuda_graphs and tensor.is_cuda and torch.is_grad_enabled()

    def _graphed(self, key, fn, *args):
        """``fn(*args)``; on CUDA (training) as a CUDA graph captured once per key and shape.

        The gate math is ~100 tiny kernels per step (sampling, KL, their backward): launched one
        by one they would cost more than a small network's whole step. A captured graph launches
        them at once, forward and backward. Buffers read inside ``fn`` (the mask) are read in
        place, so mask updates reach the graph; moving the bank re-captures.
        """
        if not self._graphs_on(args[0]):
            return fn(*args)
        full_key = (key, tuple(a.shape for a in args), self.mask.data_ptr(), args[0].device)
        graphed = self._graphs.get(full_key)
        if graphed is None:
            sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            graphed = torch.cuda.make_graphed_callables(fn, sample)
            self._graphs[full_key] = graphed
        return graphed(*args)

    @property
    def mu(self) -> torch.Tensor:
        return self.posterior[0]

    @property
    def log_sigma(self) -> torch.Tensor:
        return self.posterior[1]

    # -- views -------------------------------------------------------------------------------
    @property
    def num_gates(self) -> int:
        return self.posterior.shape[1]

    def slice_of(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index] + self.groups[index].size)

    # -- forward-time values -----------------------------------------------------------------
    def begin_forward(self) -> None:
        """Share one draw among all gates until :meth:`end_forward` (called by GatedModel)."""
        self._cache = {}

    def end_forward(self) -> None:
        self._cache = None

    def _cached(self, key, make):
        if self._cache is None:
            return make()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def expected(self) -> torch.Tensor:
        """E[theta] * mask for every structure, in the parameters' dtype."""
        log_e = bmrs.log_expected_theta(self.mu, self.log_sigma, self.a, self.b)
        return torch.exp(log_e) * self.mask

    def sample(self, shape) -> torch.Tensor:
        """theta * mask for uniforms of ``shape`` (last dim = all structures, or broadcastable)."""
        u = torch.rand(shape, device=self.posterior.device, dtype=self.posterior.dtype)
        if self._graphs_on(self.posterior):
            # one graph for the draw and the KL of the same step: kl() picks the KL up
            theta, self._pending_kl = self._graphed("sample+kl", self._sample_kl_fn, self.posterior, u)
            return theta
        return fused.sample_theta(self.posterior, self.mask, u, self.a, self.b)

    def _sample_rows(self, batch: int) -> torch.Tensor:
        """One draw per example and structure. Under data parallelism (``rows`` set) every rank
        draws for the whole global batch and keeps its own examples' rows, so N processes draw
        exactly what one process would."""
        if self.rows is None:
            return self.sample((batch, self.num_gates))
        rank, world, total = self.rows
        return self.sample((total, self.num_gates))[rank::world]

    def _sample_kl_fn(self, post: torch.Tensor, u: torch.Tensor):
        return fused.sample_theta(post, self.mask, u, self.a, self.b), fused.kl_divergence(post, self.a, self.b)

    def _kl_fn(self, post: torch.Tensor) -> torch.Tensor:
        return fused.kl_divergence(post, self.a, self.b)

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-group pieces of a (..., N) tensor, made by one split (one autograd node)."""
        return torch.split(theta, [s.size for s in self.groups], dim=-1)

    def _tap_index(self, index: int, tap: int, device) -> torch.Tensor | None:
        """Structure index per input index of a tap (None when it is the identity)."""
        key = (index, tap, device)
        cached = self._tap_cache.get(key)
        if cached is None:
            idx = torch.as_tensor(self.groups[index].taps[tap].index, dtype=torch.long)
            size = self.groups[index].size
            identity = idx.numel() == size and bool((idx == torch.arange(size)).all())
            cached = (None if identity else torch.where(idx < 0, size, idx).to(device),)
            self._tap_cache[key] = cached
        return cached[0]

    def theta_for(self, index: int, x: torch.Tensor, tap: int = 0) -> torch.Tensor:
        """The gate values of group ``index`` at its tap ``tap``, shaped to broadcast against ``x``."""
        group = self.groups[index]
        axis = group.taps[tap].axis % x.ndim
        idx = self._tap_index(index, tap, x.device)
        n = x.shape[axis]
        shape = [1] * x.ndim
        shape[axis] = n
        if not self.training:
            theta = self._cached("eval", lambda: self._split(self.expected()))[index]
        elif self.noise == "structure":
            theta = self._cached("structure", lambda: self._split(self.sample((self.num_gates,))))[index]
        elif self.noise == "sample":
            batch = x.shape[0]
            shape[0] = batch
            theta = self._cached(("sample", batch), lambda: self._split(self._sample_rows(batch)))[index]
        else:
            theta = None
        if theta is not None:
            if idx is not None:
                theta = torch.cat([theta, theta.new_ones(theta.shape[:-1] + (1,))], -1).index_select(-1, idx)
            return theta.reshape(shape).to(x.dtype)
        # element: one uniform per activation element, this group's parameters only
        sl = self.slice_of(index)
        post, mask = self.posterior[:, sl], self.mask[sl]
        if idx is not None:
            valid = (idx < group.size).reshape(shape)
            safe = idx.clamp(max=group.size - 1)
            post, mask = post.index_select(1, safe), mask.index_select(0, safe)
        u = torch.rand(x.shape, device=x.device, dtype=post.dtype)
        theta = fused.sample_theta(post.reshape([2] + shape), mask.reshape(shape), u, self.a, self.b)
        if idx is not None:
            theta = torch.where(valid, theta, torch.ones_like(theta))
        return theta.to(x.dtype)

    def mask_for(self, index: int, x: torch.Tensor, tap: int = 0) -> torch.Tensor:
        """The keep-mask of group ``index`` at its tap ``tap`` (1 where the tap's index is not the
        group's), shaped to broadcast against ``x``."""
        axis = self.groups[index].taps[tap].axis % x.ndim
        idx = self._tap_index(index, tap, x.device)
        m = self.mask[self.slice_of(index)]
        if idx is not None:
            m = torch.cat([m, m.new_ones(1)]).index_select(0, idx)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        return m.reshape(shape).to(x.dtype)

    def kl(self, reduction: str = "mean") -> torch.Tensor:
        """KL(q || p) of all gates: ``"mean"`` over structures, or ``"sum"``."""
        kl, self._pending_kl = self._pending_kl, None  # drawn with this step's sample (CUDA graphs)
        if kl is None:
            kl = self._graphed("kl", self._kl_fn, self.posterior)
        if reduction == "mean":
            return kl.mean()
        if reduction == "sum":
            return kl.sum()
        raise JobError(f"must be 'mean' or 'sum', got {reduction!r}", param="reduction")


class Gate:
    """A forward pre-hook that multiplies a module's input by one group's gate values.

    A plain callable, not a module: its parameters live in the root's :class:`GateBank`.
    """

    def __init__(self, bank: GateBank, index: int, tap: int = 0):
        self.bank = bank
        self.index = index
        self.tap = tap

    def __call__(self, module, args):  # forward-pre-hook signature
        x = args[0]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"gate {self.bank.groups[self.index].name}: module input is not a tensor")
        return (x * self.bank.theta_for(self.index, x, self.tap),) + tuple(args[1:])

    def __repr__(self) -> str:
        g = self.bank.groups[self.index]
        return f"Gate({g.name}: {g.size} structures at {g.taps[self.tap].module})"


class OutputGate(Gate):
    """A forward hook that multiplies a module's *output* by one group's gate values (a tap with
    ``side="out"``: a layer that writes the residual stream of an RMSNorm model)."""

    def __call__(self, module, args, output):  # forward-hook signature
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"gate {self.bank.groups[self.index].name}: module output is not a tensor")
        return output * self.bank.theta_for(self.index, output, self.tap)


class MaskGate(Gate):
    """A forward pre-hook that multiplies a module's input by one group's keep-mask alone (a tap
    with ``side="mask"``: the input of a norm over the group's channels, where a removed channel must
    be zero; the group's E[theta] sits at its other taps)."""

    def __call__(self, module, args):  # forward-pre-hook signature
        x = args[0]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"gate {self.bank.groups[self.index].name}: module input is not a tensor")
        return (x * self.bank.mask_for(self.index, x, self.tap),) + tuple(args[1:])
