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
    config = getattr(att, "config", None)
    shared = getattr(config, "num_attention_heads", None)
    if size is None or (count is None and not isinstance(shared, int)):
        return
    heads, hd = (getattr(att, count) if count else shared), getattr(att, size)
    kv = getattr(att, "num_key_value_heads", None)
    kv = kv if isinstance(kv, int) else None
    width = _query_width(att, heads, kv)
    if not width or width % hd:
        return
    new = width // hd
    if new == heads:
        return
    if count:
        setattr(att, count, new)
    if isinstance(shared, int) and shared == heads:  # a forward that reads the shared config (Phi-3)
        import copy

        att.config = copy.copy(config)  # this layer's own copy
        att.config.num_attention_heads = new
        if isinstance(getattr(config, "num_key_value_heads", None), int) and kv is not None:
            att.config.num_key_value_heads = kv * new // heads
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


def update_hidden_size(model: nn.Module, old: int, new: int) -> None:
    """After the residual stream was cut from ``old`` to ``new`` channels (RMSNorm models): every
    config the model's modules hold (the shared one, per-layer copies) gets ``hidden_size = new``
    with its ``head_dim`` written out first (so nothing derives a head size from the new width), and
    the modules' own ``hidden_size`` attributes follow."""
    seen: set[int] = set()
    for mod in model.modules():
        config = getattr(mod, "config", None)
        if config is not None and id(config) not in seen and getattr(config, "hidden_size", None) == old:
            seen.add(id(config))
            heads = getattr(config, "num_attention_heads", None)
            if getattr(config, "head_dim", None) is None and isinstance(heads, int) and heads and old % heads == 0:
                config.head_dim = old // heads
            config.hidden_size = new
        if isinstance(getattr(mod, "hidden_size", None), int) and not isinstance(mod.hidden_size, bool) \
                and mod.hidden_size == old:
            mod.hidden_size = new


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


@contextlib.contextmanager
def _quiet(tf):
    """No progress bars or info lines from transformers on the console (one-line errors stay ours)."""
    logging = tf.utils.logging
    bars = logging.is_progress_bar_enabled()
    level = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()
        logging.set_verbosity(level)


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
    with offline(), _quiet(tf):
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
    (the base model, ``AutoModel``), or from a model class with a head, e.g.
    ``from_config("LlamaForCausalLM", ...)`` (no weights, nothing read or downloaded)."""
    tf = _transformers(name)
    cls = getattr(tf, name, None)
    config_cls = _config_class(cls)
    if config_cls is not None:  # a model class (LlamaForCausalLM): its own head
        model = cls(config_cls(**sizes))
        _prepare(model)
        return model
    if cls is None or not isinstance(cls, type) or not name.endswith("Config"):
        raise ModelLoadError(f"{name}: not a transformers config class (e.g. BertConfig, LlamaConfig) or model class "
                             "(e.g. LlamaForCausalLM)")
    config = cls(**sizes)
    model = tf.AutoModel.from_config(config)
    _prepare(model)
    return model


def _config_class(cls):
    """The config class of a transformers model class (None for anything else)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    config_cls = getattr(cls, "config_class", None)
    return config_cls if isinstance(config_cls, type) else None


# small sizes for checks: every family gets 2 layers, 4 query heads of 16, 2 key/value heads where
# the config has them, an FFN of 128 and a vocabulary of 1000 (keys a config does not know are dropped)
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 128,
         "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "dim": 64, "n_layers": 2, "n_heads": 4,
         "hidden_dim": 128, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4,
         "head_dim": 16, "image_size": 32, "patch_size": 8, "embed_dim": 32, "depths": [2, 2],
         "encoder_stride": 8, "window_size": 2}


