"""Hugging Face PEFT LoRA folders: :func:`export_peft` and :func:`import_peft`, and the module-name mapping.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
as Hugging Face PEFT writes them for the built-in Llama and BERT models,
readable by ``peft.PeftModel.from_pretrained``. Both files are written
atomically (:func:`lora_jax.io.files.atomic_write`); nothing is read with pickle.
"""

from __future__ import annotations

import collections
import math
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import CheckpointError
from lora_jax.io.factors import base_leaves, check_factors, no_such_path, strip_adapters
from lora_jax.io.files import CORRUPTED, atomic_write, json_bytes, read_json, read_safetensors, safetensors_bytes
from lora_jax.methods import dora as _dora
from lora_jax.models import load_hf as _load_hf
from lora_jax.models import stacking as _stacking

PyTree = Any
PathLike = str | os.PathLike

PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"

# Our role paths inside a layer -> the module name inside a Hugging Face layer.
_HF_ROLES = {
    "llama": {
        "attn/q_proj": "self_attn.q_proj",
        "attn/k_proj": "self_attn.k_proj",
        "attn/v_proj": "self_attn.v_proj",
        "attn/o_proj": "self_attn.o_proj",
        "mlp/gate_proj": "mlp.gate_proj",
        "mlp/up_proj": "mlp.up_proj",
        "mlp/down_proj": "mlp.down_proj",
    },
    "bert": {
        "attn/q_proj": "attention.self.query",
        "attn/k_proj": "attention.self.key",
        "attn/v_proj": "attention.self.value",
        "attn/o_proj": "attention.output.dense",
        "mlp/up_proj": "intermediate.dense",
        "mlp/down_proj": "output.dense",
    },
}
_HF_LAYER = {"llama": "layers.{}.", "bert": "encoder.layer.{}."}
_HF_PREFIX = {"llama": "model.", "bert": ""}  # before the layer list in LlamaForCausalLM / BertModel
_HF_LAYER_RE = {"llama": r"(model\.)?layers\.(\d+)\.(.+)", "bert": r"(bert\.)?encoder\.layer\.(\d+)\.(.+)"}
_HF_TOP = {"llama": {"lm_head": "lm_head"}, "bert": {}}
# Short names PEFT would also match in modules our models do not have (BERT's pooler.dense).
_AMBIGUOUS = {"llama": set(), "bert": {"dense"}}
MODEL_KINDS = ("llama", "bert")


def _kind(model_kind: str | None, params: PyTree) -> str:
    if model_kind is None:
        return "bert" if isinstance(params, dict) and "pos_embed" in params else "llama"
    if model_kind not in MODEL_KINDS:
        raise CheckpointError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
    return model_kind


def hf_module_name(path: str, model_kind: str, prefix: str | None = None) -> str | None:
    """Return the Hugging Face module name of one of our kernel paths (``None`` if it has none).

    ``prefix`` goes before the layer list (default ``model.`` for Llama, none
    for BERT: ``LlamaForCausalLM`` and ``BertModel`` naming).

    Examples:
      >>> hf_module_name("layers/3/attn/q_proj/kernel", "llama")
      'model.layers.3.self_attn.q_proj'
      >>> hf_module_name("layers/0/mlp/up_proj/kernel", "bert")
      'encoder.layer.0.intermediate.dense'
    """
    model_kind = _kind(model_kind, None)
    if path in _HF_TOP[model_kind]:
        return _HF_TOP[model_kind][path]
    m = re.fullmatch(r"layers/(\d+)/(.+)/kernel", path)
    if m and m.group(2) in _HF_ROLES[model_kind]:
        prefix = _HF_PREFIX[model_kind] if prefix is None else prefix
        return prefix + _HF_LAYER[model_kind].format(m.group(1)) + _HF_ROLES[model_kind][m.group(2)]
    return None


