"""Hand-made mutations of lora-jax, each with the tests that must fail when it is applied.

Every entry of :data:`MUTATIONS` is one plausible bug: an exact text of a file
of the repository and what it becomes. For each, the script copies the
repository to a temporary folder (the working tree is never edited), applies
the one replacement there, runs the named tests against that copy, and records
whether they failed (the mutation is *killed*) or passed (it *survived*). The
tests run once on the unmutated copy first: they must pass there, or a "kill"
would mean nothing.

    python experiments/reliability/mutations.py                 # all, JSON on stdout
    python experiments/reliability/mutations.py --only M4 M8     # some
    python experiments/reliability/mutations.py --out experiments/reliability/results/mutations.json

It imports nothing from lora_jax (tests/test_mutations.py checks the table
against the current tree cheaply).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the interpreter running this script (its environment has the test dependencies)
COPIED = ("lora_jax", "tests", "configs", "experiments", "pyproject.toml", "README.md")


class Mutation(NamedTuple):
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


T_TRAIN = "tests/test_train.py::test_train_step_drops_out_with_a_fresh_mask_per_layer_and_per_step"
T_OPT = "tests/test_build.py::test_make_optimizer_updates_match_adam_written_out"
T_EVAL = "tests/test_evaluate.py::test_val_loss_is_the_token_weighted_mean_of_the_adapted_model"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "M1", "lora_jax/train.py",
        "params = _lora.with_dropout_keys(_paths.combine(t, frozen), step_key)",
        "params = _paths.combine(t, frozen)",
        (T_TRAIN,), "train.make_train_step: the step never gives the LoRA nodes a dropout key"),
    Mutation(
        "M1b", "lora_jax/lora.py",
        "if self.dropout > 0.0 and self.dropout_key is not None:",
        "if False:",
        (T_TRAIN,), "lora.LoraWeight._adapter_input: dropout never applied"),
    Mutation(
        "M1c", "lora_jax/lora.py",
        "y = fused(x2, self._adapter_input(x2), a, b, float(self.scale), custom_vjp=self.custom_vjp)",
        "y = fused(x2, x2, a, b, float(self.scale), custom_vjp=self.custom_vjp)",
        ("tests/test_quant.py::test_qlora_layer_matches_lora_on_the_dequantized_weight",),
        "lora.LoraWeight.__rmatmul__: a quantized base's adapter (_kernels.qlora_matmul) gets the undropped input"),
    Mutation(
        "M2", "lora_jax/lora.py",
        "k = None if key is None else jax.random.fold_in(key, i)",
        "k = key",
        (T_TRAIN,), "lora.with_dropout_keys: one dropout key shared by all layers"),
    Mutation(
        "M3", "lora_jax/train.py",
        "step_key = jax.random.fold_in(key, step)",
        "step_key = key",
        (T_TRAIN,), "train.make_train_step: the same dropout key every step"),
    Mutation(
        "M4", "lora_jax/runner/evaluate.py",
        "    t, f = _paths.split(params)\n",
        "    t, f = _paths.split(params)\n    t = __import__('jax').tree.map(lambda x: 0 * x, t)\n",
        (T_EVAL,), "runner.evaluate.evaluate: the eval step runs with the adapters zeroed"),
    Mutation(
        "M5a", "lora_jax/runner/build.py",
        "    sched = make_lr_schedule(o, steps)\n",
        "    sched = o.lr\n",
        (T_OPT,), "runner.build.make_optimizer: a constant learning rate (no warm-up, no schedule)"),
    Mutation(
        "M5b", "lora_jax/runner/build.py",
        "return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip else tx",
        "return tx",
        (T_OPT,), "runner.build.make_optimizer: no gradient clipping"),
    Mutation(
        "M5c", "lora_jax/runner/build.py",
        "weight_decay=o.weight_decay)",
        "weight_decay=1e-4)",
        (T_OPT,), "runner.build.make_optimizer: AdamW's weight decay not taken from the config"),
    Mutation(
        "M5d", "lora_jax/runner/build.py",
        "return optax.adam(learning_rate, b1=o.betas[0], b2=o.betas[1])",
        "return optax.adam(learning_rate)",
        (T_OPT,), "runner.build.make_optimizer: Adam's betas not taken from the config"),
    Mutation(
        "M5e", "lora_jax/optim.py",
        "lr_b = lambda step: ratio * learning_rate(step)  # noqa: E731",
        "lr_b = learning_rate",
        (T_OPT,), "optim.lora_plus: with a schedule, B learns at A's rate (the LoRA+ ratio lost)"),
    Mutation(
        "M5f", "lora_jax/runner/build.py",
        "[optax.linear_schedule(0.0, o.lr, o.warmup_steps), main]",
        "[optax.constant_schedule(o.lr), main]",
        ("tests/test_build.py::test_lr_schedule_warms_up_then_follows_the_schedule", T_OPT),
        "runner.build.make_lr_schedule: no warm-up"),
    Mutation(
        "M6", "lora_jax/io/hashing.py",
        'h.update(f"{path}|{type(node).__name__}|{flatten()[1]!r}\\n".encode())',
        "pass",
        ("tests/test_io_hashing.py::test_quantized_bases_differing_only_in_static_fields_hash_differently",),
        "io.hashing.base_hash: a quantized leaf's static fields (format, layout, dtype) ignored"),
    Mutation(
        "M7", "lora_jax/io/peft.py",
        'dropout = float(config.get("lora_dropout") or 0.0)',
        "dropout = 0.0",
        ("tests/test_io_peft.py::test_import_random_nonsquare_peft_factors_matches_peft_in_torch",),
        "io.peft.import_peft: lora_dropout dropped"),
    Mutation(
        "M8", "lora_jax/runner/evaluate.py",
        'total += float(m["loss"]) * float(m["n_tokens"])\n        n += float(m["n_tokens"])',
        'total += float(m["loss"])\n        n += 1.0',
        (T_EVAL,), "runner.evaluate.evaluate: val_loss a plain mean of batch means, not token-weighted"),
    Mutation(
        "M9", "lora_jax/models/load_gguf.py",
        "w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])",
        "w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])",
        tuple(f"tests/test_load_gguf.py::test_quantized_import_is_exact[{k}]"
              for k in ("Q4_0-int4", "Q4_1-int4_asym", "Q8_0-int8")),
        "models.load_gguf.unpermute_rope_rows: llama.cpp's permutation applied again instead of undone "
        "(the same for head_dim 4, so its doctest passes)"),
    Mutation(
        "M10", "lora_jax/io/peft.py",
        'a, b = ab["A"].T, ab["B"].T',
        'a, b = ab["B"], ab["A"]',
        ("tests/test_io_peft.py::test_import_random_nonsquare_peft_factors_matches_peft_in_torch",),
        "io.peft.import_peft: lora_A and lora_B swapped (shapes fit a square module)"),
    Mutation(
        "M11", "lora_jax/lora.py",
        "return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))",
        "return jnp.where(mask, x, jnp.zeros((), x.dtype))",
        tuple(f"tests/test_lora.py::test_dropout_applies_only_with_a_key[{s}]" for s in range(6)),
        "lora.LoraWeight._adapter_input: dropout without the 1/keep rescaling (every seed must see it)"),
    Mutation(
        "M12a", "experiments/benchmarks/peers.py",
        "statistics.median(a / b for a, b in per_round)",
        "statistics.median(a for a, _ in per_round) / statistics.median(b for _, b in per_round)",
        ("tests/test_benchmarks.py::test_peers_ratios_are_medians_of_the_per_round_ratios",),
        "benchmarks peers.summarize: a quotient of medians instead of the median of per-round ratios"),
    Mutation(
        "M12b", "experiments/benchmarks/train_step.py",
        'statistics.median(p / b for p, b in zip(r["pipelined"], r["blocked"]))',
        'statistics.median(r["pipelined"]) / statistics.median(r["blocked"])',
        ("tests/test_benchmarks.py::test_train_step_loop_ratios_are_medians_of_the_per_round_ratios",),
        "benchmarks train_step.loop_styles: a quotient of medians instead of the median of per-round ratios"),
    Mutation(
        "M13a", "lora_jax/models/layers.py",
        "        return jax.checkpoint(fn)\n",
        "        return jax.checkpoint(lambda x, lp, f=fn: jax.lax.stop_gradient(f(x, lp)))\n",
        ("tests/test_train.py::test_remat_gives_the_loss_and_gradients_of_the_plain_forward",),
        "models.layers.remat_layer: remat=True cuts the gradient through each layer"),
    Mutation(
        "M13b", "lora_jax/models/layers.py",
        "    if name == \"full\":\n        return jax.checkpoint(fn)\n",
        "    if name == \"full\":\n        return fn\n",
        ("tests/test_train.py::test_remat_gives_the_loss_and_gradients_of_the_plain_forward",),
        "models.layers.remat_layer: remat=True silently does not rematerialise"),
    Mutation(
        "M14a", "lora_jax/runner/plan.py",
        'trainable = {"base": 0, "full": counts.total}.get(cfg.method, counts.trainable)',
        'trainable = {"base": 0, "full": counts.total}.get(cfg.method, counts.total)',
        ("tests/test_sweep.py::test_plan_prints_one_row_per_run_with_the_parameter_counts",),
        "runner.plan.plan_run: LoRA runs counted as full fine-tuning"),
    Mutation(
        "M14b", "lora_jax/cli.py",
        "        params = adapters.load(a.adapter, params)\n",
        "        adapters.load(a.adapter, params)\n",
        ("tests/test_sweep.py::test_eval_scores_the_base_and_the_adapter_given",),
        "cli.cmd_eval: --adapter loaded but not evaluated"),
    Mutation(
        "M14c", "lora_jax/cli.py",
        "        params = adapters.combine_adapters(params, specs)\n",
        "        adapters.combine_adapters(params, specs)\n",
        ("tests/test_sweep.py::test_generate_answers_as_generate_text_with_and_without_the_adapter",),
        "cli.cmd_generate: --adapter loaded but not used"),
    Mutation(
        "M14d", "lora_jax/models/registry.py",
        '"install": s.install_command,',
        '"install": s.requirement,',
        ("tests/test_sweep.py::test_models_lists_every_registered_model_and_whether_it_is_installed",),
        "models.registry.list_models (lora-jax models): the install column without the command"),
    Mutation(
        "M15", "lora_jax/_kernels.py",
        "        return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32).astype(_BF16)",
        "        return jax.lax.dot_general(a, b, dims)",
        ("tests/test_kernels.py::test_every_bf16_dot_of_a_bf16_lora_and_qlora_step_accumulates_in_float32",),
        "_kernels.dot: bf16 products with bf16 output (XLA:CPU's slow path) instead of float32 accumulation"),
)  # fmt: skip


def copy_repo(dest: Path) -> None:
    """Copy what the tests need (no .git, caches or run folders) into ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "runs", ".ruff_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


