"""From a config to what a run is built from: model, rules, parameters, optimizer, loss, data.

The config package (:mod:`lora_jax.config`) is plain data and imports no JAX;
this module turns its sections into :class:`~lora_jax.lora.LoraRule` and
:class:`~lora_jax.quant.QuantRule` lists, checks a config against a model's
parameter shapes before anything is built, and builds the parameters
(:func:`build_params`), the optimizer and the loss. ``plan``, training and
evaluation all build through here, so they see the same tree from the same
PRNG keys.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from lora_jax import data as _data
from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax import quant as _quant
from lora_jax.errors import ConfigError, DataError
from lora_jax.lora import LoraRule
from lora_jax.quant import QuantRule

if TYPE_CHECKING:
    from lora_jax.config import ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, QuantConfig

__all__ = [
    "LoadedModel", "RunContext", "attention_used", "build_base", "build_params", "chat_format", "check_against_model",
    "check_task_limits", "eva_inputs", "file_quantized", "keeps_file_quant", "load_model", "lora_rules", "loss_fn",
    "make_lr_schedule", "make_optimizer", "param_shapes", "prepare", "quant_rules", "train_examples", "validate_runs",
]


def lora_rules(lora_cfg: LoraConfig) -> list[LoraRule]:
    """Return the :class:`lora_jax.lora.LoraRule` list for ``lora.init`` from the ``lora:`` section.

    Examples:
      >>> from lora_jax.config import LoraConfig
      >>> lora_rules(LoraConfig(rank=4, targets=".*q_proj/kernel"))[0].scale
      1.0
    """
    return [
        LoraRule(
            pattern=lora_cfg.targets,
            rank=lora_cfg.rank,
            alpha=lora_cfg.alpha,
            dropout=lora_cfg.dropout,
            init=lora_cfg.init,
            rslora=lora_cfg.rslora,
        )
    ]


def quant_rules(quant_cfg: QuantConfig, dtype: Any = "float32") -> list[QuantRule]:
    """Return the :class:`lora_jax.quant.QuantRule` list for ``quant.quantize`` from the ``quant:`` section.

    Args:
      quant_cfg: the ``quant:`` section.
      dtype: compute dtype of the dequantized weights (``model.dtype``).

    Examples:
      >>> from lora_jax.config import QuantConfig
      >>> quant_rules(QuantConfig(block_size=0))[0].block_size is None
      True
    """
    return [
        QuantRule(
            pattern=quant_cfg.targets,
            format=quant_cfg.format,
            block_size=quant_cfg.block_size or None,
            double_quant=quant_cfg.double_quant,
            dtype=jnp.dtype(dtype),
        )
    ]


def check_against_model(config: ExperimentConfig, param_shapes: Mapping[str, Any]) -> None:
    """Check the config against the model's parameters before building anything.

    Args:
      config: the run.
      param_shapes: ``{path: shape}`` for every parameter (``/``-joined paths as
        :func:`lora_jax.paths.leaves_with_paths` gives; arrays work too).

    Raises:
      ConfigError: ``lora.targets`` or ``quant.targets`` matches no parameter
        (nearby paths listed), matches a non-matrix, ``lora.rank`` exceeds
        ``min(d_in, d_out)`` of a targeted matrix (the path and the largest
        allowed rank named), ``quant.block_size`` does not divide ``d_in``, or ``quant.format: gguf``
        (keep the file's quantized tensors) with a model that is not a GGUF file or a ``lora.method``
        that rewrites the base (PiSSA, OLoRA, LoftQ).

    Examples:
      >>> from lora_jax.config import ExperimentConfig, LoraConfig
      >>> shapes = {"layers/0/attn/k_proj/kernel": (64, 16), "layers/0/attn/q_proj/kernel": (64, 64)}
      >>> cfg = ExperimentConfig(lora=LoraConfig(rank=32, targets=".*_proj/kernel"))
      >>> check_against_model(cfg, shapes)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax.errors.ConfigError: lora.rank=32 is too large ... the largest rank every target allows is 16
    """
    shapes = {p: tuple(getattr(s, "shape", s)) for p, s in param_shapes.items()}
    paths = list(shapes)
    errors: list[str] = []

    def targets(key: str, pattern: str) -> list[str]:
        hits = [p for p in paths if re.fullmatch(pattern, p)]
        if not hits:
            near = "\n    ".join(f"{p} {shapes[p]}" for p in difflib.get_close_matches(pattern, paths, n=6, cutoff=0))
            errors.append(
                f"{key}: {pattern!r} matches no parameter of {config.model.name} (re.fullmatch on "
                f"'/'-joined paths); paths include:\n    {near}"
            )
        for p in hits:
            if len(shapes[p]) < 2:
                errors.append(f"{key}: {pattern!r} matches {p} of shape {shapes[p]}, which is not a matrix")
        return [p for p in hits if len(shapes[p]) >= 2]

    if config.method in ("lora", "qlora"):
        from lora_jax.methods import select

        select.check(config)
        hits = targets("lora.targets", config.lora.targets)
        limit = {p: min(shapes[p][0], math.prod(shapes[p][1:])) for p in hits}
        bad = [p for p in hits if config.lora.rank > limit[p]]
        if bad:
            shown = "; ".join(f"{p} {shapes[p]} allows at most rank {limit[p]}" for p in bad[:3])
            more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
            errors.append(
                f"lora.rank={config.lora.rank} is too large for {len(bad)} of the {len(hits)} matrices "
                f"lora.targets matches: {shown}{more}; the largest rank every target allows is {min(limit.values())}"
            )
    if keeps_file_quant(config):  # the GGUF's own codes: no block size or targets of ours apply
        from lora_jax.models import registry

        if config.lora.method in ("pissa", "olora", "loftq"):
            errors.append(f"lora.method={config.lora.method} rewrites the base, which quant.format=gguf keeps as the "
                          "file's own codes; use lora.method lora, dora or vera, or another quant.format")
        if registry.resolve(config.model.name)[0] != "gguf":
            errors.append(f"quant.format=gguf keeps a GGUF file's quantized tensors, but model.name="
                          f"{config.model.name!r} is not a GGUF model; use a .gguf file or another quant.format")
    elif config.method == "qlora" and config.quant.block_size:
        bs = config.quant.block_size
        hits = targets("quant.targets", config.quant.targets)
        bad = [p for p in hits if shapes[p][0] % bs]
        if bad:
            shown = ", ".join(f"{p} {shapes[p]}" for p in bad[:3])
            ok = [b for b in (32, 64, 128, 256) if all(shapes[p][0] % b == 0 for p in hits)]
            errors.append(
                f"quant.block_size={bs} does not divide d_in (axis 0) of {len(bad)} of the {len(hits)} "
                f"matrices quant.targets matches, e.g. {shown}; block sizes that divide all: "
                f"{', '.join(map(str, ok)) or 'none'}; 0 (one block per output channel) always fits"
            )
    elif config.method == "qlora":
        targets("quant.targets", config.quant.targets)
    if errors:
        raise ConfigError(errors)


def make_lr_schedule(o: OptimConfig, steps: int):
    """Linear warm-up from 0, then constant, cosine or linear decay to 0."""
    decay = max(1, steps - o.warmup_steps)
    if o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, decay)
    elif o.schedule == "linear":
        main = optax.linear_schedule(o.lr, 0.0, decay)
    else:
        main = optax.constant_schedule(o.lr)
    if not o.warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), main], [o.warmup_steps])


def make_optimizer(o: OptimConfig, steps: int) -> optax.GradientTransformation:
    """The optax transformation a config asks for: schedule, clipping, optimizer, LoRA+."""
    sched = make_lr_schedule(o, steps)

    def make(learning_rate):
        if o.name == "adamw":
            return optax.adamw(learning_rate, b1=o.betas[0], b2=o.betas[1], weight_decay=o.weight_decay)
        if o.name == "adam":
            return optax.adam(learning_rate, b1=o.betas[0], b2=o.betas[1])
        return optax.sgd(learning_rate)

    if o.lora_plus_ratio:
        from lora_jax import optim

        tx = optim.lora_plus(make, sched, ratio=o.lora_plus_ratio)
    else:
        tx = make(sched)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip else tx


@dataclass
class LoadedModel:
    """A model loaded once and shared by the runs of a sweep."""

    name: str
    params: Any
    config: Any
    tokenizer: Any
    fingerprint: str = ""
    shapes: dict[str, tuple[int, ...]] | None = None  # see param_shapes
    dtype: str = "float32"
    file_params: Any = None  # the GGUF's own quantized tensors (see file_quantized)


_MODEL_CACHE: dict[tuple[str, str], LoadedModel] = {}


def param_shapes(model: LoadedModel) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the model's parameters (computed once per loaded model)."""
    if model.shapes is None:
        model.shapes = {p: tuple(x.shape) for p, x in _paths.leaves_with_paths(model.params, is_leaf=_lora.is_node)}
    return model.shapes


def load_model(m: ModelConfig) -> LoadedModel:
    """Load (or reuse) the float weights of a model; GGUF blocks are dequantized."""
    key = (m.name, m.dtype)
    if key not in _MODEL_CACHE:
        from lora_jax.io.hashing import base_hash
        from lora_jax.models import registry

        params, cfg, tok = registry.load_model(m.name, dequantize=True, dtype=jnp.dtype(m.dtype))
        _MODEL_CACHE.clear()  # keep one model in memory at a time
        _MODEL_CACHE[key] = LoadedModel(m.name, params, cfg, tok, base_hash(params), dtype=m.dtype)
    return _MODEL_CACHE[key]


def keeps_file_quant(cfg: ExperimentConfig) -> bool:
    """True for a ``qlora`` run with ``quant.format: gguf``: its base is the GGUF file's own quantized tensors."""
    return cfg.method == "qlora" and cfg.quant.format == "gguf"


def file_quantized(model: LoadedModel) -> Any:
    """The model's GGUF tensors as the file holds them (quantized ones as exact QTensor leaves), loaded once.

    No dequantization and no requantization: Q8_0/Q4_0/Q4_1 and the K-quants keep the file's codes and scales.
    """
    if model.file_params is None:
        from lora_jax.models import registry

        model.file_params = registry.load_model(model.name, dequantize=False, dtype=jnp.dtype(model.dtype),
                                                tokenizer=False)[0]
    return model.file_params


def loss_fn(model_cfg, run_cfg: ExperimentConfig | None = None):
    """The training loss of the model ``model_cfg`` configures: ``(params, batch) -> (loss, aux)``.

    ``run_cfg`` (the run's config) sets ``train.remat`` and ``model.attention``; without it: none and auto.
    """
    from lora_jax.models import gemma3

    decoder = gemma3.decoder_module(model_cfg)  # Llama or Gemma 3
    remat = "none" if run_cfg is None else run_cfg.train.remat
    attention = "auto" if run_cfg is None else run_cfg.model.attention
    return lambda p, b: decoder.loss(p, b, model_cfg, remat=remat, attention=attention)


def attention_used(cfg: ExperimentConfig, model: LoadedModel) -> str:
    """The attention implementation the run's steps run (``model.attention`` resolved here; for ``summary.json``).

    Raises:
      ConfigError: ``cudnn`` asked for where it cannot run.
    """
    from lora_jax.models import gemma3

    decoder = gemma3.decoder_module(model.config)
    return decoder.attention_choice(model.config, cfg.model.attention, jnp.dtype(cfg.model.dtype))


def _task(cfg: ExperimentConfig):
    t = cfg.task
    if t.name in ("jsonl", "text"):
        return _data.get_task(t.name, train=t.path)
    return _data.get_task(t.name)


def chat_format(tokenizer):
    """The tokenizer's chat template where it has one (ChatML models), else None."""
    return tokenizer.apply_chat_template if getattr(tokenizer, "is_chatml", False) else None


@dataclass
class RunContext:
    """Everything a run builds before its first step."""

    cfg: ExperimentConfig
    model: LoadedModel
    task: Any
    train_data: dict | None
    val_data: dict
    params: Any
    info: dict = field(default_factory=dict)


def build_base(cfg: ExperimentConfig, model: LoadedModel):
    """The run's frozen base before any adapter: the model's weights, quantized for QLoRA (``quant.format: gguf``:
    the file's own quantized tensors)."""
    if keeps_file_quant(cfg):
        return file_quantized(model)
    if cfg.method == "qlora":
        return _quant.quantize(model.params, quant_rules(cfg.quant, cfg.model.dtype))
    return model.params


def build_params(cfg: ExperimentConfig, model: LoadedModel, base: Any = None, train_data: dict | None = None):
    """The run's parameter tree: the base, quantized for QLoRA, with LoRA nodes from the run's seed.

    ``base``: :func:`build_base` of a run with the same model and quantization, to share it (fused groups).
    ``train_data``: the run's padded training examples (:func:`train_examples`; ``lora.method: eva`` reads its
    first batches, and tokenizes them itself when not given).

    Raises:
      ConfigError: the config does not fit the model (see :func:`check_against_model`).
    """
    if cfg.method not in ("lora", "qlora"):
        return build_base(cfg, model) if base is None else base
    from lora_jax.methods import select

    check_against_model(cfg, param_shapes(model))
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    if base is not None:  # a shared, already quantized base (fused groups: plain LoRA only)
        params = _lora.init(key, base, lora_rules(cfg.lora))
    elif keeps_file_quant(cfg):  # already quantized by the file: adapt its codes as they are
        params = select.adapt(cfg.lora, key, file_quantized(model), lora_rules(cfg.lora),
                              **eva_inputs(cfg, model, train_data))
    else:  # lora.method decides the order of quantizing and adapting
        qrules = quant_rules(cfg.quant, cfg.model.dtype) if cfg.method == "qlora" else None
        params = select.adapt(cfg.lora, key, model.params, lora_rules(cfg.lora), qrules,
                              **eva_inputs(cfg, model, train_data))
    if cfg.model.scan_layers:  # rules and quantization work on the unrolled paths; stack after
        from lora_jax.models import stacking

        params = stacking.stack_layers(params)
    return params


def eva_inputs(cfg: ExperimentConfig, model: LoadedModel, train_data: dict | None = None) -> dict:
    """:func:`lora_jax.methods.select.adapt`'s EVA arguments: the run's first ``lora.eva_batches`` batches."""
    if cfg.lora.method != "eva":
        return {}
    data = train_examples(cfg, model) if train_data is None else train_data
    bs, n = cfg.train.batch_size, cfg.lora.eva_batches or 2
    batches = [{k: v[i:i + bs] for k, v in data.items()} for i in range(0, min(n * bs, len(data["tokens"])), bs)]
    return {"apply_fn": loss_fn(model.config), "batches": batches, "masks": [b["attention_mask"] for b in batches]}


def train_examples(cfg: ExperimentConfig, model: LoadedModel) -> dict:
    """The run's training examples, tokenized and padded (``tokens``, ``loss_mask``, ``attention_mask``)."""
    task = _task(cfg)
    tr = task.tokenize_split("train", model.tokenizer, chat_format(model.tokenizer), cfg.task.max_len,
                             limit=cfg.task.n_train)
    if len(tr) < cfg.train.batch_size:
        raise DataError(f"task {cfg.task.name!r}: {len(tr)} training examples, fewer than "
                         f"train.batch_size={cfg.train.batch_size}")
    return _data.pad_examples(tr, cfg.task.max_len, pad_id=getattr(model.tokenizer, "pad_id", None) or 0)


def prepare(cfg: ExperimentConfig, model: LoadedModel) -> RunContext:
    """Tokenize the run's data and build its parameters (:func:`build_params`)."""
    task = _task(cfg)
    fmt = chat_format(model.tokenizer)
    T = cfg.task.max_len
    split_val = "val" if "val" in task.splits() else task.splits()[-1]
    val = task.tokenize_split(split_val, model.tokenizer, fmt, T, limit=cfg.task.n_val)
    pad_id = getattr(model.tokenizer, "pad_id", None) or 0
    train_data = None if cfg.method == "base" else train_examples(cfg, model)
    params = build_params(cfg, model, train_data=train_data)
    info = {"task": task.info(), "dataset_hash": task.dataset_hash, "n_val": len(val),
            "n_train": None if train_data is None else int(train_data["tokens"].shape[0])}
    return RunContext(cfg, model, task, train_data, _data.pad_examples(val, T, pad_id=pad_id), params, info)


def check_task_limits(cfg: ExperimentConfig, model: LoadedModel, task: Any) -> list[str]:
    """The problems of a run's task settings that its config, model and data files alone determine.

    Each would otherwise stop the run only after it started: a ``task.max_len``
    that leaves no target token once the task's prompt template is in, fewer
    training examples than ``train.batch_size`` (``task.n_train`` or the data
    file), or a prompt and ``task.max_new_tokens`` longer than the model allows
    when generation metrics are on. Returns one line per problem (empty if none).
    """
    t, errors = cfg.task, []
    fmt = chat_format(model.tokenizer)
    need = task.min_len(model.tokenizer, fmt)
    if t.max_len < need:
        what = "its prompt template, a token of text and of answer, and the end token" if task.kind == "generation" \
            else "a token of context and one to predict"
        errors.append(f"task.max_len={t.max_len} is too small for task {t.name!r} with {cfg.model.name}'s "
                      f"{'chat format' if fmt else 'plain prompt format'}: an example needs {need} tokens ({what}); "
                      f"set task.max_len >= {need}")
    bs = cfg.train.batch_size
    if cfg.method != "base":
        if t.n_train is not None and t.n_train < bs:
            errors.append(f"train.batch_size={bs} is larger than task.n_train={t.n_train}: a step takes batch_size "
                          "training examples; lower train.batch_size or raise task.n_train")
        elif t.name == "jsonl" and len(task.examples("train")) < bs:
            errors.append(f"train.batch_size={bs} is larger than the {len(task.examples('train'))} examples of "
                          f"task.path {t.path!r}; lower train.batch_size or add examples")
        elif t.name == "text":
            windows = len(task.tokenize_split("train", model.tokenizer, fmt, t.max_len))
            if windows < bs:
                errors.append(f"train.batch_size={bs} is larger than the {windows} windows of {t.max_len} tokens in "
                              f"task.path {t.path!r}; lower train.batch_size or task.max_len, or add text")
    limit = getattr(model.config, "max_seq_len", None)
    if task.kind == "generation" and t.n_eval_generate and limit and t.max_len - 1 + t.max_new_tokens > limit:
        errors.append(f"task.max_len={t.max_len} and task.max_new_tokens={t.max_new_tokens}: a prompt of up to "
                      f"{t.max_len - 1} tokens plus the generated ones exceeds {cfg.model.name}'s max_seq_len="
                      f"{limit}; lower one of them (or set task.n_eval_generate: 0)")
    return errors


def validate_runs(runs: list[tuple[str, ExperimentConfig]]) -> None:
    """Check every run of a sweep against its model and data files before any run starts.

    A problem the config alone determines (a target that matches nothing, a
    rank a matrix cannot hold, a block size that does not divide, a missing or
    malformed data file, a ``task.max_len`` too small for the task's prompt, a
    batch larger than the data: :func:`check_task_limits`) stops the whole
    command here instead of failing each run after the model was built. The
    model is loaded for its parameter shapes and tokenizer and kept for the
    first run (the cache holds one model: a sweep over several models loads
    each again when its runs start).

    Raises:
      ConfigError: every problem of every run, each prefixed with the run's name.
    """
    errors: list[str] = []
    tasks: dict[tuple, Any] = {}
    for name, cfg in runs:
        t = cfg.task
        if t.name in ("jsonl", "text") and t.path and not Path(t.path).is_file():
            what = "a folder, not a file" if Path(t.path).is_dir() else "not a file"
            errors.append(f"{name}: task.path: {t.path!r} is {what} (relative paths start from {Path.cwd()})")
            continue
        model = load_model(cfg.model)
        try:
            key = (t.name, t.path)
            if key not in tasks:
                tasks[key] = _task(cfg)
            errors += [f"{name}: {line}" for line in check_task_limits(cfg, model, tasks[key])]
        except DataError as e:
            errors.append(f"{name}: {e}")
        try:
            if cfg.model.attention != "auto":  # an explicit choice may not run here (cudnn on a CPU)
                attention_used(cfg, model)
            if cfg.method in ("lora", "qlora"):
                check_against_model(cfg, param_shapes(model))
        except ConfigError as e:
            errors += [f"{name}: {line}" for line in e.errors]
    if errors:
        raise ConfigError(errors)
