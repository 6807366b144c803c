"""Tests for lora_jax.runner.build: rules from config sections, checks of a config against model shapes."""

import dataclasses
import math
import re

import numpy as np
import pytest

from lora_jax import config as C
from lora_jax.data import get_task
from lora_jax.errors import ConfigError
from lora_jax.runner import build

# ----------------------------------------------------------------------------
# Checks against the model's shapes

LLAMA_SHAPES = {
    "embed": (49152, 576),
    "final_norm/scale": (576,),
    **{
        f"layers/{i}/{p}/kernel": s
        for i in range(2)
        for p, s in [
            ("attn/q_proj", (576, 576)),
            ("attn/k_proj", (576, 192)),
            ("attn/v_proj", (576, 192)),
            ("attn/o_proj", (576, 576)),
            ("mlp/gate_proj", (576, 1536)),
            ("mlp/up_proj", (576, 1536)),
            ("mlp/down_proj", (1536, 576)),
        ]  # fmt: skip
    },
    **{f"layers/{i}/attn_norm/scale": (576,) for i in range(2)},
}


def test_check_against_model_accepts_a_fitting_config():
    build.check_against_model(C.ExperimentConfig(method="qlora", lora=C.LoraConfig(rank=192)), LLAMA_SHAPES)
    build.check_against_model(C.ExperimentConfig(method="base", lora=C.LoraConfig(rank=4096)), LLAMA_SHAPES)


def test_check_against_model_names_the_path_and_the_largest_rank():
    cfg = C.ExperimentConfig(lora=C.LoraConfig(rank=256))
    match = (
        r"lora\.rank=256 is too large for 4 of the 14 .*layers/0/attn/k_proj/kernel \(576, 192\) allows at most "
        r"rank 192.*the largest rank every target allows is 192"
    )
    with pytest.raises(ConfigError, match=match):
        build.check_against_model(cfg, LLAMA_SHAPES)


def test_check_against_model_targets_and_blocks():
    with pytest.raises(ConfigError, match=r"lora\.targets: '.*qproj/kernel' matches no parameter.*\n.*q_proj/kernel"):
        build.check_against_model(
            C.ExperimentConfig(lora=C.LoraConfig(targets=r"layers/\d+/attn/qproj/kernel")), LLAMA_SHAPES
        )
    with pytest.raises(ConfigError, match=r"lora\.targets: '.*' matches final_norm/scale of shape \(576,\)"):
        build.check_against_model(C.ExperimentConfig(lora=C.LoraConfig(targets="final_norm/scale")), LLAMA_SHAPES)
    odd = {**LLAMA_SHAPES, "layers/0/mlp/down_proj/kernel": (1540, 576)}
    cfg = C.ExperimentConfig(method="qlora", quant=C.QuantConfig(block_size=32))
    build.check_against_model(cfg, LLAMA_SHAPES)
    match = r"quant\.block_size=32 does not divide d_in \(axis 0\) of 1 of the 14 .* layers/0/mlp/down_proj.*: none"
    with pytest.raises(ConfigError, match=match):
        build.check_against_model(cfg, odd)
    with pytest.raises(ConfigError, match=r"block sizes that divide all: 32, 64;"):  # 576 = 9 * 64
        build.check_against_model(dataclasses.replace(cfg, quant=C.QuantConfig(block_size=128)), LLAMA_SHAPES)
    build.check_against_model(dataclasses.replace(cfg, quant=C.QuantConfig(block_size=0)), odd)


def test_default_targets_match_the_seven_projections():
    hits = [p for p in LLAMA_SHAPES if re.fullmatch(C.DEFAULT_TARGETS, p)]
    assert len(hits) == 7 * 2


# ----------------------------------------------------------------------------
# Rules


def test_to_rules():
    (rule,) = build.lora_rules(C.LoraConfig(rank=4, alpha=8, dropout=0.1, rslora=True, init="gaussian"))
    assert (rule.pattern, rule.rank, rule.alpha, rule.dropout, rule.rslora, rule.init) == (
        C.DEFAULT_TARGETS,
        4,
        8.0,
        0.1,
        True,
        "gaussian",
    )
    assert rule.scale == pytest.approx(8 / 2)
    (qrule,) = build.quant_rules(C.QuantConfig(format="int8", block_size=0, double_quant=False), "bfloat16")
    assert (qrule.format, qrule.block_size, qrule.double_quant, str(qrule.dtype)) == ("int8", None, False, "bfloat16")


