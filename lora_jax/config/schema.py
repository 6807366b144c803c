"""The config schema: the frozen, typed section dataclasses and :class:`ExperimentConfig`.

Every section and key has a default; values are checked when a section is
built (see :class:`lora_jax.config.fields.Section`). The key tables at the end
(:data:`SECTIONS`, :data:`TOP_KEYS`, :data:`LEAVES`) are what the loader, the
``--set`` overrides and the sweep expansion check key paths against.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from lora_jax.config.fields import (
    Section,
    at_least,
    checked_field,
    known_model,
    mesh_axis,
    positive,
    safe_name,
    type_hints,
    unit_interval,
    valid_betas,
    valid_regex,
)

DEFAULT_TARGETS = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
"""The seven projections of every decoder layer (PEFT's ``all-linear`` minus the head)."""

MIN_MAX_LEN = 16
"""The smallest ``task.max_len`` (tokens) that leaves room for a prompt and an answer."""

IGNORED_BY_METHOD: dict[str, tuple[str, ...]] = {
    "base": ("lora", "quant", "optim", "train.steps", "train.eval_every", "train.checkpoint_every",
             "train.log_every", "task.n_train"),
    "full": ("lora", "quant", "optim.lora_plus_ratio"),
    "lora": ("quant",),
    "qlora": (),
}  # fmt: skip
"""Key-path prefixes a method does not read: dropped from its sweep axes, run names and hash."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """The pretrained model.

    Attributes:
      name: a registered short name (``smollm2-135m``, ``minilm-l6``) or a path
        to a ``.gguf`` file or a Hugging Face model directory.
      dtype: compute dtype of the weights, ``float32`` or ``bfloat16``.
      max_seq_len: the longest sequence the run builds (positions, KV cache).
      attention: ``auto`` (block-causal on CPU, cuDNN flash attention on GPUs
        where the shape allows, XLA's fused ``dot_product`` elsewhere),
        ``blocked``, ``dot_product`` or ``cudnn``; the choice that ran is in
        ``summary.json``.
      scan_layers: run the decoder layers under ``jax.lax.scan`` over stacked
        weights (compile time independent of depth; same numbers).
    """

    section: ClassVar[str] = "model"
    name: str = checked_field("smollm2-135m", check=known_model)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_seq_len: int = checked_field(2048, check=at_least(1))
    attention: Literal["auto", "blocked", "dot_product", "cudnn"] = "auto"
    scan_layers: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig(Section):
    """The data: a built-in task or the user's files.

    Attributes:
      name: ``code-summarization`` (stdlib function -> docstring summary, scored
        with ROUGE), ``python-docs-lm`` (perplexity on the Python docs), or a
        user file: ``jsonl`` (``prompt``/``completion`` records) or ``text``.
      path: the user file (``jsonl`` and ``text`` only).
      max_len: tokens per training example (prompt and answer).
      n_train, n_val, n_test: caps on the number of examples; ``None`` = all.
      max_new_tokens: generation length for generation metrics.
      n_eval_generate: examples decoded for generation metrics (0 = none).
    """

    section: ClassVar[str] = "task"
    name: Literal["code-summarization", "python-docs-lm", "jsonl", "text"] = "code-summarization"
    path: str | None = None
    max_len: int = checked_field(256, check=at_least(MIN_MAX_LEN))
    n_train: int | None = checked_field(None, check=at_least(1))
    n_val: int | None = checked_field(None, check=at_least(1))
    n_test: int | None = checked_field(None, check=at_least(1))
    max_new_tokens: int = checked_field(32, check=at_least(1))
    n_eval_generate: int = checked_field(64, check=at_least(0))

    def _cross_checks(self) -> list[str]:
        if self.name in ("jsonl", "text") and not self.path:
            return [f"task.path: task {self.name!r} reads the user's file; set task.path to it"]
        if self.name not in ("jsonl", "text") and self.path is not None:
            return [
                f"task.path: the built-in task {self.name!r} takes no file (got {self.path!r}); "
                "use task.name: jsonl or text for your own data"
            ]
        return []


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(Section):
    """The adapters (used by methods ``lora`` and ``qlora``).

    Attributes:
      rank: the rank ``r`` of every adapter.
      alpha: scale numerator; ``None`` means ``alpha = rank`` (scale 1).
      dropout: dropout on the adapter input while training, in [0, 1).
      rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
      init: ``kaiming`` (PEFT's default) or ``gaussian``.
      targets: regex, matched with ``re.fullmatch`` on ``/``-joined parameter paths.
      method: the adapter method (:mod:`lora_jax.methods`): ``lora``, ``dora``, ``pissa``, ``olora``, ``loftq``
        (needs method ``qlora``), ``vera``, ``eva``. Its options below; an option of another method is an error.
      pissa_niter: ``pissa``: subspace iterations of the fast randomized SVD; unset: the full SVD.
      loftq_iter: ``loftq``: alternating steps T (default 1).
      vera_d_initial: ``vera``: initial value of the vector ``d`` (default 0.1, PEFT's).
      eva_batches: ``eva``: training batches (the run's first, ``train.batch_size`` rows each) whose layer inputs
        are decomposed (default 2).
      eva_rho: ``eva``: rank redistribution; each layer offers ``round(rho * rank)`` components and the
        ``rank``-per-layer budget goes to the largest (default 2.0, PEFT's); 1.0 turns redistribution off.
    """

    section: ClassVar[str] = "lora"
    rank: int = checked_field(8, check=at_least(1))
    alpha: float | None = checked_field(None, check=positive)
    dropout: float = checked_field(0.0, check=unit_interval)
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    targets: str = checked_field(DEFAULT_TARGETS, check=valid_regex)
    # adapter methods (lora_jax.methods; checked by lora_jax.methods.options)
    method: Literal["lora", "dora", "pissa", "olora", "loftq", "vera", "eva"] = "lora"
    pissa_niter: int | None = checked_field(None, check=at_least(0))
    loftq_iter: int | None = checked_field(None, check=at_least(1))
    vera_d_initial: float | None = checked_field(None, check=positive)
    eva_batches: int | None = checked_field(None, check=at_least(1))
    eva_rho: float | None = checked_field(None, check=at_least(1))

    def _cross_checks(self) -> list[str]:
        from lora_jax.methods.options import option_errors

        return option_errors(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig(Section):
    """The quantized base (used by method ``qlora``).

    Attributes:
      format: ``nf4``, ``fp4``, ``int4``, ``int4_asym`` or ``int8`` (see :mod:`lora_jax.quant`); ``gguf`` keeps a
        GGUF model's own quantized tensors (Q8_0, Q4_K, ...: the file's codes, no requantization; the
        other fields do not apply).
      block_size: input rows per scale: 32, 64, 128 or 256; 0 means one block per output channel.
      double_quant: quantize the block scales to int8 too (QLoRA).
      targets: regex over parameter paths, as ``lora.targets``.
    """

    section: ClassVar[str] = "quant"
    format: Literal["nf4", "fp4", "int4", "int4_asym", "int8", "gguf"] = "nf4"
    block_size: Literal[0, 32, 64, 128, 256] = 64
    double_quant: bool = True
    targets: str = checked_field(DEFAULT_TARGETS, check=valid_regex)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(Section):
    """The optimizer and learning-rate schedule.

    Attributes:
      name: ``adamw``, ``adam`` or ``sgd``.
      lr: peak learning rate (of ``A`` when ``lora_plus_ratio`` is set).
      weight_decay: decoupled weight decay (``adamw`` only).
      betas: Adam's ``(b1, b2)``.
      warmup_steps: linear warmup from 0 to ``lr``.
      schedule: after warmup: ``constant``, ``cosine`` or ``linear`` decay to 0.
      grad_clip: global-norm clipping; ``None`` switches it off.
      lora_plus_ratio: LoRA+ ``lr_B / lr_A``; ``None`` is plain LoRA.
    """

    section: ClassVar[str] = "optim"
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = checked_field(2e-4, check=positive)
    weight_decay: float = checked_field(0.0, check=at_least(0))
    betas: tuple[float, float] = checked_field((0.9, 0.999), check=valid_betas)
    warmup_steps: int = checked_field(0, check=at_least(0))
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float | None = checked_field(1.0, check=positive)
    lora_plus_ratio: float | None = checked_field(None, check=positive)

    def _cross_checks(self) -> list[str]:
        if self.weight_decay > 0 and self.name != "adamw":
            return [
                f"optim.weight_decay: {self.name} has no weight decay (got {self.weight_decay!r}); "
                "use optim.name: adamw or weight_decay: 0"
            ]
        return []


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    """The training loop.

    Attributes:
      steps: optimizer steps.
      batch_size: examples per step (and per evaluation batch).
      eval_every: evaluate every this many steps; 0 means only at the end.
      checkpoint_every: save every this many steps; 0 means only at the end.
      log_every: write training metrics every this many steps.
      eval_batches: batches per loss evaluation.
      remat: what the backward pass recomputes per layer instead of storing:
        ``none``, ``full`` (the whole layer), ``dots`` (keep the projections'
        outputs) or ``offload`` (keep them in host memory; GPU/TPU). ``true``
        and ``false`` mean ``full`` and ``none``.
    """

    section: ClassVar[str] = "train"
    steps: int = checked_field(100, check=at_least(1))
    batch_size: int = checked_field(8, check=at_least(1))
    eval_every: int = checked_field(0, check=at_least(0))
    checkpoint_every: int = checked_field(0, check=at_least(0))
    log_every: int = checked_field(10, check=at_least(1))
    eval_batches: int = checked_field(8, check=at_least(1))
    remat: Literal["none", "full", "dots", "offload"] = "none"

    def __post_init__(self) -> None:
        if isinstance(self.remat, bool):  # true/false as the model functions take them
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        super().__post_init__()


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(Section):
    """The device mesh the run is sharded over (see :mod:`lora_jax.sharding`; placement only).

    The sizes multiply to the number of devices (of all processes); one may be
    ``-1``, the devices the others leave. All 1 (the default): no sharding.
    The mesh is not part of the run's hash: a run resumes on another mesh.

    Attributes:
      data: copies of the model, each on its share of the batch.
      fsdp: the frozen base, the adapters and the optimizer state are split
        over these devices (and the batch with them).
      tensor: matrices are also split along their other dimension.
    """

    section: ClassVar[str] = "mesh"
    data: int = checked_field(1, check=mesh_axis)
    fsdp: int = checked_field(1, check=mesh_axis)
    tensor: int = checked_field(1, check=mesh_axis)

    def _cross_checks(self) -> list[str]:
        fill = [k for k in ("data", "fsdp", "tensor") if getattr(self, k) == -1]
        return [f"mesh.{fill[1]}: only one axis may be -1 (got -1 for {' and '.join(fill)})"] if len(fill) > 1 else []

    def sizes(self) -> dict[str, int]:
        """``{"data": .., "fsdp": .., "tensor": ..}``; ``{}`` when every size is 1 (no mesh)."""
        s = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        return {} if all(v == 1 for v in s.values()) else s


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResourcesConfig(Section):
    """What one run asks of a Ray cluster (``lora-jax sweep --ray``); a local sweep ignores it.

    Attributes:
      cpu: CPUs reserved per run.
      gpu: GPUs reserved per run (fractions share one).
      max_retries: how often a run whose worker died is started again; it
        resumes from its last checkpoint.
    """

    section: ClassVar[str] = "resources"
    cpu: float = checked_field(1.0, check=at_least(0))
    gpu: float = checked_field(0.0, check=at_least(0))
    max_retries: int = checked_field(3, check=at_least(0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackingConfig(Section):
    """Where a run's metrics go besides ``metrics.jsonl`` (see :mod:`lora_jax.tracking`).

    Attributes:
      tensorboard: write TensorBoard events next to ``metrics.jsonl``.
      wandb_project: a Weights & Biases project to log to (needs ``wandb``).
      mlflow_uri: an MLflow tracking URI to log to (needs ``mlflow``).
    """

    section: ClassVar[str] = "tracking"
    tensorboard: bool = True
    wandb_project: str | None = None
    mlflow_uri: str | None = None


RUNTIME_SECTIONS = ("resources", "tracking", "mesh")
"""Sections that say where a run executes (and on which devices) and where its metrics go, not what it
computes: not in its hash (a run resumes on another mesh or cluster)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig(Section):
    """One run: what to train, how, and where its files go.

    Attributes:
      name: the experiment; its runs go to ``<output_dir>/<name>/<run>/``; default: the file's stem.
      method: ``base`` (evaluate the pretrained model), ``lora``, ``qlora``
        (LoRA on a quantized base) or ``full`` (fine-tune every weight).
      seed: the root of every PRNG key of the run.
      output_dir: the folder that holds experiments.
      model, task, lora, quant, optim, train: the sections.
      mesh, resources, tracking: where a run executes and how it is logged (not in :func:`config_hash`).
    """

    name: str = checked_field("experiment", check=safe_name)
    method: Literal["base", "lora", "qlora", "full"] = "lora"
    seed: int = checked_field(0, check=lambda v: None if 0 <= v < 2**32 else "must be in [0, 2**32)")
    output_dir: str = checked_field("runs", check=lambda v: None if v else "must not be empty")
    model: ModelConfig = checked_field(factory=ModelConfig)
    task: TaskConfig = checked_field(factory=TaskConfig)
    lora: LoraConfig = checked_field(factory=LoraConfig)
    quant: QuantConfig = checked_field(factory=QuantConfig)
    optim: OptimConfig = checked_field(factory=OptimConfig)
    train: TrainConfig = checked_field(factory=TrainConfig)
    mesh: MeshConfig = checked_field(factory=MeshConfig)
    resources: ResourcesConfig = checked_field(factory=ResourcesConfig)
    tracking: TrackingConfig = checked_field(factory=TrackingConfig)

    def _cross_checks(self) -> list[str]:
        errors = []
        if self.task.max_len > self.model.max_seq_len:
            errors.append(
                f"task.max_len: {self.task.max_len} is longer than model.max_seq_len="
                f"{self.model.max_seq_len}; shorten it or raise model.max_seq_len"
            )
        if self.optim.warmup_steps > self.train.steps:
            errors.append(f"optim.warmup_steps: {self.optim.warmup_steps} is more than train.steps={self.train.steps}")
        return errors


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig, "task": TaskConfig, "lora": LoraConfig,
    "quant": QuantConfig, "optim": OptimConfig, "train": TrainConfig,
    "resources": ResourcesConfig, "tracking": TrackingConfig, "mesh": MeshConfig,
}  # fmt: skip
"""The sections of :class:`ExperimentConfig` by key."""

TOP_KEYS = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in SECTIONS]
"""The top-level keys that are values, not sections (``name``, ``method``, ``seed``, ``output_dir``)."""

SWEEP_KEYS = ("sweep", "sweep_mode")
"""The keys of a sweep declaration (read by :func:`lora_jax.config.expand_sweep` only)."""

SWEEP_OPTIONS: dict[str, type] = {"fused": bool, "fused_batches": str, "rank_buckets": list}
"""Keys of the ``sweep:`` block that say how the runs run instead of listing an axis (:mod:`lora_jax.runner.fused`):
``fused: true`` trains the runs that can share one compiled program as one group; ``fused_batches``: ``own``
(each member its seed's data order) or ``same`` (every member the batches of its group's first run's seed,
one read per step); ``rank_buckets``: ascending ranks such as ``[8, 16, 32, 64]``: a group holds the runs of
one bucket (the smallest >= rank), so a small rank is not padded to the largest."""

SWEEP_DEFAULTS: dict[str, Any] = {"fused": False, "fused_batches": "own", "rank_buckets": ()}
"""The value of each :data:`SWEEP_OPTIONS` key a ``sweep:`` block leaves out."""

SWEEP_CHECKS: dict[str, Any] = {
    "fused_batches": lambda v: None if v in ("own", "same") else f"must be own or same (got {v!r})",
    "rank_buckets": lambda v: None if all(type(b) is int and b >= 1 for b in v) and v == sorted(set(v))
    else f"must be ranks >= 1 in ascending order, e.g. [8, 16, 32, 64] (got {v!r})",
}
"""Checks of the :data:`SWEEP_OPTIONS` values (after their type): each returns a complaint or ``None``."""

LEAVES: dict[str, Any] = {k: type_hints(ExperimentConfig)[k] for k in TOP_KEYS}
"""Every key path that holds a value (``seed``, ``lora.rank``), with its annotation."""
for _s, _cls in SECTIONS.items():
    LEAVES.update({f"{_s}.{k}": t for k, t in type_hints(_cls).items() if k != "section"})


def key_hint(bad: str, candidates: Sequence[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the candidate key paths closest to ``bad``, or ``""``."""
    last = bad.rsplit(".", 1)[-1]
    close = [c for c in candidates if c != bad and c.rsplit(".", 1)[-1] == last]
    close = close or difflib.get_close_matches(bad, candidates, n=1, cutoff=0.6)
    if not close:
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [tails[t] for t in difflib.get_close_matches(last, list(tails), n=1, cutoff=0.7)]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