def kernel_path(module: str, model_kind: str) -> str | None:
    """Return our kernel path of a Hugging Face module name, or ``None`` (the inverse of :func:`hf_module_name`).

    Examples:
      >>> kernel_path("bert.encoder.layer.2.attention.self.key", "bert")
      'layers/2/attn/k_proj/kernel'
    """
    for ours, theirs in _HF_TOP[model_kind].items():
        if module == theirs:
            return ours
    m = re.fullmatch(_HF_LAYER_RE[model_kind], module)
    if m:
        roles = {v: k for k, v in _HF_ROLES[model_kind].items()}
        if m.group(3) in roles:
            return f"layers/{m.group(2)}/{roles[m.group(3)]}/kernel"
    return None


def _number(x: float) -> int | float:
    r = round(x)
    return int(r) if math.isclose(x, r, rel_tol=1e-9, abs_tol=1e-12) else x


def _most_common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def export_peft(
    directory: PathLike,
    params: PyTree,
    *,
    base_model_name_or_path: str,
    model_kind: str = "llama",
    rslora: bool | None = None,
) -> Path:
    """Write the adapters of a built-in Llama or BERT model as a Hugging Face PEFT LoRA folder.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
    ``(r, in) = A^T`` and ``lora_B.weight`` ``(out, r) = B^T`` per module
    (``model.layers.<i>.self_attn.q_proj`` for Llama,
    ``encoder.layer.<i>.attention.self.query`` for BERT). ``adapter_config.json``
    gives the most common rank and alpha as ``r`` and ``lora_alpha`` and the
    others in ``rank_pattern`` / ``alpha_pattern`` (keys: escaped full module
    names). Each module's ``lora_alpha`` is ``scale * r`` (``scale * sqrt(r)``
    with rsLoRA), so PEFT's ``lora_alpha / r`` gives our scale back.
    ``target_modules`` lists short names (``q_proj``) when they select exactly
    the adapted modules, full module names otherwise.

    Args:
      directory: the folder (created if needed).
      params: adapted params (LoRA weights on 2-D kernels, ``in_ndim=1``).
      base_model_name_or_path: recorded for PEFT (the hub id or folder of the base).
      model_kind: ``"llama"`` (``LlamaForCausalLM``) or ``"bert"`` (``BertModel``).
      rslora: write ``use_rslora``; default: only when every ``scale * r`` is
        fractional and every ``scale * sqrt(r)`` whole.

    Returns:
      The folder.

    Raises:
      CheckpointError: no LoRA weight, or one PEFT cannot express (an embedding, a
        kernel with several input axes, a path with no Hugging Face module).

    Examples:
      >>> import json, tempfile, jax, jax.numpy as jnp
      >>> base = {"layers": [{"attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}]}
      >>> p = _lora.init(jax.random.key(0), base, [_lora.LoraRule(pattern=".*q_proj/kernel", rank=2, alpha=6)])
      >>> d = export_peft(tempfile.mkdtemp(), p, base_model_name_or_path="tiny")
      >>> cfg = json.loads((d / "adapter_config.json").read_text())
      >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
      (2, 6, ['q_proj'])
      >>> import_peft(d, base)["layers"][0]["attn"]["q_proj"]["kernel"].scale
      3.0
    """
    if _stacking.is_stacked(params):  # layers under lax.scan: PEFT's files name each layer
        params = _stacking.unstack_layers(params)
    model_kind = _kind(model_kind, params)
    nodes = _lora.nodes(params)
    if not nodes:
        raise CheckpointError("export_peft: params hold no LoRA weight")
    modules = {}
    for path, n in nodes:
        name = hf_module_name(path, model_kind)
        if name is None:
            hint = " (PEFT's embedding LoRA is not exported)" if path in ("embed", "pos_embed", "type_embed") else ""
            raise CheckpointError(
                f"export_peft: LoRA weight {path!r} has no {model_kind} module in PEFT's naming{hint}; "
                f"supported: layers/<i>/({'|'.join(_HF_ROLES[model_kind])})/kernel"
                + (", lm_head" if _HF_TOP[model_kind] else "")
            )
        if n.in_ndim != 1 or len(n.lora_a.shape) != 2:
            raise CheckpointError(f"export_peft: {path!r} has in_ndim={n.in_ndim}; PEFT Linear layers need in_ndim=1")
        modules[name] = n
    use_dora = _dora.check_peft_export(modules)
    if rslora is None:
        fractional = all(not isinstance(_number(n.scale * n.rank), int) for n in modules.values())
        whole = all(isinstance(_number(n.scale * math.sqrt(n.rank)), int) for n in modules.values())
        rslora = fractional and whole
    alphas = {m: _number(n.scale * (math.sqrt(n.rank) if rslora else n.rank)) for m, n in modules.items()}
    ranks = {m: n.rank for m, n in modules.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    short = {m.rsplit(".", 1)[-1] for m in modules}
    all_kernels = [
        hf_module_name(p, model_kind)
        for p, _ in _paths.leaves_with_paths(strip_adapters(params), is_leaf=_lora.is_node)
    ]
    complete = all(m in modules for m in all_kernels if m and m.rsplit(".", 1)[-1] in short)
    targets = sorted(short) if complete and not short & _AMBIGUOUS[model_kind] else sorted(modules)
    tensors = {}
    for m, n in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = np.asarray(n.lora_a).T
        tensors[f"base_model.model.{m}.lora_B.weight"] = np.asarray(n.lora_b).T
        if use_dora:
            tensors[f"base_model.model.{m}.lora_magnitude_vector"] = np.asarray(n.lora_magnitude)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if model_kind == "llama" else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([float(n.dropout) for n in modules.values()]),
        "target_modules": targets,
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "use_rslora": bool(rslora),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PEFT_TENSORS, safetensors_bytes(tensors))
    atomic_write(directory / PEFT_CONFIG, json_bytes(config))
    return directory