def apply(root: Path, m: Mutation) -> str:
    """Replace ``m.old`` (which must occur exactly once) in ``root / m.file``; return the original text."""
    path = root / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"{m.id}: the old text occurs {n} times in {m.file} (expected once); update the table")
    path.write_text(text.replace(m.old, m.new))
    return text


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, float, str]:
    """Run pytest on ``tests`` in ``root``; return (exit code, seconds, output tail)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "JAX_PLATFORMS": "cpu"}
    cmd = [PYTHON, "-m", "pytest", "-q", "-x", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        code, out = -1, "timed out"
    return code, round(time.perf_counter() - t0, 1), out[-2000:]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--out", type=Path, help="also write the JSON summary here")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown ids: {sorted(set(args.only) - {m.id for m in MUTATIONS})}")
    with tempfile.TemporaryDirectory(prefix="lora_jax_mut_") as tmp:
        root = Path(tmp)
        copy_repo(root)
        all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, seconds, out = run_tests(root, all_tests, args.timeout)
        baseline = {"tests": list(all_tests), "passed": code == 0, "seconds": seconds}
        print(f"[mutations] unmutated copy: {'pass' if code == 0 else 'FAIL'} ({seconds}s)", file=sys.stderr)
        if code != 0:
            baseline["output"] = out
        results = []
        for m in chosen:
            original = apply(root, m)
            try:
                code, seconds, out = run_tests(root, m.tests, args.timeout)
            finally:
                (root / m.file).write_text(original)
            # pytest exits 1 when tests failed; other codes (collection errors, timeouts) are not kills
            row = {"id": m.id, "file": m.file, "what": m.what, "tests": list(m.tests), "killed": code == 1,
                   "exit_code": code, "seconds": seconds}
            if code not in (0, 1):
                row["output"] = out
            results.append(row)
            print(f"[mutations] {m.id}: {'killed' if code == 1 else 'SURVIVED' if code == 0 else f'error {code}'} "
                  f"({seconds}s)", file=sys.stderr)
    summary = {
        "mutations": len(results),
        "killed": sum(r["killed"] for r in results),
        "survived": [r["id"] for r in results if not r["killed"]],
        "baseline": baseline,
        "results": results,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if summary["baseline"]["passed"] and not summary["survived"] else 1)
