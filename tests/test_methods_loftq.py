"""LoftQ: the steps against a numpy loop and PEFT's own loftq_init (bitsandbytes NF4), the report, the PEFT export."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import TOKENS, load_torch, rel, torch_logits

from lora_jax import lora, quant
from lora_jax.errors import LoraError
from lora_jax.methods import loftq, pissa
from lora_jax.models import llama


def _w(seed=0, shape=(128, 48)):
    return np.random.default_rng(seed).standard_t(4, size=shape).astype(np.float32) * 0.05


def _numpy_loftq(w, rank, steps, fmt):
    """PEFT's loftq_init loop in numpy (quantizer: ours, dequantized), scale 1."""
    deq = lambda x: np.asarray(lora.dense(quant.quantize_weight(jnp.asarray(x), fmt, block_size=64)))  # noqa: E731
    res = w
    for _ in range(steps):
        q = deq(res)
        u, s, vh = np.linalg.svd((w - q).astype(np.float64), full_matrices=False)
        lr = (u[:, :rank] * s[:rank]) @ vh[:rank]
        res = w - lr
    return q, lr


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("fmt", ["nf4", "int4", "fp4"])
def test_matches_an_independent_loop_and_beats_plain_qlora(steps, fmt):
    w = _w()
    m = loftq.init_matrix(jax.random.key(0), w, rank=8, scale=2.0, steps=steps, format=fmt)
    q_ref, lr_ref = _numpy_loftq(w, 8, steps, fmt)
    np.testing.assert_allclose(np.asarray(lora.dense(m.q)), q_ref, atol=1e-6)
    np.testing.assert_allclose(2.0 * np.asarray(m.a @ m.b), lr_ref, atol=2e-5)  # the scale is divided out
    norm = np.linalg.norm(w)
    assert m.error == pytest.approx(np.linalg.norm(w - q_ref - lr_ref) / norm, rel=1e-4)
    assert m.qlora_error == pytest.approx(np.linalg.norm(w - _numpy_loftq(w, 8, 1, fmt)[0]) / norm, rel=1e-5)
    assert m.error < m.qlora_error


def test_init_on_a_tree_reports_every_matrix():
    params = {"a": {"kernel": jnp.asarray(_w(1))}, "b": {"kernel": jnp.asarray(_w(2, (64, 64)))},
              "norm": jnp.ones(48)}
    qrules = [quant.QuantRule(pattern=".*kernel", format="nf4", block_size=64)]
    p, report = loftq.init_with_report(jax.random.key(0), params, [lora.LoraRule(pattern=".*kernel", rank=4)], qrules,
                                       steps=2)
    assert sorted(report) == ["a/kernel", "b/kernel"]
    for path in report:
        node = p[path.split("/")[0]]["kernel"]
        assert isinstance(node.base, quant.QTensor)
        w = params[path.split("/")[0]]["kernel"]
        err = float(jnp.linalg.norm(w - lora.merge(p)[path.split("/")[0]]["kernel"]) / jnp.linalg.norm(w))
        assert err == pytest.approx(report[path][0], rel=1e-4) and report[path][0] < report[path][1]


def test_bad_inputs():
    params = {"a": {"kernel": jnp.asarray(_w(1))}, "b": {"kernel": jnp.asarray(_w(2))}}
    rules = [lora.LoraRule(pattern=".*kernel", rank=4)]
    with pytest.raises(LoraError, match="steps \\(loftq_iter\\) must be an int >= 1, got 0"):
        loftq.init(jax.random.key(0), params, rules, [quant.QuantRule(pattern=".*kernel")], steps=0)
    with pytest.raises(LoraError, match="'b/kernel' is adapted but not quantized"):
        loftq.init(jax.random.key(0), params, rules, [quant.QuantRule(pattern="a/kernel")])


def _peft_loftq_init():
    """PEFT's own ``loftq_init`` (``peft/utils/loftq_utils.py``), run on the CPU.

    It hard-codes ``compute_device = "cuda"`` (or xpu) for the SVD; bitsandbytes quantizes NF4 and int8 on the
    CPU as well, so its source runs here with that one assignment set to ``"cpu"`` and nothing else changed.
    """
    import inspect

    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert src.count(line) == 1, "PEFT's loftq_init changed; update this test"
    namespace = dict(vars(loftq_utils))
    exec(compile(src.replace(line, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("steps,scale", [(1, 1.0), (5, 2.0)])
def test_matches_peft_loftq_init_with_bitsandbytes_nf4(steps, scale):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    w = _w(3, (128, 48))  # ours (d_in, d_out); PEFT's weight is w.T: bitsandbytes' blocks of 64 run along d_in
    deq, lora_a, lora_b = _peft_loftq_init()(torch.tensor(w.T.copy()), num_bits=4, reduced_rank=8, num_iter=steps)
    q_ref, lr_ref = deq.numpy().T, (lora_b @ lora_a).numpy().T  # PEFT: B @ A = L @ R whatever the scale
    m = loftq.init_matrix(jax.random.key(0), w, rank=8, scale=scale, steps=steps, format="nf4", block_size=64)
    q = np.asarray(lora.dense(m.q))
    if steps == 1:
        np.testing.assert_array_equal(q, q_ref)  # the same quantizer: bit for bit on the same input
    else:  # the same codes; a block's absmax (from W - s A B, rounded differently) may differ in its last bit
        np.testing.assert_allclose(q, q_ref, rtol=0, atol=1e-6 * np.abs(w).max())  # a code step is ~0.08 absmax
    lr = scale * np.asarray(m.a @ m.b)
    assert np.linalg.norm(lr - lr_ref) / np.linalg.norm(lr_ref) <= 1e-5
    err_ref = np.linalg.norm(w - q_ref - lr_ref) / np.linalg.norm(w)
    assert m.error == pytest.approx(err_ref, rel=1e-5)
    # The LoftQ base, saved dequantized (PEFT's recipe), loads back in bitsandbytes' 4 bits as the same Q.
    packed, state = bnb.functional.quantize_4bit(torch.tensor(q.T.copy()), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(bnb.functional.dequantize_4bit(packed, state).numpy().T, q)


def test_loftq_export_loads_in_peft_with_the_same_logits(tmp_path, hf_llama):
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    targets = r"layers/\d+/(attn/q_proj|mlp/down_proj)/kernel"
    p, report = loftq.init_with_report(jax.random.key(0), params, [lora.LoraRule(pattern=targets, rank=4, alpha=8)],
                                       [quant.QuantRule(pattern=targets, format="nf4", block_size=16)], steps=2)
    assert all(e < q for e, q in report.values())
    rng = np.random.default_rng(0)  # a trained adapter, not the init one
    trained = pissa.map_nodes(p, lambda path, n: dataclasses.replace(
        n, lora_b=n.lora_b + jnp.asarray(0.05 * rng.normal(size=n.lora_b.shape), jnp.float32)))
    ours = np.asarray(llama.apply(trained, jnp.asarray(TOKENS), config))
    base, adapter = loftq.export_peft(tmp_path / "out", trained, config)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    model = peft.PeftModel.from_pretrained(load_torch(base), str(adapter)).eval()
    assert rel(ours, torch_logits(model)) <= 1e-5
    assert rel(ours, torch_logits(peft.PeftModel.from_pretrained(load_torch(d), str(adapter)).eval())) > 1e-3
