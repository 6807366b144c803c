"""Write LoRA adapters in llama.cpp's adapter GGUF format (``llama-cli --lora FILE``).

llama.cpp's adapter file has ``general.type = adapter``, ``adapter.type = lora``,
one ``adapter.lora.alpha`` for the whole file and, per adapted weight of the
base GGUF, two tensors ``<gguf name>.lora_a`` (ggml shape ``[d_in, r]``) and
``<gguf name>.lora_b`` (``[r, d_out]``). llama.cpp adds
``(alpha / r) * B (A x)`` with ``r`` the rank of that tensor; it knows nothing
of rsLoRA or per-layer alphas, so :func:`export_gguf_adapter` folds each
weight's own scale into ``B`` (``B' = B * scale * r / alpha``) and llama.cpp's
``alpha / r`` then gives the trained scale. For the ``llama`` architecture the
output rows of ``attn_q``/``attn_k`` adapters are permuted the way llama.cpp's
converter permutes the base (:func:`lora_jax.models.load_gguf.unpermute_rope_rows`
undoes it on import). Adapted embeddings or output heads, DoRA magnitudes and
adapters on weights llama.cpp cannot adapt are refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import LoraError

PyTree = Any

_ROLE_TO_GGUF = {
    "attn/q_proj": "attn_q", "attn/k_proj": "attn_k", "attn/v_proj": "attn_v", "attn/o_proj": "attn_output",
    "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up", "mlp/down_proj": "ffn_down",
}
_PATH = re.compile(r"layers/(\d+)/(attn/[qkvo]_proj|mlp/(?:gate|up|down)_proj)/kernel")


def gguf_name(path: str) -> str | None:
    """The base GGUF tensor name of a kernel path (``None``: not a weight llama.cpp adapts).

    Examples:
      >>> gguf_name("layers/3/attn/q_proj/kernel"), gguf_name("embed")
      ('blk.3.attn_q.weight', None)
    """
    m = _PATH.fullmatch(path)
    return None if m is None else f"blk.{m.group(1)}.{_ROLE_TO_GGUF[m.group(2)]}.weight"


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's ``attn_q``/``attn_k`` rows in llama.cpp's per-head order (``unpermute_rope_rows`` inverted).

    Examples:
      >>> permute_rope_rows(np.arange(8), 2).tolist()
      [0, 2, 1, 3, 4, 6, 5, 7]
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf_adapter(params: PyTree, config: Any, path: str | os.PathLike, *, architecture: str,
                        alpha: float | None = None) -> Path:
    """Write the LoRA weights of ``params`` as a llama.cpp adapter GGUF.

    Args:
      params: the adapted parameter tree (layers unrolled; LoRA nodes on projection kernels).
      config: the model config (head counts for the ``llama`` Q/K permutation).
      path: the ``.gguf`` file to write.
      architecture: the base file's ``general.architecture`` (``llama``, ``gemma3``).
      alpha: the file's ``adapter.lora.alpha``; default the largest rank (each ``B`` is rescaled to fit).

    Returns:
      The path written.

    Raises:
      LoraError: no adapter, a stacked tree, or an adapter llama.cpp cannot apply (embedding, head,
        DoRA, a bias); the message names the path.
    """
    import gguf

    if isinstance(params, dict) and isinstance(params.get("layers"), dict):
        raise LoraError("export_gguf_adapter: the layers are stacked; call models.stacking.unstack_layers first")
    found = []
    for p, x in _paths.leaves_with_paths(params, is_leaf=_lora.is_node):
        if not _lora.is_node(x) or not hasattr(x, "lora_a"):
            continue
        if not _lora.is_lora(x) or type(x) is not _lora.LoraWeight:
            raise LoraError(f"export_gguf_adapter: {p} holds a {type(x).__name__}, which llama.cpp cannot apply "
                            "(it reads plain LoRA A/B only: merge DoRA and other methods into the weights instead)")
        name = gguf_name(p)
        if name is None:
            raise LoraError(f"export_gguf_adapter: {p} is adapted, but llama.cpp adapts only the attention and MLP "
                            "projections of each block (not embeddings or the output head); drop that rule")
        found.append((p, name, x))
    if not found:
        raise LoraError("export_gguf_adapter: params hold no LoRA weight; there is nothing to export")
    alpha = float(alpha if alpha is not None else max(int(np.shape(x.lora_a)[-1]) for *_, x in found))
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for _, name, x in found:
        a = np.asarray(x.lora_a, np.float32)  # (d_in, r)
        r = a.shape[-1]
        b = np.asarray(x.lora_b, np.float32) * np.float32(x.scale * r / alpha)  # (r, d_out)
        b_rows = np.ascontiguousarray(b.T)  # (d_out, r): ggml [r, d_out]
        kind = name.split(".")[2]
        if architecture == "llama" and kind in ("attn_q", "attn_k"):
            b_rows = permute_rope_rows(b_rows, config.n_heads if kind == "attn_q" else config.n_kv_heads)
        w.add_tensor(name + ".lora_a", np.ascontiguousarray(a.T))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(b_rows))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
