"""Hugging Face transformers models: local folders (``hf:DIR``), small architectures for checks,
and the size attributes a pruned model needs to run its own forward.

Nothing here downloads: a folder is read with ``local_files_only=True`` (and
``HF_HUB_OFFLINE=1`` set for the call); a missing file is named. transformers is an optional
extra (``pip install bmrs-surgery[hf]``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from torch import nn

from .errors import ModelLoadError

HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
HEAD_SIZES = ("head_dim", "attention_head_size", "head_size")
QUERY = ("query", "q_proj", "q", "q_lin", "Wq")
FUSED_QKV = ("c_attn", "qkv_proj", "qkv", "query_key_value", "Wqkv")
MLP_IN = ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "wi", "lin1", "gate_up_proj")


def _out_width(mod: nn.Module) -> int | None:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    nf = getattr(mod, "nf", None)  # transformers' Conv1D
    return nf if isinstance(nf, int) else None


def _query_width(att: nn.Module, heads: int, kv: int | None) -> int | None:
    """Width of the query projection of an attention module (its own or the fused one's share)."""
    for name in QUERY:
        child = getattr(att, name, None)
        if isinstance(child, nn.Module) and _out_width(child) is not None:
            return _out_width(child)
    for name in FUSED_QKV:
        child = getattr(att, name, None)
        w = _out_width(child) if isinstance(child, nn.Module) else None
        if w is None:
            continue
        if kv is None or kv == heads:
            return w // 3 if w % 3 == 0 else None
        # q + k + v = (heads + 2 kv) head_dim with heads/kv fixed (whole key/value groups go)
        return w * heads // (heads + 2 * kv)
    return None


def _update_attention(att: nn.Module) -> None:
    count = next((a for a in HEAD_COUNTS if isinstance(getattr(att, a, None), int)), None)
    size = next((a for a in HEAD_SIZES if isinstance(getattr(att, a, None), int)), None)
    if count is None or size is None:
        return
    heads, hd = getattr(att, count), getattr(att, size)
    kv = getattr(att, "num_key_value_heads", None)
    kv = kv if isinstance(kv, int) else None
    width = _query_width(att, heads, kv)
    if not width or width % hd:
        return
    new = width // hd
    if new == heads:
        return
    setattr(att, count, new)
    if kv is not None:
        att.num_key_value_heads = kv * new // heads
    for a in ("all_head_size", "split_size", "inner_dim"):
        if isinstance(getattr(att, a, None), int) and getattr(att, a) == heads * hd:
            setattr(att, a, new * hd)


def _update_mlp(mlp: nn.Module) -> None:
    if not isinstance(getattr(mlp, "intermediate_size", None), int):
        return
    for name in MLP_IN:
        child = getattr(mlp, name, None)
        w = _out_width(child) if isinstance(child, nn.Module) else None
        if w:
            mlp.intermediate_size = w // 2 if name == "gate_up_proj" else w
            return


def update_size_attributes(model: nn.Module) -> None:
    """After surgery: attention modules' head counts (``num_heads``/``num_attention_heads``,
    ``num_key_value_heads``, ``all_head_size``, GPT-2's ``split_size``) and MLPs'
    ``intermediate_size`` follow their sliced projections; ``head_dim`` never changes."""
    for mod in model.modules():
        _update_attention(mod)
        _update_mlp(mod)


# -- loading ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def offline():
    """Hugging Face libraries never reach the network inside this block."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _transformers(spec: str):
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(f"{spec}: Hugging Face models need transformers (pip install 'bmrs-surgery[hf]')") from None
    return transformers


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def load_folder(folder: str | Path, spec: str | None = None) -> nn.Module:
    """A local Hugging Face model folder (``config.json`` + safetensors weights) through the Auto
    classes, offline; the model in eval mode without its key/value cache output."""
    spec = spec or f"hf:{folder}"
    path = Path(folder)
    if not path.is_dir():
        raise ModelLoadError(f"{spec}: {path} is not a folder (hf:DIR takes a local Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec}: {path / 'config.json'} is missing (a Hugging Face folder holds config.json "
                             "and model.safetensors); nothing is downloaded")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{spec}: {path / 'model.safetensors'} is missing (weights in safetensors are needed; "
                             "pickled pytorch_model.bin is not loaded); nothing is downloaded")
    tf = _transformers(spec)
    with offline():
        try:
            config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ModelLoadError(f"{spec}: config.json cannot be read: {str(exc).splitlines()[0]}") from None
        try:
            model = tf.AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{spec}: {type(config).__name__} weights cannot be loaded: "
                                 f"{str(exc).splitlines()[0]}") from None
    _prepare(model)
    return model


def _prepare(model: nn.Module) -> None:
    model.eval()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False


def from_config(name: str, **sizes) -> nn.Module:
    """A randomly initialised transformers model from its config class with small sizes, e.g.
    ``from_config("LlamaConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)``
    (no weights, nothing read or downloaded)."""
    tf = _transformers(name)
    cls = getattr(tf, name, None)
    if cls is None or not isinstance(cls, type) or not name.endswith("Config"):
        raise ModelLoadError(f"{name}: not a transformers config class (e.g. BertConfig, LlamaConfig)")
    config = cls(**sizes)
    model = tf.AutoModel.from_config(config)
    _prepare(model)
    return model