# ----------------------------------------------------------------------------
# Task limits, checked before any run starts (a tiny GGUF model whose tokenizer is byte-level ChatML)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_models import write_tiny_chat_gguf

    return write_tiny_chat_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


def _run(gguf, tmp_path, method="lora", **task):
    task = {"name": "python-docs-lm", "max_len": 64, "n_train": 8, "n_val": 4, **task}
    for key in ("jsonl", "text"):
        if key in task:
            (tmp_path / f"data.{key}").write_text(task.pop(key))
            task.update(name=key, path=str(tmp_path / f"data.{key}"))
    return C.ExperimentConfig(method=method, model=C.ModelConfig(name=str(gguf)), task=C.TaskConfig(**task),
                              train=C.TrainConfig(steps=2, batch_size=4))


PAIR = '{"prompt": "2+2?", "completion": "4"}\n'


@pytest.mark.parametrize(
    "task, method, message",
    [
        ({"name": "code-summarization", "max_len": 64}, "lora",
         r"task\.max_len=64 is too small for task 'code-summarization' with .*'s chat format: an example needs "
         r"\d+ tokens .*; set task\.max_len >= \d+"),
        ({"jsonl": PAIR * 8, "max_len": 16}, "base", r"task\.max_len=16 is too small for task 'jsonl'"),
        ({"n_train": 2}, "lora", r"train\.batch_size=4 is larger than task\.n_train=2"),
        ({"n_train": 2}, "full", r"train\.batch_size=4 is larger than task\.n_train=2"),
        ({"jsonl": PAIR * 3, "n_train": None}, "lora", r"batch_size=4 is larger than the 3 examples of task\.path"),
        ({"text": "short text\n", "n_train": None}, "lora", r"train\.batch_size=4 is larger than the 1 windows of 64"),
        ({"jsonl": PAIR + "{oops\n"}, "lora", r"data\.jsonl:2: invalid JSON"),
        ({"name": "code-summarization", "max_len": 400, "max_new_tokens": 200}, "base",
         r"a prompt of up to 399 tokens plus the generated ones exceeds .*max_seq_len=512"),
    ],
)  # fmt: skip
def test_task_limits_stop_the_sweep_before_it_starts(tiny_gguf, tmp_path, task, method, message):
    cfg = _run(tiny_gguf, tmp_path, method, **task)
    with pytest.raises(ConfigError, match=rf"^r1: .*{message}"):
        build.validate_runs([("r1", cfg)])


def test_task_limits_accept_what_the_run_accepts(tiny_gguf, tmp_path):
    model = build.load_model(C.ModelConfig(name=str(tiny_gguf)))
    cfg = _run(tiny_gguf, tmp_path, **{"name": "code-summarization", "max_len": 64})
    task = get_task("code-summarization")
    need = task.min_len(model.tokenizer, build.chat_format(model.tokenizer))
    ok = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, max_len=need, n_eval_generate=0))
    build.validate_runs([("r", ok)])
    # The bound is tight: an example of one source token and one summary token fits max_len=need exactly.
    from lora_jax.data.code_summaries import CodeSummary

    tiny = CodeSummary(path="", qualname="", lineno=0, source="x", summary="y")
    ex = task.tokenize(tiny, model.tokenizer, build.chat_format(model.tokenizer), max_len=need)
    assert len(ex.ids) == need and int(ex.loss_mask.sum()) == 2
    with pytest.raises(Exception, match="too small"):
        task.tokenize(tiny, model.tokenizer, build.chat_format(model.tokenizer), max_len=need - 1)
    jsonl = _run(tiny_gguf, tmp_path, **{"jsonl": PAIR * 4, "n_train": None})
    build.validate_runs([("r", jsonl)])


def test_a_data_path_that_is_a_folder_is_named(tiny_gguf, tmp_path):
    cfg = _run(tiny_gguf, tmp_path, **{"name": "text", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"r: task\.path: '.*' is a folder, not a file"):
        build.validate_runs([("r", cfg)])


# ----------------------------------------------------------------------------
# The optimizer a config asks for, against Adam/AdamW/SGD written out in numpy


def reference_lr(o: C.OptimConfig, steps: int, t: int) -> float:
    """The learning rate of step ``t`` (0-based), from the config's documented meaning."""
    w = o.warmup_steps
    if w and t < w:
        return o.lr * t / w  # linear warm-up from 0
    s, decay = t - w, max(1, steps - w)
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1 + math.cos(math.pi * min(s, decay) / decay))
    if o.schedule == "linear":
        return o.lr * max(0.0, 1 - s / decay)
    return o.lr


