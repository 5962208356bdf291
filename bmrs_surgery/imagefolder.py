"""``imagefolder:DIR``: a user's own images, read as they are needed (never the whole set in memory).

The layout is torchvision's ImageFolder: one sub-folder per class holding that class's images.
``DIR`` either holds ``train/`` and ``val/`` (each in that layout; ``val/`` is the held-out set) or
is itself one such folder, split per class 80/20 with the seed. The held-out images serve as both
the validation and the test split.

Every image is decoded with Pillow, converted to the model's channels (RGB, or grayscale for a
one-channel model), and transformed as usual: for fitting a random resized crop and a horizontal
flip; for evaluation a resize to ``size * 256/224`` and a centre crop; both normalised with the
model's own mean and standard deviation. Batches come from a ``DataLoader`` with worker processes.

Before any work the folder is scanned: an empty class folder, a file that is no image, an image
Pillow cannot identify, or classes that differ between ``train/`` and ``val/`` are each one line
(:class:`~.errors.DataError`). An image that cannot be decoded later (truncated) stops the run with
one line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from . import defaults
from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HELD_OUT_FRACTION = 0.2
RESIZE_RATIO = 256 / 224  # the evaluation resize before the centre crop (torchvision's convention)
FEW_IMAGES = 256  # a pass over fewer images is read in this process (starting workers costs more)


@dataclass(frozen=True)
class ImageOptions:
    """How images become tensors: side of the square input, channels, normalisation."""

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def stats(self) -> tuple[list[float], list[float]]:
        """Mean and std with one entry per channel (a 3-channel statistic averaged for grayscale)."""
        mean, std = list(self.mean), list(self.std)
        if self.channels == 1 and len(mean) == 3:
            return [sum(mean) / 3], [sum(std) / 3]
        if len(mean) != self.channels or len(std) != self.channels:
            raise DataError(f"normalisation has {len(mean)} values for images of {self.channels} channel(s)")
        return mean, std


def transform(opts: ImageOptions, train: bool):
    """torchvision transforms: random resized crop + flip for fitting, resize + centre crop otherwise."""
    from torchvision import transforms as T

    mean, std = opts.stats()
    if train:
        head = [T.RandomResizedCrop(opts.size), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(max(opts.size, round(opts.size * RESIZE_RATIO))), T.CenterCrop(opts.size)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(mean, std)])


class ImageSplit(Dataset):
    """One split: (path, label) pairs, decoded and transformed one at a time."""

    def __init__(self, samples: list[tuple[str, int]], opts: ImageOptions, train: bool):
        self.samples = samples
        self.opts = opts
        self.train = train
        self._transform = transform(opts, train)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.opts.channels == 1 else "RGB")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's
            raise DataError(f"image {path} cannot be decoded ({_reason(exc)})") from None
        return self._transform(im), label

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` examples, stacked (for shapes and the proof's real inputs)."""
        n = min(n, len(self))
        if n == 0:
            c, s = self.opts.channels, self.opts.size
            return torch.empty((0, c, s, s))
        return torch.stack([self[i][0] for i in range(n)])

    def batches(self, index_batches: list[torch.Tensor], device, workers: int | None = None):
        """(x, y) on ``device`` for each index batch, loaded ahead by worker processes."""
        if workers is None:  # worker processes pay off only beyond a handful of images
            workers = default_workers() if sum(len(b) for b in index_batches) >= FEW_IMAGES else 0
        loader = DataLoader(self, batch_sampler=[b.tolist() for b in index_batches], num_workers=workers,
                            pin_memory=torch.device(device).type == "cuda")
        it = iter(loader)
        while True:
            try:
                x, y = next(it)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a worker's DataError arrives re-raised with its traceback
                raise DataError(_worker_message(exc)) from None
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def default_workers() -> int:
    return max(0, min(defaults.DATA_WORKERS, (os.cpu_count() or 1) - 1))


def _reason(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0].strip()
    return text or type(exc).__name__


