"""Tiny Hugging Face reference models (torch, transformers, peft: the `compare` extra) for the export tests."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import lora, train
from lora_jax.models import llama, load_hf


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def hf_llama_folder(directory: Path, *, tie: bool, rope_theta: float = 10000.0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=80, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    write_tokenizer(directory, cfg.vocab_size)
    return transformers.LlamaForCausalLM.from_pretrained(str(directory)).eval()


def load_hf_llama(directory: Path):
    """Write a tiny untied Llama folder and load it: ``(directory, params, config, tokenizer)``."""
    hf_llama_folder(directory, tie=False)
    params, config, tok = load_hf.load(directory)
    return directory, params, config, tok


TOKENS = np.array([[1, 5, 17, 3, 95, 40, 2, 8, 9, 11], [11, 9, 8, 2, 40, 95, 3, 17, 5, 1]])


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    if os.environ.get("LJ_PRINT_REL"):
        print(f"\nREL {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}: {r:.3g}")
    return r


_TRAINED: dict = {}


def train_here(params, config, rules, steps=3):
    """Adapt ``params`` with ``rules`` and train a few Adam steps here (cached per rules)."""
    cache_key = (id(params), tuple(rules), steps)
    if cache_key not in _TRAINED:
        adapted = lora.init(jax.random.key(1), params, rules)
        tx = optax.adam(3e-2)
        state = train.init_state(adapted, tx, jax.random.key(2))
        step = train.make_train_step(functools.partial(llama.loss, config=config), tx)
        for i in range(steps):
            state, _ = step(state, {"tokens": jnp.asarray(np.roll(TOKENS, i, axis=1))})
        _TRAINED[cache_key] = state.params
    return _TRAINED[cache_key]


MIXED_RULES = [
    lora.LoraRule(pattern=r"layers/0/attn/q_proj/kernel", rank=2, alpha=3),
    lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4, alpha=8),
    lora.LoraRule(pattern=r"layers/\d+/mlp/down_proj/kernel", rank=3, alpha=1.5),
    lora.LoraRule(pattern=r"lm_head", rank=4, alpha=8),
]



def load_torch(d):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(d)).eval()


def peft_trained(d, lora_config, out: Path, steps: int = 3):
    """PEFT's model of ``lora_config`` on the Llama in ``d``, trained ``steps`` Adam steps on TOKENS; saved: ``out``."""
    import peft
    import torch

    torch.manual_seed(0)
    model = peft.get_peft_model(load_torch(d), lora_config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.tensor(TOKENS, dtype=torch.long)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out))
    return model


def hf_bert_folder(directory: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return transformers.BertModel


def bert_hidden(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long)).last_hidden_state.numpy()
