"""The fitting loop on real data: both modes, seeds, masks, and pruning that happens."""

import math

import pytest
import torch

import bmrs_surgery as bmrs
from bmrs_surgery.data import load_data
from bmrs_surgery.fit import FitConfig, accuracy, fit
from models import get_model


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _gated(data, name="mlp"):
    torch.manual_seed(0)
    return bmrs.attach_gates(get_model(name), data.train.tensors[0][:2])


def test_post_training_prunes_once_then_finetunes_with_frozen_masks(digits):
    g = _gated(digits)
    cfg = FitConfig(epochs=3, finetune_epochs=2, mode="post-training", prior="uniform", batch_size=64, gate_lr=3e-2)
    seen = []

    class Spy:
        def start_epoch(self, *a):
            pass

        def step(self, *a):
            pass

        def end_epoch(self, record):
            seen.append((record.phase, g.bmrs_gates.mask.clone()))

    result = fit(g, digits, cfg, Spy())
    assert [h.phase for h in result.history] == ["fit"] * 3 + ["finetune"] * 2
    assert all(m.all() for phase, m in seen if phase == "fit")  # no masks while fitting
    ft = [m for phase, m in seen if phase == "finetune"]
    assert torch.equal(ft[0], ft[1]) and torch.equal(ft[0], g.bmrs_gates.mask)
    assert torch.equal(result.prune.keep, g.bmrs_gates.mask.bool())
    assert result.history[-1].val_accuracy > 0.8  # digits: well above chance (0.1)


def test_same_seed_same_posteriors(digits):
    cfg = FitConfig(epochs=1, batch_size=64, seed=3)
    a, b = _gated(digits), _gated(digits)
    fit(a, digits, cfg)
    fit(b, digits, cfg)
    assert torch.equal(a.bmrs_gates.posterior, b.bmrs_gates.posterior)
    c = _gated(digits)
    fit(c, digits, FitConfig(epochs=1, batch_size=64, seed=4))
    assert not torch.equal(a.bmrs_gates.posterior, c.bmrs_gates.posterior)


@pytest.mark.slow
def test_continuous_mode_on_fashion_mnist_removes_most_of_the_mlp():
    data = load_data("fashion-mnist", limit=6000)
    g = _gated(data)
    # a constant rate: under the default cosine the gates slow down within these 8 short epochs
    cfg = FitConfig(epochs=8, finetune_epochs=1, mode="continuous", prior="uniform", batch_size=64, gate_lr=3e-2,
                    lr_schedule="constant")
    result = fit(g, data, cfg)
    kept = [h.kept_fraction for h in result.history]
    assert kept[0] == 1.0 and kept[-1] < 0.5  # masks appear while fitting
    assert kept[-1] == kept[-2]  # frozen during fine-tuning
    assert result.prune.compression > 0.6
    assert accuracy(g, data.test) > 0.7  # pruned MLP still classifies Fashion-MNIST


def test_config_validation(digits):
    g = _gated(digits)
    with pytest.raises(ValueError, match="mode"):
        fit(g, digits, FitConfig(mode="bogus"))
    with pytest.raises(ValueError, match="prior"):
        fit(g, digits, FitConfig(prior="bogus"))


def test_kl_warmup_scales_the_kl_term_linearly_over_its_epochs(digits):
    """With learning rates 0 nothing moves: every step sees the same task loss and the same KL in both
    runs, so the epoch losses differ by exactly KL x (1 - the mean warm-up factor of the epoch's steps).
    The factor rises linearly from 0 at the first step to 1 after ``kl_warmup_epochs`` epochs."""
    base = dict(epochs=3, batch_size=128, lr=0.0, gate_lr=0.0, finetune_epochs=0, kl_scale=2.0, mode="post-training")
    plain = fit(_gated(digits), digits, FitConfig(**base))
    warm = fit(_gated(digits), digits, FitConfig(**base, kl_warmup_epochs=2))
    steps = math.ceil(len(digits.train) / 128)
    kl = plain.history[0].kl
    assert kl > 1.0 and all(h.kl == kl for h in plain.history + warm.history)  # nothing moved
    ramp = [(e + s / steps) / 2 for e in range(3) for s in range(steps)]
    for epoch in range(3):
        mean_factor = sum(min(1.0, f) for f in ramp[epoch * steps:(epoch + 1) * steps]) / steps
        expected = base["kl_scale"] * kl * (1 - mean_factor)
        got = plain.history[epoch].loss - warm.history[epoch].loss
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4), (epoch, got, expected)
    assert warm.history[0].loss < warm.history[1].loss < warm.history[2].loss == plain.history[2].loss


