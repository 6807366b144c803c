"""Tiny models written to disk for tests: a llama.cpp-style GGUF with a byte-level tokenizer; config files."""

import gguf
import jax
import numpy as np

from lora_jax.models import llama

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one printable character per byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(keep, chars))]


def permute_for_gguf(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k weights (rows are outputs)."""
    d_out = w_out_in.shape[0]
    return w_out_in.reshape(n_heads, 2, d_out // n_heads // 2, -1).swapaxes(1, 2).reshape(w_out_in.shape)


def write_gguf(path, params, cfg, *, tokens, token_types, merges=(), bos_id=0, eos_id=1, qtypes=None,
               arch="llama", drop=(), shape_overrides=None, block_count=None):
    """Write lora-jax Llama params as a llama.cpp-style GGUF (q/k permuted, weights as (out, in))."""
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers if block_count is None else block_count)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)

    def put(name, arr, kind="F32"):
        if name in drop:
            return
        arr = np.ascontiguousarray(np.asarray(arr, np.float32))
        if shape_overrides and name in shape_overrides:
            arr = arr.reshape(shape_overrides[name])
        if kind == "F32":
            w.add_tensor(name, arr)
        else:
            q = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)

    put("token_embd.weight", params["embed"], qtypes.get("token_embd", "F32"))
    put("output_norm.weight", params["norm"]["scale"])
    if "lm_head" in params:
        put("output.weight", np.asarray(params["lm_head"]).T, qtypes.get("output", "F32"))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for i, lp in enumerate(params["layers"]):
        put(f"blk.{i}.attn_norm.weight", lp["attn_norm"]["scale"])
        put(f"blk.{i}.ffn_norm.weight", lp["mlp_norm"]["scale"])
        for ours, theirs in names.items():
            m = np.asarray(lp["attn"][ours]["kernel"]).T
            if ours in ("q_proj", "k_proj"):
                m = permute_for_gguf(m, cfg.n_heads if ours == "q_proj" else cfg.n_kv_heads)
            put(f"blk.{i}.{theirs}.weight", m, qtypes.get(theirs, "F32"))
        for n in ("gate", "up", "down"):
            kernel = np.asarray(lp["mlp"][f"{n}_proj"]["kernel"]).T
            put(f"blk.{i}.ffn_{n}.weight", kernel, qtypes.get(f"ffn_{n}", "F32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_chat_gguf(path, *, dim=32, n_layers=2, seed=0):
    """A random 2-layer Llama whose tokenizer encodes any text byte by byte, with ChatML tokens."""
    tokens = byte_tokens() + ["Ġt"] + SPECIALS  # one merge: GGUF byte-level BPE files carry a merge list
    cfg = llama.LlamaConfig(vocab_size=len(tokens), dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                            ffn_dim=2 * dim, max_seq_len=512)
    params = llama.init(jax.random.key(seed), cfg)
    eos = tokens.index("<|endoftext|>")
    return write_gguf(path, params, cfg, tokens=tokens, token_types=[1] * 257 + [3] * len(SPECIALS),
                      merges=["Ġ t"], bos_id=eos, eos_id=eos)


def write_yaml_config(path, cfg: dict, over: dict):
    """Write ``cfg`` as YAML to ``path`` after setting each dotted key of ``over`` (``"train.steps": 3``)."""
    import yaml

    for k, v in over.items():
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    path.write_text(yaml.safe_dump(cfg))
    return path
