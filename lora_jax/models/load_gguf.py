"""Load Llama- and Gemma-3-architecture GGUF files (llama.cpp's format) into lora-jax params.

``gemma3`` files give a :class:`~lora_jax.models.gemma3.Gemma3Config` and the
parameter tree of :mod:`lora_jax.models.gemma3` (its extra norms map from
``attn_{q,k}_norm``, ``post_attention_norm`` and ``post_ffw_norm``; llama.cpp
stores Gemma's norm scales as ``1 + scale``, which the loader subtracts, and
does not permute Gemma's Q/K rows). SentencePiece vocabularies (``llama``
tokenizer model) load through :mod:`lora_jax.models.sentencepiece`.

The file is parsed by :mod:`lora_jax.models.gguf_file` (a memory map, no
pickle). Metadata gives a :class:`~lora_jax.models.llama.LlamaConfig` and a
:class:`~lora_jax.models.tokenizer.Tokenizer`; tensors become the parameter
tree of :mod:`lora_jax.models.llama`:

====================================  =====================================
GGUF tensor (shape ``[ne0, ne1]``)    lora-jax path (shape)
====================================  =====================================
``token_embd.weight [D, V]``          ``embed`` ``(V, D)``
``blk.<i>.attn_{q,k,v,output}``       ``layers/<i>/attn/{q,k,v,o}_proj/kernel`` ``(d_in, d_out)``
``blk.<i>.ffn_{gate,up,down}``        ``layers/<i>/mlp/{gate,up,down}_proj/kernel``
``blk.<i>.attn_norm / ffn_norm``      ``layers/<i>/{attn,mlp}_norm/scale``
``output_norm.weight``                ``norm/scale``
``output.weight [D, V]``              ``lm_head`` ``(D, V)``; absent -> tied embeddings
====================================  =====================================

GGUF lists ``ne0`` (the input width) first, so a weight's data is the
PyTorch-style ``(d_out, d_in)`` matrix and our kernel is its transpose.
llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` within each
head (it pairs rotary dimensions as ``(0, 1), (2, 3)...``; we use Hugging Face's
rotate-half pairs ``(0, H/2), (1, H/2+1)...``); :func:`unpermute_rope_rows`
undoes it. Since the permutation only moves output rows, it is applied to
quantized codes and their per-block scales alike.

Quantized tensors: ``Q8_0``, ``Q4_0`` and ``Q4_1`` (blocks of 32 along the
input axis) are imported exactly as :mod:`lora_jax.quant` leaves (``int8``,
``int4``, ``int4_asym`` at block size 32), or dequantized to float with
``dequantize=True``. ``Q4_K``, ``Q6_K``, ``Q5_0`` and ``Q5_1`` become the
K-quant formats of :mod:`lora_jax.quant.kquants` (the file's own codes and
scales, bit-exact). Other ggml types load only with ``dequantize=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.errors import GGUFError
from lora_jax.models import gguf_file as _gguf_file
from lora_jax.models import sentencepiece as _sentencepiece
from lora_jax.models import tokenizer as _tokenizer
from lora_jax.models.gemma3 import Gemma3Config
from lora_jax.models.llama import LlamaConfig
from lora_jax.quant import kquants as _kquants

PyTree = Any

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
GGUF_MAGIC = b"GGUF"
BLOCK = 32  # elements per block of Q4_0, Q4_1, Q8_0
# ggml type -> (bytes per block, lora_jax.quant format)
EXACT_TYPES = {"Q8_0": (34, "int8"), "Q4_0": (18, "int4"), "Q4_1": (20, "int4_asym")}

_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", "scale"),
    "ffn_norm.weight": ("mlp_norm", "scale"),
    "attn_q.weight": ("attn", "q_proj", "kernel"),
    "attn_k.weight": ("attn", "k_proj", "kernel"),
    "attn_v.weight": ("attn", "v_proj", "kernel"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "attn_q.bias": ("attn", "q_proj", "bias"),
    "attn_k.bias": ("attn", "k_proj", "bias"),
    "attn_v.bias": ("attn", "v_proj", "bias"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
    # Gemma 3
    "attn_q_norm.weight": ("attn", "q_norm", "scale"),
    "attn_k_norm.weight": ("attn", "k_norm", "scale"),
    "post_attention_norm.weight": ("post_attn_norm", "scale"),
    "post_ffw_norm.weight": ("post_mlp_norm", "scale"),
}


# ----------------------------------------------------------------------------
# Opening and metadata


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"GGUF file not found: {str(p)!r}")
    if p.is_dir():
        raise GGUFError(f"{str(p)!r} is a directory, not a GGUF file (for a Hugging Face directory use load_hf)")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] == GGUF_MAGIC:
        return p
    if head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and head[1] <= 5):
        raise GGUFError(
            f"{str(p)!r} is a PyTorch pickle checkpoint (.bin/.pt), which lora-jax never loads because "
            "unpickling can run arbitrary code; convert it to safetensors or GGUF"
        )
    raise GGUFError(f"{str(p)!r} is not a GGUF file: it starts with {head[:4]!r}, not {GGUF_MAGIC!r}")


def _reader(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, tensors)`` of a checked GGUF file (:func:`lora_jax.models.gguf_file.read`)."""
    p = _check_path(path)
    try:
        return _gguf_file.read(p)
    except GGUFError:
        raise
    except Exception as e:  # struct/reshape errors on a cut-off or corrupt file
        raise GGUFError(
            f"{str(p)!r}: cannot read the GGUF structure ({type(e).__name__}: {e}); the file "
            f"({p.stat().st_size} bytes) is truncated or corrupt"
        ) from None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as Python values (no tensor data is read).

    Raises:
      FileNotFoundError: no such file.
      GGUFError: not a GGUF file, a pickle checkpoint, or a truncated file.
    """
    return _reader(path)[0]


def load_tokenizer(path: str | os.PathLike) -> _tokenizer.Tokenizer:
    """Build the tokenizer of a GGUF file from its metadata alone (no tensor is converted).

    Raises:
      FileNotFoundError, GGUFError: as :func:`load`; ValueError: an unsupported tokenizer.
    """
    return tokenizer_from_metadata(read_metadata(path), source=repr(str(path)))


def tokenizer_from_metadata(meta: Mapping[str, Any], *, source: str) -> _tokenizer.Tokenizer:
    """The tokenizer the metadata describes: SentencePiece (``llama``) or byte-level BPE (``gpt2``)."""
    if meta.get("tokenizer.ggml.model") == "llama":
        return _sentencepiece.from_gguf_metadata(meta, source=source)
    return _tokenizer.from_gguf_metadata(meta, source=source)


def _meta_int(meta, key, path, default=None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise GGUFError(f"{str(path)!r}: metadata key {key!r} is missing")
    if isinstance(v, list):
        raise GGUFError(f"{str(path)!r}: {key} is a per-layer list {v[:4]}...; lora-jax needs one value")
    return int(v)


def _shared_fields(meta: Mapping[str, Any], path, arch: str, model: str, **defaults) -> dict[str, Any]:
    """The :class:`LlamaConfig` / :class:`Gemma3Config` fields both read from ``<arch>.*`` metadata.

    ``defaults`` give ``rope_theta``, ``rms_eps`` and ``max_seq_len`` when the file omits them.
    """
    a = arch
    n_heads = _meta_int(meta, f"{a}.attention.head_count", path)
    dim = _meta_int(meta, f"{a}.embedding_length", path)
    scaling = meta.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{str(path)!r}: rope scaling {scaling!r} is not supported by lora-jax's {model}")
    vocab = meta.get(f"{a}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    return dict(
        vocab_size=int(vocab) if vocab is not None else -1,
        dim=dim,
        n_layers=_meta_int(meta, f"{a}.block_count", path),
        n_heads=n_heads,
        n_kv_heads=_meta_int(meta, f"{a}.attention.head_count_kv", path, n_heads),
        ffn_dim=_meta_int(meta, f"{a}.feed_forward_length", path),
        head_dim=_meta_int(meta, f"{a}.attention.key_length", path, dim // max(n_heads, 1)),
        rope_theta=float(meta.get(f"{a}.rope.freq_base", defaults["rope_theta"])),
        rms_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", defaults["rms_eps"])),
        max_seq_len=int(meta.get(f"{a}.context_length", defaults["max_seq_len"])),
    )


def _build(cls, path, **fields):
    try:
        return cls(**fields)
    except ValueError as e:
        raise GGUFError(f"{str(path)!r}: the metadata gives an invalid config: {e}") from None


def config_from_metadata(meta: Mapping[str, Any], path: str | os.PathLike = "<gguf>", *,
                         tie=True) -> LlamaConfig | Gemma3Config:
    """Build the config a GGUF file's metadata describes (:func:`gemma3_config_from_metadata` for ``gemma3``).

    Args:
      meta: metadata as :func:`read_metadata` returns it.
      path: the file, for error messages.
      tie: whether the file has no ``output.weight`` (tied embeddings).

    Raises:
      GGUFError: not a Llama- or Gemma-3-architecture file, or a feature lora-jax's Llama lacks
        (rope scaling, partial rotary dimensions, per-layer head counts).
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{str(path)!r}: general.architecture is {arch!r}; "
            f"lora-jax loads {list(SUPPORTED_ARCHITECTURES)} GGUF files"
        )
    if arch == "gemma3":
        return gemma3_config_from_metadata(meta, path)
    f = _shared_fields(meta, path, arch, "Llama", rope_theta=10000.0, rms_eps=1e-5, max_seq_len=2048)
    rot = meta.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != f["head_dim"]:
        raise GGUFError(f"{str(path)!r}: rope.dimension_count={rot} != head_dim={f['head_dim']} "
                        "(partial RoPE unsupported)")
    return _build(LlamaConfig, path, **f, tie_embeddings=tie)


