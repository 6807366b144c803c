"""Load a Hugging Face model directory (``config.json``, safetensors, ``tokenizer.json``).

Supported ``model_type`` s and what they become:

- ``llama``, ``mistral``, ``qwen2`` (SmolLM and SmolLM2 are ``llama``):
  :mod:`lora_jax.models.llama` params and a :class:`~lora_jax.models.llama.LlamaConfig`.
- ``bert``: :mod:`lora_jax.models.bert` params and a :class:`~lora_jax.models.bert.BertConfig`.

A torch ``Linear`` stores its weight ``(out, in)``; our kernels are ``(in, out)``,
so every projection is transposed on load. Weights are read with
``safetensors`` (single file, or shards listed in ``model.safetensors.index.json``)
and never with pickle: a directory holding only ``pytorch_model.bin`` or other
pickle checkpoints is refused. Every tensor's shape is checked against what
``config.json`` implies before anything is converted.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lora_jax.errors import CheckpointError
from lora_jax.io.files import read_json
from lora_jax.io.names import unsafe_component
from lora_jax.models import bert as _bert
from lora_jax.models import llama as _llama

PyTree = Any

LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = (*LLAMA_TYPES, "bert")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONVERT_HINT = (
    "convert it once, in an environment you trust, with transformers: "
    "{auto}.from_pretrained(DIR).save_pretrained(DIR) (writes model.safetensors), "
    "or download the model's published *.safetensors files"
)




# ----------------------------------------------------------------------------
# Files


class _Tensors:
    """Tensor names of the directory's safetensors files, read lazily (shapes from headers)."""

    def __init__(self, directory: Path, auto_class: str = "AutoModel"):
        from safetensors import SafetensorError, safe_open

        self._safe_open = safe_open
        self.files = _weight_files(directory, auto_class)
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for file in self.files:
            try:
                handle = safe_open(str(file), framework="np")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{file}: truncated or corrupted safetensors file ({e}); download or save it again"
                ) from e
            self._handles[file] = handle
            for name in handle.keys():
                if name in self.where:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self.where[name].name}")
                self.where[name] = file
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            for name, shard in read_json(index, "safetensors index")["weight_map"].items():
                if self.where.get(name) != directory / shard:
                    raise CheckpointError(f"{index}: lists tensor {name!r} in {shard}, which does not hold it")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str, dtype) -> Any:
        """The tensor as a numpy array; BF16 as a ``dtype`` jax array (numpy has no bfloat16: flax reader)."""
        file = self.where[name]
        if self._handles[file].get_slice(name).get_dtype() == "BF16":
            with self._safe_open(str(file), framework="flax") as f:
                return f.get_tensor(name).astype(dtype)
        return self._handles[file].get_tensor(name)


