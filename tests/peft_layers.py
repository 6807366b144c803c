"""One PEFT LoRA layer on a torch Linear and the same layer as our node: forward and every gradient, both sides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import paths
from lora_jax.methods import dora

D_IN, D_OUT, R, ALPHA = 24, 20, 4, 6.0
TRAINABLE = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "lora_magnitude"}


def peft_linear(w_out_in: np.ndarray, seed: int = 0, **lora_kwargs):
    """``(model, layer)``: PEFT on ``Linear(D_IN, D_OUT)`` of weight ``w_out_in``; ``lora_kwargs`` go to LoraConfig."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w_out_in))
    torch.manual_seed(seed)
    model = peft.get_peft_model(net, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], **lora_kwargs))
    return model, model.base_model.model[0]


def tensor(layer, name: str) -> np.ndarray:
    """A trainable tensor of the layer in our layout (A, B transposed)."""
    mod = getattr(layer, name)["default"]
    w = mod.weight.detach().numpy()
    return w if name == "lora_magnitude_vector" else w.T


def node_from(layer, base=None):
    """Our node holding the layer's base (or ``base``) and factors: a DoRA node when the layer has a magnitude."""
    from lora_jax import lora

    w0 = jnp.asarray(layer.base_layer.weight.detach().numpy().T) if base is None else base
    node = lora.LoraWeight(w0, jnp.asarray(tensor(layer, "lora_A")), jnp.asarray(tensor(layer, "lora_B")), ALPHA / R)
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        node = dora.to_dora_with(node, jnp.asarray(tensor(layer, "lora_magnitude_vector")))
    return node


def torch_grads(model, layer, x, cot):
    """PEFT's output and the gradients of ``sum(out * cot)`` w.r.t. every trainable tensor (our names, layout)."""
    import torch

    model.zero_grad()
    out = model(torch.tensor(x))
    (out * torch.tensor(cot)).sum().backward()
    grads = {}
    for name, ours in TRAINABLE.items():
        if "default" in getattr(layer, name, {}):
            g = getattr(layer, name)["default"].weight.grad.numpy()
            grads[ours] = g if name == "lora_magnitude_vector" else g.T
    return out.detach().numpy(), grads


def our_grads(node, x, cot):
    """Our output and the gradients of ``sum(out * cot)`` w.r.t. the trainable half of ``{"w": node}``."""

    def loss(t):
        y = jnp.asarray(x) @ paths.combine(t, f)["w"]
        return jnp.sum(y * jnp.asarray(cot)), y

    t, f = paths.split({"w": node})
    (_, y), g = jax.value_and_grad(loss, has_aux=True)(t)
    return np.asarray(y), {k: np.asarray(getattr(g["w"], k)) for k in TRAINABLE.values() if hasattr(g["w"], k)}