def gemma3_config_from_metadata(meta: Mapping[str, Any], path: str | os.PathLike = "<gguf>") -> Gemma3Config:
    """Build the :class:`~lora_jax.models.gemma3.Gemma3Config` of a ``gemma3`` GGUF file's metadata.

    The file names neither the local RoPE base nor the layer pattern; Gemma 3
    fixes them (10000, every sixth layer global), as Hugging Face's loader assumes.
    """
    f = _shared_fields(meta, path, "gemma3", "Gemma 3", rope_theta=1_000_000.0, rms_eps=1e-6, max_seq_len=32768)
    return _build(Gemma3Config, path, **f, query_pre_attn_scalar=float(f["head_dim"]),
                  sliding_window=_meta_int(meta, "gemma3.attention.sliding_window", path, 512))


# ----------------------------------------------------------------------------
# Blocks


def unpack_blocks(raw: np.ndarray, ggml_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Split rows of ``Q8_0``/``Q4_0``/``Q4_1`` blocks into codes, scales and offsets.

    Args:
      raw: ``uint8`` of shape ``(rows, n_blocks * bytes_per_block)`` (a GGUF tensor's data).
      ggml_type: ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"``.

    Returns:
      ``codes`` int8 ``(rows, n_blocks * 32)`` (Q8_0: -128..127, Q4_0: -8..7,
      Q4_1: 0..15), ``scales`` float32 ``(rows, n_blocks)`` and, for Q4_1, the
      block minimum ``offsets`` (else ``None``). Element ``j`` of a row is
      ``codes[j] * scales[j // 32] (+ offsets[j // 32])``.

    Examples:
      >>> import gguf
      >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
      >>> raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
      >>> codes, scales, offsets = unpack_blocks(raw, "Q4_1")
      >>> codes.shape, scales.shape, int(codes.min()), int(codes.max())
      ((1, 64), (1, 2), 0, 15)
    """
    nbytes, _ = EXACT_TYPES[ggml_type]
    rows = raw.shape[0]
    b = np.asarray(raw, np.uint8).reshape(rows, -1, nbytes)

    def f16(lo):
        return np.ascontiguousarray(b[..., lo : lo + 2]).view(np.float16)[..., 0].astype(np.float32)

    scales = f16(0)
    offsets = None
    if ggml_type == "Q8_0":
        codes = np.ascontiguousarray(b[..., 2:]).view(np.int8)
    else:
        start = 2
        if ggml_type == "Q4_1":
            offsets = f16(2)
            start = 4
        qs = b[..., start:]
        # element i of a block sits in the low nibble of byte i (i < 16), else the high nibble of byte i-16
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)
        if ggml_type == "Q4_0":
            codes = codes - np.int8(8)
    return codes.reshape(rows, -1), scales, offsets


def dequantize_blocks(codes, scales, offsets=None) -> np.ndarray:
    """Float32 values of :func:`unpack_blocks` output (``codes * scale + offset``, ggml's order)."""
    lead = codes.shape[:-1]
    w = codes.reshape(*lead, -1, BLOCK).astype(np.float32) * scales[..., None]
    if offsets is not None:
        w += offsets[..., None]
    return w.reshape(codes.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of ``attn_q``/``attn_k`` weights.

    ``w`` has the ``(d_out, ...)`` GGUF row layout with ``d_out = n_heads * head_dim``;
    llama.cpp stores row ``h*H + 2*i + j`` for Hugging Face row ``h*H + j*H/2 + i``.

    Examples:
      >>> unpermute_rope_rows(np.array([0, 2, 1, 3, 4, 6, 5, 7]), 2).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7]
    """
    d_out = w.shape[0]
    head_dim = d_out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------
# Tensors -> params


def _expected_shapes(c: LlamaConfig | Gemma3Config) -> dict[str, tuple[int, ...]]:
    """GGUF shape ``[ne0, ne1]`` of every tensor the config implies."""
    shapes = {"token_embd.weight": (c.dim, c.vocab_size), "output_norm.weight": (c.dim,)}
    gemma = isinstance(c, Gemma3Config)
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.dim, c.vocab_size)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (c.dim,),
            p + "ffn_norm.weight": (c.dim,),
            p + "attn_q.weight": (c.dim, c.q_dim),
            p + "attn_k.weight": (c.dim, c.kv_dim),
            p + "attn_v.weight": (c.dim, c.kv_dim),
            p + "attn_output.weight": (c.q_dim, c.dim),
            p + "ffn_gate.weight": (c.dim, c.ffn_dim),
            p + "ffn_up.weight": (c.dim, c.ffn_dim),
            p + "ffn_down.weight": (c.ffn_dim, c.dim),
        }
        if gemma:
            shapes |= {p + "attn_q_norm.weight": (c.head_dim,), p + "attn_k_norm.weight": (c.head_dim,),
                       p + "post_attention_norm.weight": (c.dim,), p + "post_ffw_norm.weight": (c.dim,)}
        elif c.qkv_bias:
            shapes |= {p + "attn_q.bias": (c.q_dim,), p + "attn_k.bias": (c.kv_dim,), p + "attn_v.bias": (c.kv_dim,)}
    return shapes


def _check_tensors(path, tensors: Mapping[str, Any], c: LlamaConfig) -> None:
    expected = _expected_shapes(c)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise GGUFError(
            f"{str(path)!r}: tensors missing for the config in the metadata ({c.n_layers} layers): "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise GGUFError(
            f"{str(path)!r}: tensors lora-jax's Llama has no place for: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''} (does the metadata's block_count match the file?)"
        )
    for name, shape in expected.items():
        got = tuple(int(x) for x in tensors[name].shape)
        if got != shape:
            raise GGUFError(
                f"{str(path)!r}: tensor {name!r} has shape {list(got)} but the metadata (dim={c.dim}, "
                f"heads={c.n_heads}/{c.n_kv_heads}, head_dim={c.head_dim}, ffn={c.ffn_dim}, vocab={c.vocab_size}) "
                f"implies {list(shape)}"
            )


def _rows(t) -> int:
    return int(np.prod([int(x) for x in t.shape[1:]])) if len(t.shape) > 1 else 1


def _float_rows(t) -> np.ndarray:
    """A float tensor's data as float32 ``(rows, ne0)``."""
    from gguf import quants

    kind = t.tensor_type.name
    data = np.asarray(t.data)
    if kind == "F32":
        w = data.astype(np.float32, copy=False)
    elif kind == "F16":
        w = data.astype(np.float32)
    else:  # BF16, K-quants, ...: gguf's own numpy dequantizer
        w = quants.dequantize(data, t.tensor_type)
    return w.reshape(_rows(t), int(t.shape[0]))


def _convert(path, name: str, t, *, dequantize: bool, dtype, permute_heads: int | None = None, table=False):
    """One GGUF tensor as a float array or a quantized leaf in lora-jax layout.

    A 2-D tensor's data is ``(rows, ne0)``: a weight's rows are its outputs, so
    the kernel is the transpose; an embedding ``table`` keeps the row layout (a
    quantized table is the transposed view of a kernel whose blocks run along ``D``).
    """
    kind = t.tensor_type.name
    vector = len(t.shape) == 1
    if kind in EXACT_TYPES and not vector:
        codes, scales, offsets = unpack_blocks(np.asarray(t.data), kind)
        if permute_heads:
            codes, scales = unpermute_rope_rows(codes, permute_heads), unpermute_rope_rows(scales, permute_heads)
            offsets = None if offsets is None else unpermute_rope_rows(offsets, permute_heads)
        if not dequantize:
            from lora_jax import quant

            q = quant.from_codes(
                EXACT_TYPES[kind][1],
                codes.T,
                scales.T,
                offsets=None if offsets is None else offsets.T,
                block_size=BLOCK,
                dtype=dtype,
            )
            return q.T if table else q
        w = dequantize_blocks(codes, scales, offsets)
    elif kind in _kquants.GGML_TYPES and not vector and not dequantize:
        from lora_jax import quant

        perm = (lambda a: unpermute_rope_rows(a, permute_heads)) if permute_heads else None
        fmt, ch, bs = _kquants.from_gguf_blocks(np.asarray(t.data), kind, perm)
        ch = {k: None if v is None else jnp.asarray(v) for k, v in ch.items()}
        q = quant.QTensor(**ch, format=fmt, block_size=bs, stored_shape=(int(t.shape[0]), _rows(t)),
                          compute_dtype=dtype)
        return q.T if table else q
    elif kind in ("F32", "F16", "BF16") or dequantize:
        try:
            w = _float_rows(t)
        except NotImplementedError:
            raise GGUFError(
                f"{str(path)!r}: tensor {name!r} has ggml type {kind}, which gguf cannot dequantize"
            ) from None
        if vector:
            w = w.reshape(-1)
        if permute_heads:
            w = unpermute_rope_rows(w, permute_heads)
    else:
        raise GGUFError(
            f"{str(path)!r}: tensor {name!r} is {kind}; lora-jax imports "
            f"{sorted(EXACT_TYPES) + sorted(_kquants.GGML_TYPES)} blocks exactly "
            "and other ggml types only with load(..., dequantize=True)"
        )
    if not vector and not table:
        w = w.T
    return jnp.asarray(w, dtype)


def _set(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load(
    path: str | os.PathLike,
    *,
    dequantize: bool = False,
    dtype=jnp.float32,
    tokenizer: bool = True,
) -> tuple[PyTree, LlamaConfig | Gemma3Config, _tokenizer.Tokenizer | None]:
    """Load a Llama- or Gemma-3-architecture GGUF file.

    Args:
      path: the ``.gguf`` file.
      dequantize: turn quantized weights into float arrays of ``dtype``. By
        default ``Q8_0``/``Q4_0``/``Q4_1`` weights become exact
        :mod:`lora_jax.quant` leaves (``int8``/``int4``/``int4_asym``, block 32).
        A quantized embedding table becomes the transposed view (``QTensor.T``)
        of a ``(D, V)`` kernel, which is also the tied output head.
      dtype: float dtype of the float leaves (and of dequantized values).
      tokenizer: also build the tokenizer from the metadata.

    Returns:
      ``(params, config, tokenizer)`` (``tokenizer`` is ``None`` when not asked for).

    Raises:
      FileNotFoundError: no such file.
      GGUFError: not a GGUF file (or a pickle checkpoint), truncated, not the
        ``llama`` architecture, or tensors that disagree with the metadata.
    """
    meta, tensors = _reader(path)
    config = config_from_metadata(meta, path, tie="output.weight" not in tensors)
    gemma = isinstance(config, Gemma3Config)
    if any(n.endswith("attn_q.bias") for n in tensors):
        config = dataclasses.replace(config, qkv_bias=True)
    _check_tensors(path, tensors, config)
    c = config

    params: dict = {"layers": [{} for _ in range(c.n_layers)]}
    for name, t in tensors.items():
        conv = functools.partial(_convert, path, name, t, dequantize=dequantize, dtype=dtype)
        if name == "token_embd.weight":
            params["embed"] = conv(table=True)
        elif name == "output_norm.weight":
            params["norm"] = {"scale": conv() - 1 if gemma else conv()}
        elif name == "output.weight":
            params["lm_head"] = conv()
        else:
            _, i, rest = name.split(".", 2)
            if gemma:  # llama.cpp stores Gemma's norms as 1 + scale and its Q/K rows unpermuted
                _set(params["layers"][int(i)], _LAYER_TENSORS[rest], conv() - 1 if "norm" in rest else conv())
                continue
            heads = {"attn_q": c.n_heads, "attn_k": c.n_kv_heads}.get(rest.split(".")[0])
            _set(params["layers"][int(i)], _LAYER_TENSORS[rest], conv(permute_heads=heads))
    tok = None
    if tokenizer:
        tok = tokenizer_from_metadata(meta, source=repr(str(path)))
        if tok.vocab_size > c.vocab_size:
            raise GGUFError(
                f"{str(path)!r}: the tokenizer has {tok.vocab_size} tokens but the model only {c.vocab_size}"
            )
    return params, config, tok
