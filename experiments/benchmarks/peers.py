"""Peer benchmark: one train step of lora-jax next to Hugging Face PEFT, qwix and flax.nnx LoRA.

Every framework trains the same Llama-shaped model (the SmolLM2-135M shape),
with the same weights (drawn once from one numpy seed and copied into each),
on the same token batch (4 x 128): rank 16 on all seven projections, alpha 32,
AdamW with fp32 state, 2 threads, no activation checkpointing. One step is
forward, backward and optimizer update.

    python experiments/benchmarks/peers.py                  # full run, JSON on stdout
    python experiments/benchmarks/peers.py --markdown results/peers.md
    python experiments/benchmarks/peers.py --tiny --reps 2  # smoke run (tiny shape)

Setups:
  ours_full, ours_lora, ours_qlora  lora-jax (QLoRA: NF4 + double quantization, block 64)
  peft_lora, peft_qlora             PEFT on PyTorch CPU; QLoRA through bitsandbytes (NF4, double quant)
  qwix_lora, qwix_qlora             qwix LoraProvider on a flax.nnx version of the model (QLoRA: NF4)
  nnx_lora                          flax.nnx LoRALinear on the same nnx model
  ours_lora_bf16, peft_lora_bf16    the LoRA step in bfloat16 (extra row: how bf16 fares on a CPU)

Timing: each group of setups below runs in one process, interleaved (A B C A B C
...), after a compiling call (reported as ``compile_s``, first step included)
and one warm-up round; seconds are medians over ``--reps`` rounds and each
ratio is the median of the per-round ratios of two setups of the same group.
Every timing process applies the ``lora-jax`` command's process settings
(:func:`lora_jax.cli.process_settings`: the host allocator of
:mod:`lora_jax.hostmem`), so every setup, the peers' included, runs with
them (faster for PyTorch too). Peak RSS (``/proc/self/status`` VmHWM): each setup alone in a
fresh process, the peers' with the system allocator's defaults
(``LORA_JAX_MALLOC=system``: they run without lora-jax, and retaining freed
memory raises their RSS); measured are the whole process (imports, the shared numpy weights, the framework's copy of
them, compilation, the first step) and the steady state (three steps, after
freed memory is handed back to the OS). The RSS target compares the steady
state, the memory a run needs to keep training; the whole-process peak is
dominated by how the weights were staged. Initial loss: the loss of the first step, before any
update; LoRA starts with B = 0, so every fp32 LoRA setup starts at the base
model's loss.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_step import ALL_SEVEN, model_config  # noqa: E402  (the same shapes and targets)

from lora_jax import cli, hostmem  # noqa: E402

SETUPS = (
    "ours_full", "ours_lora", "ours_qlora", "peft_lora", "peft_qlora", "qwix_lora", "qwix_qlora", "nnx_lora",
    "ours_lora_bf16", "peft_lora_bf16",
)
GROUPS = (
    ("ours_lora", "peft_lora", "ours_full"),
    ("ours_qlora", "peft_qlora"),
    ("ours_lora", "qwix_lora", "nnx_lora"),
    ("ours_qlora", "qwix_qlora"),
    ("ours_lora_bf16", "peft_lora_bf16"),
)
# ratio name -> (numerator, denominator, target or None)
RATIOS = {
    "ours_lora_over_peft_lora": ("ours_lora", "peft_lora", 0.9),
    "ours_qlora_over_peft_qlora": ("ours_qlora", "peft_qlora", 0.9),
    "ours_lora_over_qwix_lora": ("ours_lora", "qwix_lora", 0.9),
    "ours_qlora_over_qwix_qlora": ("ours_qlora", "qwix_qlora", 0.9),
    "ours_lora_over_nnx_lora": ("ours_lora", "nnx_lora", None),
    "ours_lora_over_ours_full": ("ours_lora", "ours_full", None),
    "ours_lora_bf16_over_peft_lora_bf16": ("ours_lora_bf16", "peft_lora_bf16", None),
}
RSS_TARGET = ("ours_qlora", "peft_qlora", 0.8)  # ours QLoRA peak RSS <= 0.8 x PEFT + bitsandbytes QLoRA


def weights(cfg, seed: int = 0) -> dict:
    """The model's weights as numpy float32 in lora-jax's layout (normal, std 0.02; norms at 1)."""
    import jax
    import numpy as np

    from lora_jax.models import llama

    shapes = jax.eval_shape(lambda: llama.init(jax.random.key(0), cfg))
    rng = np.random.default_rng(seed)

    def draw(path, sds):
        if path[-1].key == "scale":
            return np.ones(sds.shape, np.float32)
        return (0.02 * rng.standard_normal(sds.shape, dtype=np.float32)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tokens(cfg, batch: int, seq: int, seed: int = 1):
    import numpy as np

    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)


def build_ours(setup: str, params_np: dict, cfg, *, rank: int, alpha: int, lr: float):
    """lora-jax, used the way the README shows: quantize, adapt, split, masked AdamW, jit step."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax.models import llama

    dtype = jnp.bfloat16 if setup.endswith("_bf16") else jnp.float32
    params = jax.tree.map(lambda w: jnp.asarray(w, dtype), params_np)
    if setup == "ours_qlora":
        params = lj.quantize(params, [lj.QuantRule(pattern=ALL_SEVEN, format="nf4", block_size=64, double_quant=True)])
    if setup == "ours_full":
        trainable = lj.paths.everything
    else:
        params = lj.lora.init(jax.random.key(1), params, [lj.LoraRule(pattern=ALL_SEVEN, rank=rank, alpha=alpha)])
        trainable = lj.paths.is_trainable_leaf
    tx = optax.adamw(lr)
    state = lj.train.init_state(params, tx, jax.random.key(2), trainable)
    del params
    train_step = lj.train.make_train_step(lambda p, b: llama.loss(p, b, cfg), tx)
    box = [state]

    def step(tok) -> float:
        box[0], metrics = train_step(box[0], {"tokens": jnp.asarray(tok)})
        return float(metrics["loss"])  # float() waits for the step

    return step