def reference_updates(o: C.OptimConfig, steps: int, params: dict, grads: list[dict]) -> list[dict]:
    """Updates of clip -> Adam(W)/SGD with LoRA+ in float64, one dict ``{path: update}`` per step."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2 = o.betas
    out = []
    for t, g in enumerate(grads):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        if o.grad_clip and norm > o.grad_clip:
            g = {k: x * (o.grad_clip / norm) for k, x in g.items()}
        lr = reference_lr(o, steps, t)
        upd = {}
        for k, x in g.items():
            rate = lr * (o.lora_plus_ratio if o.lora_plus_ratio and k.endswith("lora_b") else 1.0)
            if o.name == "sgd":
                u = x
            else:
                m[k] = b1 * m[k] + (1 - b1) * x
                v2[k] = b2 * v2[k] + (1 - b2) * x**2
                u = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v2[k] / (1 - b2 ** (t + 1))) + 1e-8)
                if o.name == "adamw":
                    u = u + o.weight_decay * p[k]
            upd[k] = -rate * u
            p[k] = p[k] + upd[k]
        out.append(upd)
    return out


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_warms_up_then_follows_the_schedule(schedule, warmup):
    o = C.OptimConfig(lr=0.02, schedule=schedule, warmup_steps=warmup)
    sched = build.make_lr_schedule(o, 10)
    got = [float(sched(t)) for t in range(13)]
    np.testing.assert_allclose(got, [reference_lr(o, 10, t) for t in range(13)], rtol=1e-6, atol=1e-9)
    if warmup:
        assert got[0] == 0 and got[warmup] == pytest.approx(0.02)
    if schedule != "constant":
        assert got[10] == pytest.approx(0, abs=1e-9)


OPTIMIZERS = {
    "adamw_cosine_warmup_clip_loraplus": dict(name="adamw", lr=0.05, schedule="cosine", warmup_steps=1,
                                              grad_clip=0.5, lora_plus_ratio=4.0, betas=(0.8, 0.95),
                                              weight_decay=0.1),
    "adam_linear_noclip": dict(name="adam", lr=0.03, schedule="linear", grad_clip=None, betas=(0.7, 0.9)),
    "sgd_constant_clip_loraplus": dict(name="sgd", lr=0.1, grad_clip=2.0, lora_plus_ratio=16.0),
    "adamw_defaults": dict(name="adamw", lr=0.01, weight_decay=0.01),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_make_optimizer_updates_match_adam_written_out(name):
    import jax
    import jax.numpy as jnp

    from lora_jax import lora, paths

    o = C.OptimConfig(**OPTIMIZERS[name])
    steps = 4
    base = {"q": {"kernel": jnp.ones((6, 5))}, "v": {"kernel": jnp.ones((6, 3))}}
    trainable, _ = paths.split(lora.init(jax.random.key(0), base, [lora.LoraRule(pattern=".*kernel", rank=2)]))
    trainable = jax.tree.map(lambda x: x + 0.3, trainable)  # non-zero B, so weight decay shows on both factors
    rng = np.random.default_rng(0)
    # Gradients of global norm ~5: above every clip threshold above, so clipping changes them.
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), trainable)
             for _ in range(3)]  # fmt: skip
    tx = build.make_optimizer(o, steps)
    state, params, got = tx.init(trainable), trainable, []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        got.append(dict(paths.leaves_with_paths(updates)))
    flat = dict(paths.leaves_with_paths(trainable))
    assert sorted(flat) == ["q/kernel/lora_a", "q/kernel/lora_b", "v/kernel/lora_a", "v/kernel/lora_b"]
    want = reference_updates(o, steps, flat, [dict(paths.leaves_with_paths(g)) for g in grads])
    for t in range(3):
        for k in flat:
            np.testing.assert_allclose(np.asarray(got[t][k]), want[t][k], rtol=2e-5, atol=1e-8, err_msg=f"{k} {t}")
    assert any(np.abs(want[t][k]).max() > 1e-4 for t in range(3) for k in flat)
