"""Sharded train steps on 8 host CPU devices against one device; prints one JSON object.

Run it as a script (it sets ``--xla_force_host_platform_device_count=8``
before JAX starts, so it must be a fresh process): ``tests/test_sharding.py``
and ``scale.py`` do. A tiny Llama (dim 32, 1 layer, vocab 64), LoRA and
QLoRA (nf4, block 32, double quantization), rank 4 on the seven projections.

    python experiments/benchmarks/mesh_check.py      # all cases, ~1 min on 2 cores

Keys:
  cases       one row per (kind, mesh (data, fsdp, tensor), optimizer): ``loss_rel`` (max over steps of
              |loss - loss_1dev| / |loss_1dev|), ``param_rel`` (max |p - p_1dev| / max |p_1dev| per
              leaf), ``param_rel_l2`` (||p - p_1dev|| / ||p_1dev|| over all factors), ``recompiles``
              (compilations after the first), ``placed`` (every output keeps its input sharding)
  stacked     the same for stacked layers (lax.scan), QLoRA, SGD, mesh (1, 8, 1)
  specs       the PartitionSpecs of the QLoRA up_proj (32, 64) and down_proj (64, 32) weights and
              the embedding on (1, 4, 2) and (1, 8, 1)
  checkpoint  saved on (2, 4, 1): max |restored - saved| on (1, 8, 1) and on one device, and whether the
              restored arrays lie on like_state's shardings
  generate_tokens_equal
              greedy decoding (lora_jax.generate) with the QLoRA params on (1, 8, 1) gives one device's tokens
  fsdp8_frozen_bytes_per_device_over_total
              per-device argument bytes (compiled.memory_analysis()) of a program taking the frozen
              QLoRA base (dim 256, 2 layers) on mesh (1, 8, 1), over the base's total bytes
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import numpy as np
import optax

import lora_jax as lj
from lora_jax import sharding
from lora_jax.io import state as ckpt
from lora_jax.models import llama
from lora_jax.models.stacking import stack_layers, unstack_layers


def host_devices(n: int) -> None:
    """Ask for ``n`` host CPU devices; call before JAX first touches a device (the backend reads XLA_FLAGS then)."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


SEVEN = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
WIDE = llama.LlamaConfig(vocab_size=256, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512)
"""The model whose frozen bytes per device are measured (wide enough that norms are a small part)."""
MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (1, 8, 1)]
OPTIMIZERS = {"sgd": (lambda: optax.sgd(0.1), 1), "adamw": (lambda: optax.adamw(1e-3, weight_decay=0.01), 10)}


def params_of(kind: str, cfg: llama.LlamaConfig = CFG):
    """The tiny Llama with LoRA (``lora``) or QLoRA (``qlora``) adapters; B non-zero so A gets gradients."""
    p = llama.init(jax.random.key(0), cfg)
    if kind == "qlora":
        p = lj.quantize(p, [lj.QuantRule(pattern=SEVEN, format="nf4", block_size=32, double_quant=True)])
    p = lj.lora.init(jax.random.key(2), p, [lj.LoraRule(pattern=SEVEN, rank=4)])
    leaves, treedef = jax.tree.flatten(p, is_leaf=lj.lora.is_lora)
    leaves = [x.__class__.tree_unflatten(x.tree_flatten_with_keys()[1], (
        x.base, x.lora_a, 0.05 * jax.random.normal(jax.random.key(9 + i), x.lora_b.shape), x.dropout_key))
        if lj.lora.is_lora(x) else x for i, x in enumerate(leaves)]
    return treedef.unflatten(leaves)


def batch_at(i: int) -> dict:
    tokens = jax.random.randint(jax.random.key(100 + i), (8, 16), 0, CFG.vocab_size)
    return {"tokens": np.asarray(tokens), "attention_mask": np.ones((8, 16), np.int32),
            "loss_mask": np.ones((8, 16), np.float32)}


def loss_fn(p, b):
    return llama.loss(p, b, CFG)


def run(params, opt: str, mesh):
    """Train ``opt``'s number of steps; return the state, the losses and the step function."""
    make_tx, n = OPTIMIZERS[opt]
    tx = make_tx()
    state = lj.train.init_state(params, tx, jax.random.key(3))
    shardings = None
    if mesh is not None:
        shardings = sharding.state_shardings(state, mesh)
        state = sharding.place(state, shardings)
    step = lj.train.make_train_step(loss_fn, tx, shardings=shardings)
    losses = []
    for i in range(n):
        b = batch_at(i) if mesh is None else sharding.shard_batch(batch_at(i), mesh)
        before = jax.tree.map(lambda x: x.sharding, (state.trainable, state.opt_state))
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    after = jax.tree.map(lambda x: x.sharding, (state.trainable, state.opt_state))
    placed = mesh is None or jax.tree.all(jax.tree.map(lambda a, b: a.is_equivalent_to(b, 3), before, after))
    return state, losses, step.cache_size() - 1, bool(placed)