def build(setup: str, params_np: dict, cfg, *, rank: int = 16, alpha: int = 32, lr: float = 1e-4):
    if setup.startswith("ours_"):
        return build_ours(setup, params_np, cfg, rank=rank, alpha=alpha, lr=lr)
    if setup.startswith("peft_"):
        import peers_torch

        dtype = "bfloat16" if setup.endswith("_bf16") else "float32"
        return peers_torch.build(setup.removesuffix("_bf16"), params_np, cfg, rank=rank, alpha=alpha, lr=lr,
                                 threads=2, dtype=dtype)
    import peers_nnx

    return peers_nnx.build(setup, params_np, cfg, rank=rank, alpha=alpha, lr=lr)


def describe() -> dict:
    """Versions of every framework in this run."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": platform.machine(),
           "cpus": len(os.sched_getaffinity(0))}
    for pkg in ("jax", "jaxlib", "flax", "optax", "qwix", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------
# worker processes


def time_group(setups: list[str], args) -> dict:
    """Build every setup of a group in this process and time their steps interleaved."""
    cfg = model_config(args.tiny)
    params_np = weights(cfg)
    tok = tokens(cfg, args.batch, args.seq)
    steps, compile_s, initial_loss, losses = {}, {}, {}, {}
    for s in setups:
        steps[s] = build(s, params_np, cfg, rank=args.rank, alpha=args.alpha)
        t0 = time.perf_counter()
        initial_loss[s] = steps[s](tok)
        compile_s[s] = time.perf_counter() - t0
        print(f"[peers] {s}: built, first step {compile_s[s]:.1f} s, loss {initial_loss[s]:.6f}",
              file=sys.stderr, flush=True)
    del params_np
    gc.collect()
    times = {s: [] for s in setups}
    for r in range(args.reps + 1):  # round 0 is warm-up
        for s in setups:
            t0 = time.perf_counter()
            losses[s] = steps[s](tok)
            if r:
                times[s].append(time.perf_counter() - t0)
        if r:
            print(f"[peers] round {r}/{args.reps}: " + ", ".join(f"{s} {times[s][-1]:.3f}s" for s in setups),
                  file=sys.stderr, flush=True)
    return {"times": times, "compile_s": compile_s, "initial_loss": initial_loss, "last_loss": losses}


def rss_one(setup: str, args) -> dict:
    """Peak RSS of one setup alone: the whole process, and three steady-state steps."""
    from lora_jax.runner.telemetry import peak_rss_mb, release_freed_memory, reset_peak_rss

    cfg = model_config(args.tiny)
    params_np = weights(cfg)
    tok = tokens(cfg, args.batch, args.seq)
    step = build(setup, params_np, cfg, rank=args.rank, alpha=args.alpha)
    del params_np
    release_freed_memory()
    step(tok)
    whole = peak_rss_mb()
    reset_peak_rss()  # hands freed memory back first
    for _ in range(3):
        step(tok)
    steady = peak_rss_mb()
    return {"peak_rss_mb": max(whole, steady), "step_peak_rss_mb": steady}


def _child(flag: list[str], args, **env_extra: str) -> dict:
    cmd = [sys.executable, __file__, *flag, "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--batch", str(args.batch), "--seq", str(args.seq), "--reps", str(args.reps)]
    cmd += ["--tiny"] if args.tiny else []
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"peers: {' '.join(flag)} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# report


def summarize(groups: list[tuple[list[str], dict]], rss: dict, args) -> dict:
    step_s, compile_s, initial_loss = {}, {}, {}
    for setups, res in groups:
        for s in setups:
            step_s.setdefault(s, statistics.median(res["times"][s]))  # first group that ran it
            compile_s.setdefault(s, res["compile_s"][s])
            initial_loss.setdefault(s, res["initial_loss"][s])
    ratios, met = {}, {}
    for name, (num, den, target) in RATIOS.items():
        for setups, res in groups:
            if num in setups and den in setups:
                t = res["times"]
                ratios[name] = round(statistics.median(a / b for a, b in zip(t[num], t[den])), 4)
                if target is not None:
                    met[name] = ratios[name] <= target
                break
    fp32 = [s for s in step_s if s in ("ours_full", "ours_lora", "peft_lora", "qwix_lora", "nnx_lora")]
    quantized = [s for s in step_s if s.endswith("_qlora")]
    spread = lambda xs: max(initial_loss[s] for s in xs) - min(initial_loss[s] for s in xs) if xs else None
    out = {
        "shape": "tiny" if args.tiny else "smollm2-135m",
        "batch": args.batch, "seq": args.seq, "rank": args.rank, "alpha": args.alpha, "reps": args.reps,
        "step_s": {s: round(v, 4) for s, v in step_s.items()},
        "tokens_per_s": {s: round(args.batch * args.seq / v, 1) for s, v in step_s.items()},
        "compile_s": {s: round(v, 2) for s, v in compile_s.items()},
        "initial_loss": {s: round(v, 7) for s, v in initial_loss.items()},
        "initial_loss_spread_fp32": spread(fp32),
        "initial_loss_spread_qlora": spread(quantized),
        **ratios,
        "targets_met": met,
    }
    if rss:
        out["peak_rss_mb"] = {s: round(v["peak_rss_mb"], 1) for s, v in rss.items()}
        out["step_peak_rss_mb"] = {s: round(v["step_peak_rss_mb"], 1) for s, v in rss.items()}
        out["rss_allocator"] = {s: v.get("allocator", "lora_jax") for s, v in rss.items()}
        num, den, target = RSS_TARGET
        if num in rss and den in rss:
            for key in ("step_peak_rss", "peak_rss"):
                r = rss[num][f"{key}_mb"] / rss[den][f"{key}_mb"]
                out[f"ours_qlora_over_peft_qlora_{key}"] = round(r, 4)
            met["ours_qlora_over_peft_qlora_step_peak_rss"] = out["ours_qlora_over_peft_qlora_step_peak_rss"] <= target
    out["versions"] = describe()
    out["peer_settings"] = peer_settings(step_s)
    return out


def peer_settings(setups) -> dict:
    """What each peer ran with (attention, optimizer, quantization details), from its builder."""
    out = {}
    for s in setups:
        if s.startswith("peft_"):
            import peers_torch

            out[s] = peers_torch.describe(s.removesuffix("_bf16"))
        elif not s.startswith("ours_"):
            import peers_nnx

            out[s] = peers_nnx.describe(s)
    return out


def markdown(res: dict) -> str:
    """The README table: one row per setup, then the ratios."""
    lines = [
        f"Train step, {res['shape']} shape, batch {res['batch']} x {res['seq']}, rank {res['rank']} "
        f"(alpha {res['alpha']}) on all seven projections, AdamW, median of {res['reps']} interleaved steps.",
        "",
        "| setup | s/step | tokens/s | first call s | initial loss | peak RSS MB, steps | peak RSS MB, process |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    mb = lambda key, s: "" if s not in res.get(key, {}) else f"{res[key][s]:.0f}"
    for s in SETUPS:
        if s not in res["step_s"]:
            continue
        lines.append(f"| {s} | {res['step_s'][s]:.3f} | {res['tokens_per_s'][s]:.0f} | {res['compile_s'][s]:.1f} | "
                     f"{res['initial_loss'][s]:.5f} | {mb('step_peak_rss_mb', s)} | {mb('peak_rss_mb', s)} |")
    lines += ["", "| ratio | value | target |", "| --- | --- | --- |"]
    targets = {k: t for k, (_, _, t) in RATIOS.items()}
    targets |= {"ours_qlora_over_peft_qlora_step_peak_rss": RSS_TARGET[2], "ours_qlora_over_peft_qlora_peak_rss": None}
    for k, t in targets.items():
        if k in res:
            mark = "" if t is None else f"<= {t} ({'met' if res['targets_met'][k] else 'not met'})"
            lines.append(f"| {k} | {res[k]:.3f} | {mark} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model shape, for a smoke run")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10, help="timed rounds after one warm-up round")
    ap.add_argument("--setups", nargs="+", choices=SETUPS, help="only the groups and RSS runs with these setups")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--group", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--rss-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cli.process_settings()  # before the first JAX or PyTorch computation; LORA_JAX_MALLOC=system keeps the system's
    if args.group:
        print(json.dumps(time_group(args.group, args)))
        return {}
    if args.rss_one:
        print(json.dumps(rss_one(args.rss_one, args)))
        return {}

    chosen = set(args.setups or SETUPS)
    groups = [[s for s in g if s in chosen] for g in GROUPS]
    groups = [g for g in groups if g]
    results = []
    for g in groups:
        print(f"[peers] timing {', '.join(g)}", file=sys.stderr, flush=True)
        results.append((g, _child(["--group", *g], args)))
    rss = {}
    if not args.no_rss:
        for s in SETUPS:
            if s in chosen and not s.endswith("_bf16"):
                # A peer's memory is measured with the system allocator's defaults, as it
                # runs without lora-jax (whose command keeps freed memory mapped, see hostmem).
                malloc = "lora_jax" if s.startswith("ours_") else "system"
                print(f"[peers] peak RSS of {s} ({malloc} allocator settings)", file=sys.stderr, flush=True)
                rss[s] = _child(["--rss-one", s], args, **({} if malloc == "lora_jax" else {hostmem.ENV: "system"}))
                rss[s]["allocator"] = malloc
    res = summarize(results, rss, args)
    res["command"] = "python experiments/benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(res, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