def _weight_files(directory: Path, auto_class: str) -> list[Path]:
    """The safetensors files holding the model's weights, or a clear error."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' object mapping tensor names to shard files")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            name = str(shard)
            bad = unsafe_component(name)
            if bad:
                raise CheckpointError(
                    f"{index}: shard name {name!r} {bad}: it is not a file name in the model folder; a weight_map "
                    "names shard files beside the index (e.g. 'model-00001-of-00002.safetensors')"
                )
            file = directory / name
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard listed in {index.name} is missing")
            files.append(file)
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory / pickles[0]}: pickle checkpoints are refused (unpickling runs arbitrary code); "
            + _CONVERT_HINT.format(auto=auto_class).replace("DIR", repr(str(directory)))
        )
    raise FileNotFoundError(f"{directory}: no model.safetensors (or model.safetensors.index.json) found")


# ----------------------------------------------------------------------------
# Configs


def _get(hf: dict, key: str, file: Path, default: Any = ...) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise CheckpointError(f"{file}: missing required key {key!r}")
    return default


def _rope_theta(hf: dict, file: Path) -> float:
    params = hf.get("rope_parameters")  # transformers >= 5
    if params is None:
        params = hf.get("rope_scaling")  # transformers 4
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise CheckpointError(f"{file}: RoPE scaling {kind!r} is not supported (only plain RoPE)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def llama_config(hf: dict, file: Path | str = "config.json") -> _llama.LlamaConfig:
    """Translate a Llama/Mistral/Qwen2 ``config.json`` dict into a :class:`~lora_jax.models.llama.LlamaConfig`.

    Args:
      hf: the parsed ``config.json``.
      file: its path, for error messages.

    Returns:
      The config. A sliding attention window caps ``max_seq_len`` (up to the
      window, full attention computes the same thing).

    Raises:
      CheckpointError: a required key is missing or a feature is unsupported.

    Examples:
      >>> cfg = llama_config({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
      ...     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      ...     "intermediate_size": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
      >>> cfg.qkv_bias, cfg.head_dim, cfg.rope_theta, cfg.tie_embeddings
      (True, 8, 1000000.0, False)
    """
    file = Path(file)
    act = _get(hf, "hidden_act", file, "silu")
    if act != "silu":
        raise CheckpointError(f"{file}: hidden_act={act!r} is not supported for {hf.get('model_type')} (only 'silu')")
    n_heads = _get(hf, "num_attention_heads", file)
    max_len = int(_get(hf, "max_position_embeddings", file, 2048))
    window = hf.get("sliding_window")
    sliding = window is not None and (
        hf.get("model_type") == "mistral"
        or hf.get("use_sliding_window")
        or "sliding_attention" in (hf.get("layer_types") or ())
    )
    if sliding:
        max_len = min(max_len, int(window))
    return _llama.LlamaConfig(
        vocab_size=_get(hf, "vocab_size", file),
        dim=_get(hf, "hidden_size", file),
        n_layers=_get(hf, "num_hidden_layers", file),
        n_heads=n_heads,
        n_kv_heads=_get(hf, "num_key_value_heads", file, n_heads),
        ffn_dim=_get(hf, "intermediate_size", file),
        head_dim=hf.get("head_dim") or None,
        rope_theta=_rope_theta(hf, file),
        rms_eps=float(_get(hf, "rms_norm_eps", file, 1e-6)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", file, False)),
        qkv_bias=hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
        max_seq_len=max_len,
    )


def bert_config(hf: dict, file: Path | str = "config.json") -> _bert.BertConfig:
    """Translate a BERT ``config.json`` dict into a :class:`~lora_jax.models.bert.BertConfig`.

    Examples:
      >>> bert_config({"model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
      ...     "num_attention_heads": 4, "intermediate_size": 64}).head_dim
      8
    """
    file = Path(file)
    kind = _get(hf, "position_embedding_type", file, "absolute")
    if kind != "absolute":
        raise CheckpointError(f"{file}: position_embedding_type={kind!r} is not supported (only 'absolute')")
    act = _get(hf, "hidden_act", file, "gelu")
    if act not in _bert.ACTIVATIONS:
        raise CheckpointError(f"{file}: hidden_act={act!r} is not supported; one of {sorted(_bert.ACTIVATIONS)}")
    return _bert.BertConfig(
        vocab_size=_get(hf, "vocab_size", file),
        dim=_get(hf, "hidden_size", file),
        n_layers=_get(hf, "num_hidden_layers", file),
        n_heads=_get(hf, "num_attention_heads", file),
        ffn_dim=_get(hf, "intermediate_size", file),
        max_positions=_get(hf, "max_position_embeddings", file, 512),
        type_vocab_size=_get(hf, "type_vocab_size", file, 2),
        ln_eps=float(_get(hf, "layer_norm_eps", file, 1e-12)),
        act=act,
    )


# ----------------------------------------------------------------------------
# Tensor layouts: (hf name, our path, torch shape, transpose)

Entry = tuple[str, tuple, tuple[int, ...], bool]


def llama_entries(c: _llama.LlamaConfig, hf: dict) -> list[Entry]:
    """Where each Hugging Face Llama tensor goes in our tree (and how it is transformed)."""
    o_bias = hf.get("model_type") != "qwen2" and bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    D, F = c.dim, c.ffn_dim
    out: list[Entry] = [("embed_tokens.weight", ("embed",), (c.vocab_size, D), False)]

    def linear(hf_name, path, d_out, d_in, bias):
        out.append((f"{hf_name}.weight", (*path, "kernel"), (d_out, d_in), True))
        if bias:
            out.append((f"{hf_name}.bias", (*path, "bias"), (d_out,), False))

    for i in range(c.n_layers):
        h, p = f"layers.{i}.", ("layers", i)
        out.append((h + "input_layernorm.weight", (*p, "attn_norm", "scale"), (D,), False))
        linear(h + "self_attn.q_proj", (*p, "attn", "q_proj"), c.q_dim, D, c.qkv_bias)
        linear(h + "self_attn.k_proj", (*p, "attn", "k_proj"), c.kv_dim, D, c.qkv_bias)
        linear(h + "self_attn.v_proj", (*p, "attn", "v_proj"), c.kv_dim, D, c.qkv_bias)
        linear(h + "self_attn.o_proj", (*p, "attn", "o_proj"), D, c.q_dim, o_bias)
        out.append((h + "post_attention_layernorm.weight", (*p, "mlp_norm", "scale"), (D,), False))
        linear(h + "mlp.gate_proj", (*p, "mlp", "gate_proj"), F, D, mlp_bias)
        linear(h + "mlp.up_proj", (*p, "mlp", "up_proj"), F, D, mlp_bias)
        linear(h + "mlp.down_proj", (*p, "mlp", "down_proj"), D, F, mlp_bias)
    out.append(("norm.weight", ("norm", "scale"), (D,), False))
    return out


def bert_entries(c: _bert.BertConfig, hf: dict) -> list[Entry]:
    """Where each Hugging Face BERT tensor goes in our tree (and how it is transformed)."""
    D, F = c.dim, c.ffn_dim
    out: list[Entry] = [
        ("embeddings.word_embeddings.weight", ("embed",), (c.vocab_size, D), False),
        ("embeddings.position_embeddings.weight", ("pos_embed",), (c.max_positions, D), False),
        ("embeddings.token_type_embeddings.weight", ("type_embed",), (c.type_vocab_size, D), False),
    ]

    def norm(hf_name, path):
        out.append((f"{hf_name}.weight", (*path, "scale"), (D,), False))
        out.append((f"{hf_name}.bias", (*path, "bias"), (D,), False))

    def linear(hf_name, path, d_out, d_in):
        out.append((f"{hf_name}.weight", (*path, "kernel"), (d_out, d_in), True))
        out.append((f"{hf_name}.bias", (*path, "bias"), (d_out,), False))

    norm("embeddings.LayerNorm", ("embed_norm",))
    for i in range(c.n_layers):
        h, p = f"encoder.layer.{i}.", ("layers", i)
        for ours, theirs in (("q_proj", "self.query"), ("k_proj", "self.key"), ("v_proj", "self.value")):
            linear(h + "attention." + theirs, (*p, "attn", ours), D, D)
        linear(h + "attention.output.dense", (*p, "attn", "o_proj"), D, D)
        norm(h + "attention.output.LayerNorm", (*p, "attn_norm"))
        linear(h + "intermediate.dense", (*p, "mlp", "up_proj"), F, D)
        linear(h + "output.dense", (*p, "mlp", "down_proj"), D, F)
        norm(h + "output.LayerNorm", (*p, "mlp_norm"))
    return out


# Tensors a checkpoint may carry that these models do not use: buffers and task heads.
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|position_ids)|(bert\.)?pooler\..*|cls\..*|lm_head\.weight")


def _prefix(tensors: _Tensors, first: str, candidates: tuple[str, ...]) -> str:
    for prefix in candidates:
        if prefix + first in tensors.where:
            return prefix
    return candidates[0]


def _place(tree: dict, path: tuple, value: Any) -> None:
    node = tree
    for key, nxt in zip(path[:-1], path[1:], strict=True):
        if isinstance(key, int):
            while len(node) <= key:
                node.append({})
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    node[path[-1]] = value


def _convert(tensors: _Tensors, entries: list[Entry], config_file: Path, dtype) -> dict:
    missing = [name for name, *_ in entries if name not in tensors.where]
    if missing:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
        files = ", ".join(f.name for f in tensors.files)
        raise CheckpointError(
            f"{tensors.files[0].parent}: missing tensors in {files}: {shown}. "
            f"The weights do not match {config_file.name} (wrong model_type or an incomplete download?)"
        )
    for name, _, expected, _ in entries:
        actual = tensors.shape(name)
        if actual != expected:
            raise CheckpointError(
                f"{tensors.where[name]}: tensor {name!r} has shape {actual}, but {config_file} implies "
                f"{expected}; the config disagrees with the weights"
            )
    params: dict = {}
    for name, path, _, transpose in entries:
        x = tensors.read(name, dtype)
        x = jnp.asarray(x.T if transpose else x, dtype=dtype)
        _place(params, path, x)
    return params


# ----------------------------------------------------------------------------
# The loader


def load(
    path: str | os.PathLike, *, dtype=jnp.float32, tokenizer: bool = True
) -> tuple[PyTree, _llama.LlamaConfig | _bert.BertConfig, Any]:
    """Load a Hugging Face model directory into lora-jax params, config and tokenizer.

    Args:
      path: a directory with ``config.json``, ``model.safetensors`` (or shards
        and ``model.safetensors.index.json``) and ``tokenizer.json``.
      dtype: dtype of every parameter.
      tokenizer: load ``tokenizer.json`` with the ``tokenizers`` library; with
        ``False`` the third element is ``None``.

    Returns:
      ``(params, config, tokenizer)``: params for :mod:`lora_jax.models.llama`
      (with a ``LlamaConfig``) or :mod:`lora_jax.models.bert` (with a
      ``BertConfig``), and a ``tokenizers.Tokenizer`` configured as the file
      says (padding and truncation included).

    Raises:
      FileNotFoundError: the directory, ``config.json``, the weights or
        ``tokenizer.json`` is missing.
      CheckpointError: pickle-only weights, a truncated or corrupted
        safetensors file, an unsupported ``model_type``, tensors missing, or a
        tensor whose shape disagrees with ``config.json``.

    Examples:
      >>> import json, tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> _ = (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64,
      ...     "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}))
      >>> _ = (d / "pytorch_model.bin").write_bytes(b"")
      >>> load(d)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax.errors.CheckpointError: .../pytorch_model.bin: pickle checkpoints are refused ...
    """
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such model directory")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory}: expected a model directory (with config.json), got a file")
    config_file = directory / "config.json"
    hf = read_json(config_file, "config.json (the model's Hugging Face config)")
    model_type = hf.get("model_type")
    builders: dict[str, tuple[Callable, Callable, str, tuple[str, ...]]] = {
        **{t: (llama_config, llama_entries, "embed_tokens.weight", ("model.", "")) for t in LLAMA_TYPES},
        "bert": (bert_config, bert_entries, "embeddings.word_embeddings.weight", ("", "bert.")),
    }
    if model_type not in builders:
        raise CheckpointError(
            f"{config_file}: model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    make_config, make_entries, first, prefixes = builders[model_type]
    try:
        config = make_config(hf, config_file)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config_file}: {e}") from e
    tensors = _Tensors(directory, "AutoModelForCausalLM" if model_type in LLAMA_TYPES else "AutoModel")
    prefix = _prefix(tensors, first, prefixes)
    entries = [(prefix + n, p, s, t) for n, p, s, t in make_entries(config, hf)]
    if model_type in LLAMA_TYPES and not config.tie_embeddings:
        entries.append(("lm_head.weight", ("lm_head",), (config.vocab_size, config.dim), True))
    params = _convert(tensors, entries, config_file, dtype)
    used = {name for name, *_ in entries}
    extra = sorted(n for n in tensors.where if n not in used and not _IGNORED.fullmatch(n))
    if extra:
        warnings.warn(
            f"{directory}: {len(extra)} tensors not used by the {model_type} model: {', '.join(extra[:8])}",
            stacklevel=2,
        )
    tok = _load_tokenizer(directory / "tokenizer.json") if tokenizer else None
    return params, config, tok


def _load_tokenizer(file: Path):
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: missing tokenizer.json (lora-jax reads only the `tokenizers` JSON format); "
            "pass tokenizer=False to load the weights alone"
        )
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{file}: not a valid tokenizer.json ({e})") from e