def _small_sizes(cls, overrides: dict) -> dict:
    """The :data:`SMALL` sizes the config class takes as arguments or attributes, then ``overrides``."""
    import inspect

    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    defaults = cls()
    sizes = {k: v for k, v in SMALL.items() if k in known or hasattr(defaults, k)}
    if "num_key_value_heads" in sizes and not hasattr(defaults, "num_key_value_heads"):
        sizes.pop("num_key_value_heads")
    if "embed_dim" in sizes and "depths" in sizes:  # Swin: heads per stage, the width doubles
        sizes["num_heads"] = [2, 4]
        for key in ("num_layers", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            sizes.pop(key, None)
    vocab = sizes.get("vocab_size")
    for tok in ("pad_token_id", "bos_token_id", "eos_token_id"):  # special tokens inside the small vocabulary
        if vocab and isinstance(getattr(defaults, tok, None), int) and getattr(defaults, tok) >= vocab:
            sizes[tok] = 0
    sizes.update(overrides)
    return sizes


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def load_spec(spec: str) -> nn.Module:
    """``hf:DIR`` (a local folder), ``hf:NAMEConfig[:key=value,...]`` (the base model with small
    random weights) or ``hf:MODELCLASS[:key=value,...]`` (``hf:LlamaForCausalLM``: with its head)."""
    rest = spec[3:]
    head, _, opts = rest.partition(":")
    model_class = not head.endswith("Config") and head.startswith(tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")) \
        and "For" in head and not Path(rest).exists()
    if (head.endswith("Config") or model_class) and not Path(rest).exists():
        overrides = {}
        for item in filter(None, opts.split(",")):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise ModelLoadError(f"{spec}: expected key=value sizes after the config name, got {item!r}")
            overrides[key.strip()] = _value(val.strip())
        tf = _transformers(spec)
        cls = getattr(tf, head, None)
        if not isinstance(cls, type):
            raise ModelLoadError(f"{spec}: transformers has no {'model' if model_class else 'config'} class {head}")
        config_cls = _config_class(cls) if model_class else cls
        if config_cls is None:
            raise ModelLoadError(f"{spec}: {head} is not a transformers model class with a config")
        try:
            return from_config(head, **_small_sizes(config_cls, overrides))
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a config that refuses these sizes
            raise ModelLoadError(f"{spec}: {head} cannot be built with these sizes: {str(exc).splitlines()[0]}") from None
    return load_folder(rest, spec)


# -- from_pretrained folders ------------------------------------------------------------------------

def _widths(model: nn.Module) -> tuple[set, set, set]:
    heads, kv, ffn = set(), set(), set()
    for path, mod in model.named_modules():
        count = next((a for a in HEAD_COUNTS if isinstance(getattr(mod, a, None), int)), None)
        size = next((getattr(mod, a) for a in HEAD_SIZES if isinstance(getattr(mod, a, None), int)), None)
        if count is not None and size:
            heads.add(getattr(mod, count))
            if isinstance(getattr(mod, "num_key_value_heads", None), int):
                kv.add(mod.num_key_value_heads)
        elif size:  # no head count kept (Llama): count the projections' rows
            width = next((_out_width(getattr(mod, n)) for n in QUERY if isinstance(getattr(mod, n, None), nn.Module)),
                         None)
            kwidth = next((_out_width(getattr(mod, n)) for n in ("k_proj", "key", "k")
                           if isinstance(getattr(mod, n, None), nn.Module)), None)
            if width:
                heads.add(width // size)
            if kwidth:
                kv.add(kwidth // size)
        leaf = path.rpartition(".")[2]
        if (leaf in MLP_IN or path.endswith("intermediate.dense")) and _out_width(mod):
            ffn.add(_out_width(mod) // (2 if leaf == "gate_up_proj" else 1))
    return heads, kv, ffn


def pretrained_config(pruned: nn.Module):
    """The config under which ``from_pretrained`` builds exactly the pruned model's shapes, or
    (None, why not): every layer must keep the same widths, and the config must fix the head size
    (``head_dim``) when heads were removed."""
    import copy

    tf = _transformers("config")
    config = copy.deepcopy(pruned.config)
    heads, kv, ffn = _widths(pruned)
    if len(heads) > 1 or len(kv) > 1 or len(ffn) > 1:
        return None, (f"layers keep different widths (heads {sorted(heads)}, key/value heads {sorted(kv)}, "
                      f"FFN {sorted(ffn)}): load it with bmrs_surgery.apply_recipe on a fresh "
                      f"{type(pruned).__name__}")
    if heads:
        old_heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // old_heads if old_heads else None)
        config.num_attention_heads = heads.pop()
        if hasattr(config, "head_dim") and head_dim:
            config.head_dim = head_dim
    if kv and hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv.pop()
    why = _stream_config(pruned, config)
    if why is not None:
        return None, why
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as exc:  # noqa: BLE001 - transformers' validators raise several kinds
            cause = getattr(exc, "__cause__", None) or exc
            return None, (f"{type(config).__name__} refuses the pruned sizes ({str(cause).splitlines()[0]}): load it "
                          "with bmrs_surgery.apply_recipe")
    if ffn:
        width = ffn.pop()
        for name in ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff"):
            if hasattr(config, name):
                setattr(config, name, width)
                break
    fresh = tf.AutoModel.from_config(config) if type(pruned).__name__.endswith("Model") else type(pruned)(config)
    want = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    bad = next((k for k in want if got.get(k) != want[k]), None)
    if bad is not None:
        return None, (f"{type(config).__name__} cannot describe the pruned shapes ({bad}: {want[bad]} pruned, "
                      f"{got.get(bad)} from the config; the head size follows the head count there): load it "
                      f"with bmrs_surgery.apply_recipe")
    from .graph.rules.transformers_layers import EPS_NAMES

    built = dict(fresh.named_modules())
    for name, mod in pruned.named_modules():
        for attr in EPS_NAMES:
            mine, theirs = getattr(mod, attr, None), getattr(built.get(name), attr, None)
            if isinstance(mine, float) and isinstance(theirs, float) and abs(mine - theirs) > 1e-12 * max(1.0, mine):
                return None, (f"{type(config).__name__} has one norm eps, the pruned {name} needs {mine:g} "
                              f"(from_config gives {theirs:g}): load it with bmrs_surgery.apply_recipe")
    return config, None


def _stream_config(pruned: nn.Module, config) -> str | None:
    """A config for a pruned residual stream: ``hidden_size`` is the stream's width (already set by
    surgery) and ``rms_norm_eps`` the rescaled eps of its norms, which must all agree."""
    from .graph.rules.transformers_layers import _eps_name, stream_norm_widths

    widths = stream_norm_widths(pruned)
    if not widths or getattr(config, "hidden_size", None) not in set(widths.values()):
        return None
    eps = {getattr(pruned.get_submodule(n), _eps_name(pruned.get_submodule(n))) for n in widths}
    if len(eps) > 1:
        return f"the stream's norms have different eps {sorted(eps)}: load it with bmrs_surgery.apply_recipe"
    for name in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"):
        if hasattr(config, name):
            setattr(config, name, eps.pop())
            break
    return None


def save_pretrained(pruned: nn.Module, folder: str | Path) -> str | None:
    """Write a folder ``AutoModel.from_pretrained`` loads (config + model.safetensors) when the
    widths allow it (see :func:`pretrained_config`); returns None, or why it was not written."""
    config, why = pretrained_config(pruned)
    if config is None:
        return why
    pruned.config = config
    pruned.save_pretrained(str(folder), safe_serialization=True)
    return None