def _pattern_value(patterns: dict, module: str, field: str, default: Any) -> tuple[str, Any]:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key matching the end of the name.

    Returns ``(where, value)``: ``where`` names the field the value came from.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return f"{field}[{key!r}]", value
    return ("r" if field == "rank_pattern" else "lora_alpha"), default


# PEFT's target_modules when a config gives none (peft.utils.constants, LoRA).
_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def targeted(config: dict, model_kind: str) -> Any:
    """The modules a PEFT LoRA config selects, as a predicate on full module names.

    Follows ``peft.tuners.tuners_utils.check_target_module_exists``:
    ``target_modules`` is a list of names (a module is selected when its name
    equals one or ends with ``.<name>``, restricted to ``layers_to_transform``
    when given), a regex string (``re.fullmatch`` on the full name) or
    ``"all-linear"`` (every linear layer but the output head); ``exclude_modules``
    (same forms) removes modules; no ``target_modules`` means PEFT's default for
    the architecture (``q_proj``/``v_proj``, ``query``/``value``).

    Raises:
      CheckpointError: a field of the wrong type or a regex that does not compile.

    Examples:
      >>> sel = targeted({"target_modules": ["q_proj"], "layers_to_transform": [1]}, "llama")
      >>> sel("model.layers.1.self_attn.q_proj"), sel("model.layers.0.self_attn.q_proj")
      (True, False)
      >>> targeted({"target_modules": r".*\.(query|key)"}, "bert")("encoder.layer.0.attention.self.key")
      True
    """
    targets = config.get("target_modules")
    if targets is None and config.get("target_parameters") is None:
        targets = _DEFAULT_TARGETS[model_kind]
    names = _names_field(config, "target_modules", targets)
    exclude = _names_field(config, "exclude_modules", config.get("exclude_modules"))
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise CheckpointError(f"layers_to_transform={layers!r}: expected a layer index or a list of them")
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns

    def listed(key: str, items) -> bool:
        return key in items or any(key.endswith(f".{t}") for t in items)

    def layer_ok(key: str) -> bool:
        if not layers:
            return True
        m = None
        for pat in patterns or [None]:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\." if pat else r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
            if m:
                break
        return m is not None and int(m.group("idx")) in layers

    def excluded(key: str) -> bool:
        if exclude is None:
            return False
        return bool(exclude.fullmatch(key)) if isinstance(exclude, re.Pattern) else listed(key, exclude)

    def select(key: str) -> bool:
        if excluded(key):
            return False
        if isinstance(names, re.Pattern):
            return bool(names.fullmatch(key))
        if names == "all-linear":
            return key != "lm_head" and not key.endswith(".lm_head")
        return bool(names) and listed(key, names) and layer_ok(key)

    return select


