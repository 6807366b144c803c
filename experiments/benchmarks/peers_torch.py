"""One Hugging Face PEFT train step on PyTorch, the peer of our LoRA / QLoRA step in ``peers.py``.

The model is ``transformers.LlamaForCausalLM`` built from *our* parameter tree:
the tree is written with :func:`lora_jax.models.export_hf.export_merged_hf` (the same
name mapping and ``config.json`` our exporter ships; safetensors, no pickle) to
a temporary folder and loaded back with ``from_pretrained``, so weights, shapes,
RMSNorm eps, RoPE theta and tied embeddings are ours by construction.

Setups:
  ``peft_lora``   PEFT LoRA (rank, alpha, dropout 0, no bias) on q, k, v, o, gate, up, down.
  ``peft_qlora``  the same on top of bitsandbytes NF4 base weights for those seven projections
                  (``BitsAndBytesConfig``: double quantization, compute dtype = ``dtype``), the
                  standard ``from_pretrained(quantization_config=...)`` path. bitsandbytes
                  quantizes torch's ``(d_out, d_in)`` weight in blocks of 64 consecutive elements,
                  i.e. 64 input rows per output column, as our ``block_size=64``: without double
                  quantization the dequantized weights are bit-identical to ours. Double
                  quantization differs (bitsandbytes: the scales minus their mean in an 8-bit
                  *dynamic* code, groups of 256 in row-major order; ours: int8 absmax, groups of
                  256 along ``d_out``), so the weights differ by ~2% of their norm (both ~9.2% from
                  the float weights) and the first losses by ~5e-5. On CPU, bitsandbytes 0.50
                  trains through its native CPU library: each layer dequantizes its weight (again
                  in the backward pass) and calls a dense matmul. Its warning "Failed to load CPU
                  gemm_4bit_forward from kernels-community" concerns an inference-only kernel.

PEFT's defaults stand: adapters in float32 even on a bfloat16 base (``autocast_adapter_dtype``),
A Kaiming-uniform and B zero, so the first loss is the base model's. No gradient checkpointing and
no ``prepare_model_for_kbit_training`` (it would upcast norms and embeddings to float32).
The optimizer is ``torch.optim.AdamW`` with optax.adamw's defaults over the adapters only.

    step = build("peft_lora", jax.tree.map(np.asarray, params), cfg)
    loss = step(tokens)  # int (B, T); loss before the update

``build_from_hf`` takes the exported folder instead, so a process that times PEFT imports
neither JAX nor lora-jax (``peers.py`` exports once and runs each peer in a clean process).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import numpy as np

SETUPS = ("peft_lora", "peft_qlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# SmolLM2-135M, B=4, T=128, 2 CPU threads, peft_lora: sdpa 14.4 s/step, eager 14.2 (medians of 4,
# interleaved): a tie within noise, attention is ~4% of the step. sdpa is transformers' default.
ATTENTION = "sdpa"
BNB_BLOCK = 64  # bitsandbytes' Params4bit default (transformers' BitsAndBytesConfig has no blocksize); ours too


def _check(setup: str, dtype: str, device: str) -> None:
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def build(setup: str, params: dict, cfg, **kwargs) -> Callable[..., float | None]:
    """Return ``step(tokens)`` on a PEFT model of our parameter tree ``params`` (see :func:`build_from_hf`).

    ``params`` is our Llama tree (numpy float32, no adapters or quantized leaves) and ``cfg`` its
    :class:`lora_jax.models.llama.LlamaConfig`; they are written to a temporary Hugging Face folder
    with :func:`lora_jax.models.export_hf.export_merged_hf` and loaded from there.
    """
    from lora_jax.models.export_hf import export_merged_hf

    with tempfile.TemporaryDirectory() as d:
        export_merged_hf(d, params, cfg)
        return build_from_hf(setup, d, **kwargs)


def build_from_hf(
    setup: str,
    folder: str,
    *,
    rank: int = 16,
    alpha: int = 32,
    lr: float = 1e-4,
    threads: int | None = 2,
    device: str = "cpu",
    dtype: str = "float32",
) -> Callable[..., float | None]:
    """Return ``step(tokens) -> loss``: forward, backward, AdamW update, on a PEFT model of a HF folder.

    Args:
      setup: ``"peft_lora"`` or ``"peft_qlora"``.
      folder: a Hugging Face Llama folder (``config.json`` + safetensors), e.g. from ``export_merged_hf``.
      rank, alpha: LoRA rank and alpha (scale ``alpha / rank``, as ours).
      lr: AdamW learning rate (b1 0.9, b2 0.999, eps 1e-8, weight decay 1e-4: optax.adamw's defaults).
      threads: ``torch.set_num_threads`` when not ``None``.
      device: ``"cpu"`` or ``"cuda"``.
      dtype: ``"float32"`` or ``"bfloat16"`` for the base weights and compute.

    Returns:
      ``step(tokens, block=True)``: takes int tokens ``(B, T)``, returns the mean next-token cross
      entropy over the ``B * (T - 1)`` positions computed before the update, after the device is
      done. With ``block=False`` it returns ``None`` without copying the loss to the host (the
      loop that logs only now and then); ``step.wait()`` then returns the last loss.
    """
    _check(setup, dtype, device)
    import peft
    import torch
    import transformers

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype, "attn_implementation": ATTENTION, "device_map": device}
    if setup == "peft_qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
    model = transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs)
    if setup == "peft_qlora":
        _check_quantized(model)
    lcfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=TARGETS)
    model = peft.get_peft_model(model, lcfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    last = [None]

    def wait() -> float:
        loss = float(last[0])  # a host copy: waits for the step on any device
        sync()
        return loss

    def step(tokens: np.ndarray, block: bool = True) -> float | None:
        ids = torch.as_tensor(np.asarray(tokens, np.int64), device=device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last[0] = out.loss.detach()
        return wait() if block else None

    step.wait = wait
    return step


def _check_quantized(model) -> None:
    """Fail unless exactly the seven projections are NF4 with double quantization in blocks of 64."""
    import bitsandbytes as bnb

    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if found != set(TARGETS):
        raise RuntimeError(f"peft_qlora: expected {TARGETS} as Linear4bit, found {sorted(found)}")
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            if (qs.quant_type, qs.blocksize, qs.nested) != ("nf4", BNB_BLOCK, True):
                raise RuntimeError(f"peft_qlora: {name} is {qs.quant_type}/{qs.blocksize}/nested={qs.nested}")


def describe(setup: str) -> dict:
    """Versions and settings of the peer, for the benchmark's JSON."""
    _check(setup, "float32", "cpu")
    import bitsandbytes
    import peft
    import torch
    import transformers

    out = {
        "setup": setup,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "attn_implementation": ATTENTION,
        "lora_targets": TARGETS,
        "optimizer": "torch.optim.AdamW(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)",
    }
    if setup == "peft_qlora":
        out.update(quant="nf4", block_size=BNB_BLOCK, double_quant=True)
    return out