def test_fit_needs_gates(digits):
    with pytest.raises(bmrs.BmrsError, match="no BMRS gates"):
        fit(get_model("mlp"), digits, FitConfig(epochs=1))


def test_bf16_autocast_fits_with_gate_math_in_float32():
    import bmrs_surgery as bmrs
    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import FitConfig, fit
    from models import get_model

    data = load_data("digits", limit=200)
    gated = bmrs.attach_gates(get_model("lenet5"), data.train.tensors[0][:2])
    bank = gated.bmrs_gates
    seen = []
    hook = gated.model[7].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))  # after the gate hook
    result = fit(gated, data, FitConfig(epochs=2, batch_size=32, amp=True, prior="uniform"))
    hook.remove()
    assert torch.bfloat16 in seen  # the network ran in bf16 ...
    assert bank.posterior.dtype == torch.float32 and bool(torch.isfinite(bank.posterior).all())  # ... the gates did not
    assert all(math.isfinite(h.loss) for h in result.history)
    assert result.history[-1].loss < result.history[0].loss


def test_continuous_mode_with_a_baseline_criterion_masks_by_it(digits):
    """FitConfig.criterion: the paper's baselines prune during training by their own rule."""
    from bmrs_surgery.criteria import snr

    g = _gated(digits)
    # after 3 short epochs the SNRs are still ~30 (sigma starts at e^-5): a threshold of 30 splits them
    cfg = FitConfig(epochs=3, mode="continuous", criterion="snr", criterion_opts={"threshold": 30.0},
                    batch_size=64, gate_lr=3e-2, lr_schedule="constant")  # the threshold suits a constant rate
    result = fit(g, digits, cfg)
    assert result.prune.criterion == "snr"
    assert torch.equal(g.bmrs_gates.mask.bool(), snr(g.bmrs_gates, 30.0).keep)  # masks = SNR >= 30 now
    assert 0.0 < result.prune.kept_fraction < 1.0
    with pytest.raises(ValueError, match="criterion"):
        fit(g, digits, FitConfig(criterion="bogus"))


def test_l2_criterion_in_continuous_mode_reaches_its_target_compression(digits):
    g = _gated(digits)
    cfg = FitConfig(epochs=2, mode="continuous", criterion="l2", criterion_opts={"target_compression": 0.5},
                    batch_size=64)
    result = fit(g, digits, cfg)
    assert result.prune.criterion == "l2"
    assert 0.5 <= result.prune.compression < 0.6  # the smallest number of structures reaching 50%


def test_finetuning_with_expected_gates_trains_the_deployed_network_only(digits):
    """finetune_gates="expected": the fine-tuned network is the deterministic one surgery keeps
    (E[theta] * mask), the posteriors do not move, and it differs from noisy fine-tuning."""
    seen, sampling = {}, {}

    class Spy:
        def start_epoch(self, epoch, *a):
            self.epoch = epoch

        def step(self, *a):  # inside the epoch's loop
            sampling[self.epoch] = g.bmrs_gates.training

        def end_epoch(self, record):
            seen[record.epoch] = g.bmrs_gates.posterior.detach().clone()

    g = _gated(digits)
    cfg = FitConfig(epochs=2, finetune_epochs=2, mode="post-training", prior="uniform", batch_size=64,
                    gate_lr=3e-2, finetune_gates="expected")
    fit(g, digits, cfg, Spy())
    assert torch.equal(seen[1], seen[3])  # posteriors frozen over both fine-tuning epochs
    assert not torch.equal(seen[0], seen[1])  # and trained while fitting
    assert sampling == {0: True, 1: True, 2: False, 3: False}  # sampled while fitting, E[theta] after
    noisy = _gated(digits)
    fit(noisy, digits, FitConfig(**{**cfg.__dict__, "finetune_gates": "sampled"}))
    assert not torch.equal(noisy.bmrs_gates.posterior, g.bmrs_gates.posterior)
    with pytest.raises(ValueError, match="finetune_gates"):
        fit(g, digits, FitConfig(finetune_gates="bogus"))


def test_train_plain_learns_and_is_reproducible(digits):
    """The unpruned baseline of the benchmarks: same seed, same weights; well above chance."""
    from bmrs_surgery.fit import train_plain

    def run(seed):
        torch.manual_seed(0)
        epochs_seen = []
        model = train_plain(get_model("mlp"), digits.train, epochs=2, batch_size=64, lr=1.5e-3, seed=seed,
                            after_epoch=epochs_seen.append)
        return model, epochs_seen

    a, seen = run(1)
    b, _ = run(1)
    c, _ = run(2)
    assert seen == [0, 1]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))  # batch order differs
    assert accuracy(a, digits.test) > 0.8