def _names_field(config: dict, field: str, value: Any) -> Any:
    """A ``target_modules``-like field as a list of names, a compiled regex, ``"all-linear"`` or ``None``."""
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    if isinstance(value, str):
        if field == "target_modules" and value.lower() == "all-linear":
            return "all-linear"
        try:
            return re.compile(value)
        except re.error as e:
            raise CheckpointError(f"{field}={value!r} is not a valid regular expression ({e})") from None
    raise CheckpointError(f"{field}={value!r}: expected a list of module names or a regex string")


def _check_numbers(cfg_file: Path, config: dict) -> None:
    """``r``, ``lora_alpha``, the patterns and ``lora_dropout`` must be numbers PEFT could have written."""

    def is_num(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    fix = "the file was edited or corrupted; restore it from the adapter's source or save the adapter again"
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise CheckpointError(f"{cfg_file}: {field} is missing; PEFT writes it with every LoRA adapter ({fix})")
    ranks = {"r": config["r"], **{f"rank_pattern[{k!r}]": v for k, v in (config.get("rank_pattern") or {}).items()}}
    for where, v in ranks.items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise CheckpointError(f"{cfg_file}: {where}={v!r}; a rank must be a whole number >= 1 ({fix})")
    alphas = {"lora_alpha": config["lora_alpha"],
              **{f"alpha_pattern[{k!r}]": v for k, v in (config.get("alpha_pattern") or {}).items()}}
    for where, v in alphas.items():
        if not is_num(v):
            raise CheckpointError(f"{cfg_file}: {where}={v!r}; lora_alpha must be a finite number ({fix})")
    dropout = config.get("lora_dropout") or 0.0
    if not (is_num(dropout) and 0 <= dropout < 1):
        raise CheckpointError(f"{cfg_file}: lora_dropout={dropout!r}; it must be a number in [0, 1) ({fix})")


_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight")
# Settings whose non-default value means weights PEFT trains that a LoRA node cannot hold.
_UNSUPPORTED = {
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "layer_replication": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
}


def import_peft(directory: PathLike, base_params: PyTree, model_kind: str | None = None) -> PyTree:
    """Read a Hugging Face PEFT LoRA folder into LoRA weights on ``base_params``.

    Each module's scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
    ``use_rslora``), with ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT
    does; ``A = lora_A^T``, ``B = lora_B^T``; dropout from ``lora_dropout``.

    Args:
      directory: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      base_params: params of the built-in model (adapters already in it are replaced).
      model_kind: ``"llama"`` or ``"bert"``; default: ``"bert"`` if the params
        have ``pos_embed``, else ``"llama"``.

    Returns:
      ``base_params`` with the adapted kernels as :class:`~lora_jax.lora.LoraWeight` s.

    Raises:
      FileNotFoundError: a file is missing.
      CheckpointError: pickle-only weights (``adapter_model.bin``), a corrupted
        file, a PEFT feature a LoRA node cannot hold (DoRA, trained biases,
        ``modules_to_save``, ...), an unknown tensor name, a shape that does
        not fit the base, ``r`` / ``lora_alpha`` missing or not a finite
        number, a rank that disagrees with ``r`` / ``rank_pattern``, or
        ``target_modules`` (PEFT's semantics: :func:`targeted`) that disagree
        with the tensors: factors of an unselected module, or a selected
        module without factors (the field and the first module are named).
    """
    if _stacking.is_stacked(base_params):  # read onto the per-layer tree, then stack again
        adapted = import_peft(directory, _stacking.unstack_layers(base_params), model_kind)
        return _stacking.stack_layers(adapted)
    model_kind = _kind(model_kind, base_params)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such PEFT adapter folder")
    cfg_file, file = directory / PEFT_CONFIG, directory / PEFT_TENSORS
    config = read_json(cfg_file, f"{PEFT_CONFIG} (the PEFT adapter config)", hint=CORRUPTED)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type={config.get('peft_type')!r}; only LORA adapters are read")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise CheckpointError(
                f"{cfg_file}: {key}={config[key]!r} is not supported (a LoRA node holds A and B only); "
                f"expected {allowed[0]!r}"
            )
    if not file.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _load_hf.PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{directory / pickles[0]}: pickle adapter weights are refused (unpickling runs arbitrary code); "
                "convert once, in an environment you trust: PeftModel.from_pretrained(model, DIR).save_pretrained(DIR)"
            )
        raise FileNotFoundError(f"{file}: missing PEFT adapter weights")
    _check_numbers(cfg_file, config)
    try:
        select = targeted(config, model_kind)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    tensors = read_safetensors(file)
    factors: dict[str, dict[str, np.ndarray]] = {}
    for name, x in tensors.items():
        m = _PEFT_KEY.fullmatch(name) or _dora.PEFT_MAGNITUDE_KEY.fullmatch(name)
        if not m:
            raise CheckpointError(f"{file}: tensor {name!r} is not a LoRA factor (lora_A/lora_B); not supported")
        factors.setdefault(m.group("module"), {})[m.group("ab")] = x
    leaves, treedef = base_leaves(base_params)
    by_path = dict(leaves)
    dropout = float(config.get("lora_dropout") or 0.0)
    shown = f"target_modules={config.get('target_modules')!r}"
    new: dict[str, _lora.LoraWeight] = {}
    natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]  # noqa: E731
    for module, ab in sorted(factors.items(), key=lambda kv: natural(kv[0])):  # layer 2 before layer 10
        path = kernel_path(module, model_kind)
        if path is None:
            raise CheckpointError(f"{file}: module {module!r} has no counterpart in the built-in {model_kind} model")
        if set(ab) - {"m"} != {"A", "B"}:
            raise CheckpointError(f"{file}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if path not in by_path:
            raise no_such_path(file, path, leaves)
        if not select(module):
            raise CheckpointError(
                f"{cfg_file}: {shown} does not select module {module!r}, but {PEFT_TENSORS} holds its factors "
                "(PEFT would not load them); add the module to target_modules or remove its tensors"
            )
        a, b = ab["A"].T, ab["B"].T
        check_factors(file, f"{module} -> {path}", by_path[path], a, b, 1)
        where, r = _pattern_value(config.get("rank_pattern") or {}, module, "rank_pattern", config["r"])
        if r != a.shape[1]:
            raise CheckpointError(
                f"{cfg_file}: {where}={r} disagrees with the tensors: module {module!r} has rank {a.shape[1]} "
                f"in {PEFT_TENSORS}; set {where} to {a.shape[1]} (or the file is corrupted)"
            )
        _, alpha = _pattern_value(config.get("alpha_pattern") or {}, module, "alpha_pattern", config["lora_alpha"])
        scale = float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
        new[path] = _lora.LoraWeight(by_path[path], jnp.asarray(a), jnp.asarray(b), scale, 1, dropout)
        new[path] = _dora.from_peft(new[path], ab.get("m"), bool(config.get("use_dora")), f"{file}: module {module!r}")
    if not new:
        raise CheckpointError(f"{file}: no LoRA tensors")
    layer = (re.fullmatch(_HF_LAYER_RE[model_kind], m) for m in factors)
    prefix = next((m.group(1) or "" for m in layer if m), None)
    for path, _ in leaves:
        module = hf_module_name(path, model_kind, prefix)
        if module is not None and path not in new and select(module):
            raise CheckpointError(
                f"{cfg_file}: {shown} selects module {module!r} ({path}), but {PEFT_TENSORS} has no lora_A/lora_B "
                "for it (PEFT would leave it untrained); the tensors are missing or target_modules was edited: "
                "name only the adapted modules in target_modules"
            )
    return treedef.unflatten([new.get(p, x) for p, x in leaves])