def _worker_message(exc: BaseException) -> str:
    """The one line of a DataError raised inside a DataLoader worker (the loader wraps it)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("bmrs_surgery.errors.DataError: ", "DataError: ")):
            return ln.split(": ", 1)[1]
    return f"reading images failed ({lines[0] if lines else type(exc).__name__})"


# ------------------------------------------------------------------------------------------------
# Scanning the folder
# ------------------------------------------------------------------------------------------------


def _classes(root: Path) -> list[str]:
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise DataError(f"image folder {root} cannot be read: permission denied") from None
    if not classes:
        raise DataError(f"image folder {root} has no class folders (expected {root}/CLASS/IMAGE files)")
    return classes


def _check_image(path: Path) -> None:
    """Pillow can identify ``path`` (reads its header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image {path} cannot be read ({_reason(exc)})") from None
    if w < 1 or h < 1:
        raise DataError(f"image {path} is empty ({w}x{h} pixels)")


def scan(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every image under ``root/CLASS/`` (sorted), each one identified by Pillow."""
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if others:
            raise DataError(f"{others[0]} is not an image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        if not images:
            raise DataError(f"class folder {folder} holds no images: remove it or add its images")
        for p in images:
            _check_image(p)
            samples.append((str(p), label))
    return samples


def _split(samples: list[tuple[str, int]], num_classes: int, seed: int):
    """Per class, a seeded 80/20 split into (train, held out); every class keeps a training image."""
    gen = torch.Generator().manual_seed(int(seed))
    train, held = [], []
    for c in range(num_classes):
        mine = [s for s in samples if s[1] == c]
        perm = torch.randperm(len(mine), generator=gen).tolist()
        n_held = min(round(len(mine) * HELD_OUT_FRACTION), len(mine) - 1)
        held += [mine[i] for i in perm[:n_held]]
        train += [mine[i] for i in perm[n_held:]]
    return train, held


def load_image_folder(directory: str, opts: ImageOptions, seed: int):
    """:class:`~.data.DataSplits` of an image folder (see the module doc)."""
    from .data import DataSplits
    from .errors import file_problem

    root = Path(directory).expanduser()
    if not root.is_dir():
        problem = file_problem(root, missing="not found")  # None: a readable file, not a folder
        raise DataError(f"image folder {root} {problem or 'is a file, not a folder'}")
    if isinstance(opts.size, bool) or not isinstance(opts.size, int) or not 8 <= opts.size <= 4096:
        raise DataError(f"image size must be an integer 8..4096, got {opts.size!r}", param="image_size")
    if (root / "train").is_dir():
        if not (root / "val").is_dir():
            raise DataError(f"image folder {root} has train/ but no val/ (give both, or one folder of classes)")
        classes = _classes(root / "train")
        val_classes = _classes(root / "val")
        if val_classes != classes:
            extra = sorted(set(val_classes) ^ set(classes))
            raise DataError(f"image folder {root}: train/ and val/ have different classes ({', '.join(extra[:5])})")
        train, held = scan(root / "train", classes), scan(root / "val", classes)
    else:
        classes = _classes(root)
        train, held = _split(scan(root, classes), len(classes), seed)
    if not held:
        raise DataError(f"image folder {root} has too few images to hold any out (at least 2 per class)")
    test = ImageSplit(held, opts, train=False)
    splits = DataSplits(name=root.name or str(root), train=ImageSplit(train, opts, train=True), val=test,
                        test=test, num_classes=len(classes), input_shape=(opts.channels, opts.size, opts.size))
    splits.classes = classes
    return splits


def options_for(model: torch.nn.Module, input_shape, image_size: int | None, normalisation=None) -> ImageOptions:
    """Image options for ``model``: ``image_size`` or the side of its recorded input shape (224
    when unknown), the input channels of its first convolution (3 when it has none), and the
    ``(mean, std)`` its weights were trained with (ImageNet's when not known)."""
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    size = image_size
    if size is None:
        size = int(input_shape[-1]) if input_shape and len(input_shape) == 3 else 224
    mean, std = normalisation or (IMAGENET_MEAN, IMAGENET_STD)
    return ImageOptions(size=size, channels=channels, mean=tuple(mean), std=tuple(std))