def compare(state, losses, ref_state, ref_losses) -> dict:
    a = [np.asarray(x) for x in jax.tree.leaves(state.trainable)]
    b = [np.asarray(x) for x in jax.tree.leaves(ref_state.trainable)]
    return {
        "loss_rel": max(abs(x - y) / abs(y) for x, y in zip(losses, ref_losses, strict=True)),
        "param_rel": max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(a, b, strict=True)),
        "param_rel_l2": float(np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)))
                              / np.sqrt(sum((y ** 2).sum() for y in b))),
    }


def spec_strings(params, mesh) -> dict:
    tree = sharding.param_shardings(params, mesh)
    out = {"embed": str(tree["embed"].spec)}
    for proj in ("up_proj", "down_proj"):
        node = tree["layers"][0]["mlp"][proj]["kernel"]
        out[proj] = {k: str(getattr(node.base, k).spec) for k in ("codes", "scales", "scale_scales", "scale_mean")}
        out[proj].update(lora_a=str(node.lora_a.spec), lora_b=str(node.lora_b.spec))
    return out


def checkpoint_case(params, saved_state) -> dict:
    tx = OPTIMIZERS["adamw"][0]()
    d = tempfile.mkdtemp()
    ckpt.save_train_state(d, saved_state, base_id="tiny")
    saved = [sharding.to_host(x) for x in jax.tree.leaves((saved_state.trainable, saved_state.opt_state))]
    out = {}
    for name, mesh in (("mesh_1x8", sharding.make_mesh((1, 8, 1))), ("one_device", None)):
        like = lj.train.init_state(params, tx, jax.random.key(3))
        if mesh is not None:
            like = sharding.shard_state(like, mesh)
        restored, _ = ckpt.restore_train_state(d, like, base_id="tiny")
        got = jax.tree.leaves((restored.trainable, restored.opt_state))
        want = jax.tree.leaves((like.trainable, like.opt_state))
        out[name] = max(float(np.abs(np.asarray(g) - s).max()) for g, s in zip(got, saved, strict=True))
        out[name + "_on_like_shardings"] = all(g.sharding.is_equivalent_to(w.sharding, g.ndim)
                                              for g, w in zip(got, want, strict=True))
        out[name + "_step"] = int(restored.step)
    return out


def frozen_fraction(params) -> float:
    mesh = sharding.make_mesh((1, 8, 1))
    state = lj.train.init_state(params, optax.sgd(0.1), jax.random.key(3))
    frozen = sharding.place(state.frozen, sharding.state_shardings(state, mesh).frozen)
    fn = jax.jit(lambda f: jax.tree.leaves(f)[0].ravel()[:1], keep_unused=True)
    per_device = fn.lower(frozen).compile().memory_analysis().argument_size_in_bytes
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.frozen))
    return per_device / total


def generate_case(params) -> bool:
    """Greedy decoding with the params sharded on (1, 8, 1) gives the tokens of one device."""
    mesh = sharding.make_mesh((1, 8, 1))
    placed = sharding.place(params, sharding.param_shardings(params, mesh))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    one = lj.generate.generate(params, CFG, prompts, max_new_tokens=6)
    sharded = lj.generate.generate(placed, CFG, prompts, max_new_tokens=6)
    return bool(np.array_equal(np.asarray(one.tokens), np.asarray(sharded.tokens)))


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    out: dict = {"cases": []}
    for kind in ("lora", "qlora"):
        params = params_of(kind)
        for opt in OPTIMIZERS:
            ref_state, ref_losses, _, _ = run(params, opt, None)
            for shape in MESHES:
                state, losses, recompiles, placed = run(params, opt, sharding.make_mesh(shape))
                if (kind, opt, shape) == ("qlora", "adamw", (2, 4, 1)):
                    to_restore = state
                out["cases"].append({"kind": kind, "mesh": list(shape), "opt": opt, "recompiles": recompiles,
                                     "placed": placed, **compare(state, losses, ref_state, ref_losses)})
    qparams = params_of("qlora")
    stacked = stack_layers(qparams)
    ref_state, ref_losses, _, _ = run(qparams, "sgd", None)
    state, losses, recompiles, placed = run(stacked, "sgd", sharding.make_mesh((1, 8, 1)))
    unstacked = unstack_layers(lj.combine(state.trainable, state.frozen))
    state = state._replace(trainable=lj.split(unstacked)[0])
    out["stacked"] = {"recompiles": recompiles, "placed": placed, **compare(state, losses, ref_state, ref_losses)}
    out["stacked"]["layer_axis_spec"] = str(
        sharding.param_shardings(stacked, sharding.make_mesh((1, 8, 1)))["layers"]["mlp"]["up_proj"]["kernel"]
        .base.codes.spec)
    out["specs"] = {f"{m[1]}x{m[2]}": spec_strings(qparams, sharding.make_mesh(m)) for m in ((1, 4, 2), (1, 8, 1))}
    out["checkpoint"] = checkpoint_case(qparams, to_restore)
    out["generate_tokens_equal"] = generate_case(qparams)
    out["fsdp8_frozen_bytes_per_device_over_total"] = frozen_fraction(params_of("qlora", WIDE))
    return out


if __name__ == "__main__":
    host_devices(8)
    res = main()
    text = json.dumps(res, indent=1)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)
    print(text)
