"""Make the bundled defaults: LeNet5 trained on Fashion-MNIST, and a small Fashion-MNIST sample.

    python benchmarks/train_bundled.py          # needs Debian's dataset-fashion-mnist

Writes models/lenet5_fmnist.pt (a bmrs-surgery checkpoint: architecture name + state dict, loads
weights-only) and bmrs_surgery/samples/fashion_mnist_sample.npz (uint8 28x28 images: 6000 training and
2000 test examples, drawn with a fixed seed from the official splits), so that the README's first
command runs the whole job without downloading anything.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bmrs_surgery.data import _FASHION_FILES, _fashion_dir, _parse_idx_images, _parse_idx_labels, load_data
from bmrs_surgery.fit import accuracy, train_plain
from bmrs_surgery.loading import save_checkpoint
from models import get_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    data = load_data("fashion-mnist", seed=args.seed)
    model = get_model("lenet5")
    t = time.perf_counter()

    def report(epoch: int) -> None:
        nonlocal t
        print(f"epoch {epoch + 1}: val {accuracy(model, data.val):.4f} ({time.perf_counter() - t:.1f} s)", flush=True)
        t = time.perf_counter()

    train_plain(model, data.train, epochs=args.epochs, batch_size=128, lr=1.5e-3, seed=args.seed, after_epoch=report)
    test = accuracy(model, data.test)
    print(f"test accuracy {test:.4f}")
    save_checkpoint(model.eval(), ROOT / "models" / "lenet5_fmnist.pt", "lenet5", (1, 32, 32))

    d = _fashion_dir()
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, n in (("train", 6000), ("test", 2000)):
        images = _parse_idx_images(d / _FASHION_FILES[f"{split}_images"])
        labels = _parse_idx_labels(d / _FASHION_FILES[f"{split}_labels"])
        pick = np.sort(rng.choice(len(labels), n, replace=False))
        arrays[f"x_{split}"] = images[pick].astype(np.uint8)
        arrays[f"y_{split}"] = labels[pick].astype(np.uint8)
    out = ROOT / "bmrs_surgery" / "samples" / "fashion_mnist_sample.npz"
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); model test accuracy {test:.4f}")


if __name__ == "__main__":
    main()
