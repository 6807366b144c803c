"""Merged Hugging Face export: a model with its adapters folded in, as a ``transformers`` folder.

:func:`export_merged_hf` writes ``config.json``, ``model.safetensors`` and
``tokenizer.json`` readable by ``transformers``' ``from_pretrained``;
:func:`hf_config` is the mapping of our model configs to Hugging Face's.
Every file is written atomically (:func:`lora_jax.io.files.atomic_write`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import CheckpointError
from lora_jax.io.factors import strip_adapters
from lora_jax.io.files import atomic_write, json_bytes
from lora_jax.models import bert as _bert
from lora_jax.models import llama as _llama
from lora_jax.models import load_hf as _load_hf
from lora_jax.models import stacking as _stacking

PyTree = Any
PathLike = str | os.PathLike


def hf_config(params: PyTree, config: Any, dtype_name: str) -> tuple[dict, list]:
    """Return the Hugging Face ``config.json`` of a model and its tensors as ``(name, path, shape, transpose)``.

    Args:
      params: the model's params (plain arrays or abstract ``jax.ShapeDtypeStruct`` s).
      config: a :class:`~lora_jax.models.llama.LlamaConfig` or :class:`~lora_jax.models.bert.BertConfig`.
      dtype_name: the ``dtype`` to record, e.g. ``"float32"``.

    Raises:
      TypeError: an unknown config type.
      CheckpointError: an o_proj bias without q/k/v biases (no Hugging Face model has it).
    """
    if isinstance(config, _llama.LlamaConfig):
        c = config
        layer0 = params["layers"][0]
        o_bias = "bias" in layer0["attn"]["o_proj"]
        mlp_bias = "bias" in layer0["mlp"]["up_proj"]
        qwen2 = c.qkv_bias and not o_bias
        hf = {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "intermediate_size": c.ffn_dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.rms_eps,
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "tie_word_embeddings": c.tie_embeddings,
            "dtype": dtype_name,
        }
        if qwen2:
            hf["use_sliding_window"] = False
        else:
            if c.qkv_bias != o_bias:
                raise CheckpointError("export_merged_hf: an o_proj bias without q/k/v biases has no Hugging Face model")
            hf.update(attention_bias=o_bias, mlp_bias=mlp_bias)
        entries = [("model." + n, p, s, t) for n, p, s, t in _load_hf.llama_entries(c, hf)]
        if not c.tie_embeddings:
            entries.append(("lm_head.weight", ("lm_head",), (c.vocab_size, c.dim), True))
        return hf, entries
    if isinstance(config, _bert.BertConfig):
        c = config
        hf = {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "intermediate_size": c.ffn_dim,
            "max_position_embeddings": c.max_positions,
            "type_vocab_size": c.type_vocab_size,
            "layer_norm_eps": c.ln_eps,
            "hidden_act": c.act,
            "position_embedding_type": "absolute",
            "dtype": dtype_name,
        }
        return hf, _load_hf.bert_entries(c, hf)
    raise TypeError(f"export_merged_hf: config must be a LlamaConfig or BertConfig, got {type(config).__name__}")


def _at(tree: PyTree, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def export_merged_hf(
    directory: PathLike,
    params: PyTree,
    config: _llama.LlamaConfig | _bert.BertConfig,
    tokenizer: Any = None,
    *,
    original_params: PyTree | None = None,
    dtype: Any = None,
) -> dict[str, float]:
    """Write the model with its adapters folded in as a Hugging Face folder.

    ``config.json``, ``model.safetensors`` (torch layout: kernels transposed)
    and, with a tokenizer, ``tokenizer.json`` and ``tokenizer_config.json``.
    Llama-family configs load with ``transformers.AutoModelForCausalLM``
    (``llama``, or ``qwen2`` for q/k/v biases alone), BERT with ``AutoModel``.
    A quantized base is dequantized and the adapter added to it.

    Args:
      directory: the folder (created if needed).
      params: adapted params (LoRA and quantized leaves allowed).
      config: the model's :class:`~lora_jax.models.llama.LlamaConfig` or
        :class:`~lora_jax.models.bert.BertConfig`.
      tokenizer: a ``tokenizers.Tokenizer`` to save with the model.
      original_params: the float weights a quantized base was made from; with
        them the relative error of each quantized weight is measured.
      dtype: dtype to write (e.g. ``jnp.bfloat16``); default the embedding's dtype.

    Returns:
      ``{path: ||merged_q - merged_float|| / ||merged_float||}`` for every
      weight that was quantized, where ``merged_float`` is the original float
      weight plus the same adapter; empty without ``original_params`` or
      quantized weights.

    Raises:
      TypeError: an unknown config type.
      CheckpointError: the params do not fit the config (the first leaf is named).

    Examples:
      >>> import json, tempfile, jax
      >>> cfg = _llama.LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
      >>> p = _lora.init(jax.random.key(1), _llama.init(jax.random.key(0), cfg), [_lora.LoraRule.all_linear(2)])
      >>> d = Path(tempfile.mkdtemp())
      >>> export_merged_hf(d, p, cfg)
      {}
      >>> sorted(f.name for f in d.iterdir()), json.loads((d / "config.json").read_text())["model_type"]
      (['config.json', 'model.safetensors'], 'llama')
    """
    if _stacking.is_stacked(params):  # layers under lax.scan: the HF files name each layer
        params = _stacking.unstack_layers(params)
    if original_params is not None and _stacking.is_stacked(original_params):
        original_params = _stacking.unstack_layers(original_params)
    merged = jax.tree.map(_lora.dense, _lora.merge(params), is_leaf=_lora.is_node)
    errors: dict[str, float] = {}
    if original_params is not None:
        original = dict(_paths.leaves_with_paths(strip_adapters(original_params), is_leaf=_lora.is_node))
        merged_flat = dict(_paths.leaves_with_paths(merged))
        for path, leaf in _paths.leaves_with_paths(params, is_leaf=_lora.is_node):
            q = leaf.base if _lora.is_lora(leaf) else leaf
            if not callable(getattr(q, "dequantize", None)):
                continue
            if path not in original or _lora.is_node(original[path]):
                raise CheckpointError(f"export_merged_hf: original_params has no float weight at {path!r}")
            want = np.asarray(original[path], np.float32)
            if _lora.is_lora(leaf):
                want = want + np.asarray(leaf.delta_weight(), np.float32)
            got = np.asarray(merged_flat[path], np.float32)
            errors[path] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    first = merged["embed"]
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(first.dtype)
    hf, entries = hf_config(merged, config, dtype.name)
    used = set()
    tensors = {}
    for name, path, shape, transpose in entries:
        where = "/".join(str(k) for k in path)
        try:
            x = _at(merged, path)
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(
                f"export_merged_hf: params have no {where!r}, which {type(config).__name__} needs"
            ) from None
        a = np.asarray(x.T if transpose else x).astype(dtype)
        if a.shape != tuple(shape):
            raise CheckpointError(f"export_merged_hf: {where!r} has shape {np.shape(x)}; the config implies {shape}")
        tensors[name] = a
        used.add(where)
    left = [p for p, _ in _paths.leaves_with_paths(merged) if p not in used]
    if left:
        raise CheckpointError(f"export_merged_hf: params the config does not describe: {', '.join(left[:6])}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save

    atomic_write(directory / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(directory / "config.json", json_bytes(hf))
    if tokenizer is not None:
        atomic_write(directory / "tokenizer.json", tokenizer.to_str().encode())
        atomic_write(directory / "tokenizer_config.json", json_bytes({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return errors
