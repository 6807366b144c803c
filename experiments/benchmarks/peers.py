"""Peer benchmark: one train step of lora-jax next to Hugging Face PEFT, qwix and flax.nnx LoRA.

Every framework trains the same Llama-shaped model (the SmolLM2-135M shape),
with the same weights (drawn once from one numpy seed and copied into each),
on the same token batch (4 x 128): rank 16 on all seven projections, alpha 32,
AdamW with fp32 state, 2 threads, no activation checkpointing. One step is
forward, backward and optimizer update.

    python experiments/benchmarks/peers.py                  # full run, JSON on stdout
    python experiments/benchmarks/peers.py --markdown results/peers.md
    python experiments/benchmarks/peers.py --tiny --reps 2 --rounds 1  # smoke run (tiny shape)

Setups:
  ours_full, ours_lora, ours_qlora  lora-jax (QLoRA: NF4 + double quantization, block 64)
  peft_lora, peft_qlora             PEFT on PyTorch CPU; QLoRA through bitsandbytes (NF4, double quant)
  qwix_lora, qwix_qlora             qwix LoraProvider on a flax.nnx version of the model (QLoRA: NF4)
  nnx_lora                          flax.nnx LoRALinear on the same nnx model
  *_bf16                            ours and PEFT, LoRA and QLoRA, with bfloat16 weights and compute

Clean processes: every setup runs alone in a fresh process, once per round
(``--rounds``; the order is reversed every other round so a drifting machine
favours nobody). A peer's process imports neither lora-jax nor (PyTorch) JAX:
the parent writes the weights as a Hugging Face folder once, and PEFT loads it.
Only our processes apply the ``lora-jax`` command's process settings
(:func:`lora_jax.cli.process_settings`, the host allocator of
:mod:`lora_jax.hostmem`), which library users get from
``lora_jax.hostmem.configure()``. In each process: the first call (compilation
included) is ``compile_s``, a warm-up of each loop (one step; a burst of up to
three dispatched ahead: the first burst grows the heap), then two loops users write:
``blocked`` (the loss copied to the host after every step) and ``pipelined``
(``--reps`` steps dispatched ahead, one wait at the end; PyTorch on CPU runs
eagerly, so there it only skips the per-step ``.item()``). Seconds are medians
over rounds; each ratio is the median of the per-round ratios. ``best`` ratios
compare each side's faster dtype (fp32 or bf16) in that round.

Peak RSS (``/proc/self/status`` VmHWM) in the same processes, after the timing:
the whole process (imports, the shared numpy weights, the framework's copy of
them, compilation, the steps) and the steady state (three steps, after freed
memory is handed back to the OS). Initial loss: the loss of the first step,
before any update; LoRA starts with B = 0, so every fp32 LoRA setup starts at
the base model's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ALL_SEVEN = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"  # as train_step.py
SETUPS = (
    "ours_full", "ours_lora", "ours_qlora", "peft_lora", "peft_qlora", "qwix_lora", "qwix_qlora", "nnx_lora",
    "ours_lora_bf16", "ours_qlora_bf16", "peft_lora_bf16", "peft_qlora_bf16",
)
STYLES = ("blocked", "pipelined")
# ratio name -> (numerator, denominator, target or None); a tuple side is "the faster of these, per round"
RATIOS = {
    "ours_lora_best_over_peft_lora_best": (("ours_lora", "ours_lora_bf16"), ("peft_lora", "peft_lora_bf16"), 0.8),
    "ours_qlora_best_over_peft_qlora_best": (
        ("ours_qlora", "ours_qlora_bf16"), ("peft_qlora", "peft_qlora_bf16"), 0.8),
    "ours_lora_over_peft_lora": ("ours_lora", "peft_lora", None),
    "ours_qlora_over_peft_qlora": ("ours_qlora", "peft_qlora", None),
    "ours_lora_over_qwix_lora": ("ours_lora", "qwix_lora", 0.9),
    "ours_qlora_over_qwix_qlora": ("ours_qlora", "qwix_qlora", 0.9),
    "ours_lora_over_nnx_lora": ("ours_lora", "nnx_lora", None),
    "ours_lora_over_ours_full": ("ours_lora", "ours_full", None),
    "ours_lora_bf16_over_peft_lora_bf16": ("ours_lora_bf16", "peft_lora_bf16", None),
    "ours_qlora_bf16_over_peft_qlora_bf16": ("ours_qlora_bf16", "peft_qlora_bf16", None),
}
RSS_TARGET = ("ours_qlora", "peft_qlora", 0.8)  # ours QLoRA peak RSS <= 0.8 x PEFT + bitsandbytes QLoRA


def model_config(tiny: bool):
    """The benchmark's model shape (as train_step.py)."""
    from train_step import model_config as shape

    return shape(tiny)


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

    name = setup.removesuffix("_bf16")
    dtype = jnp.bfloat16 if setup.endswith("_bf16") else jnp.float32
    params = jax.tree.map(lambda w: jnp.asarray(w, dtype), params_np)
    if name == "ours_qlora":
        rule = lj.QuantRule(pattern=ALL_SEVEN, format="nf4", block_size=64, double_quant=True, dtype=dtype)
        params = lj.quantize(params, [rule])
    if name == "ours_full":
        trainable = lj.paths.everything
    else:
        params = lj.lora.init(jax.random.key(1), params, [lj.LoraRule(pattern=ALL_SEVEN, rank=rank, alpha=alpha)])
        trainable = lj.paths.is_trainable_leaf
    tx = optax.adamw(lr)
    state = lj.train.init_state(params, tx, jax.random.key(2), trainable)
    del params
    train_step = lj.train.make_train_step(lambda p, b: llama.loss(p, b, cfg), tx)
    box = [state, None]

    def wait() -> float:
        return float(jax.block_until_ready(box)[1])

    def step(tok, block: bool = True) -> float | None:
        box[0], metrics = train_step(box[0], {"tokens": jnp.asarray(tok)})
        box[1] = metrics["loss"]
        return wait() if block else None

    step.wait = wait
    return step


def build(setup: str, params_np: dict, cfg, *, rank: int = 16, alpha: int = 32, lr: float = 1e-4, hf_dir=None):
    """``step(tokens, block=True) -> loss`` of one setup; ``step.wait()`` after ``block=False`` steps.

    PEFT setups load ``hf_dir`` (a Hugging Face folder of the same weights) when given, else
    export ``params_np`` to a temporary one.
    """
    if setup.startswith("ours_"):
        return build_ours(setup, params_np, cfg, rank=rank, alpha=alpha, lr=lr)
    if setup.startswith("peft_"):
        import peers_torch

        dtype = "bfloat16" if setup.endswith("_bf16") else "float32"
        kw = dict(rank=rank, alpha=alpha, lr=lr, threads=2, dtype=dtype)
        if hf_dir is not None:
            return peers_torch.build_from_hf(setup.removesuffix("_bf16"), hf_dir, **kw)
        return peers_torch.build(setup.removesuffix("_bf16"), params_np, cfg, **kw)
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


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Hand freed memory back to the OS, then reset VmHWM (Linux); the same for every framework."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def time_one(setup: str, args) -> dict:
    """Build one setup in this (fresh) process; time the blocked and the pipelined loop; peak RSS."""
    import numpy as np

    if setup.startswith("ours_"):
        from lora_jax import cli

        cli.process_settings()  # what the lora-jax command (and hostmem.configure()) gives our users
    work = Path(args.workdir)
    tok = np.load(work / "tokens.npy", allow_pickle=False)
    if setup.startswith("peft_"):  # no JAX, no lora-jax in a PyTorch peer's process
        step = build(setup, {}, None, rank=args.rank, alpha=args.alpha, hf_dir=str(work / "hf"))
    else:
        cfg = model_config(args.tiny)
        params_np = weights(cfg)
        step = build(setup, params_np, cfg, rank=args.rank, alpha=args.alpha)
        del params_np
    t0 = time.perf_counter()
    initial_loss = step(tok)
    compile_s = time.perf_counter() - t0
    step(tok)  # warm-up of both loops: the first burst of steps dispatched ahead grows the heap
    for _ in range(min(args.reps, 3)):
        step(tok, block=False)
    step.wait()
    blocked = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        loss = step(tok)
        blocked.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(args.reps):
        step(tok, block=False)
    last_loss = step.wait()
    pipelined = (time.perf_counter() - t0) / args.reps
    whole = _vm_hwm_mb()
    _reset_peak()
    for _ in range(3):
        step(tok)
    steady = _vm_hwm_mb()
    print(f"[peers] {setup}: first call {compile_s:.1f} s, blocked {statistics.median(blocked):.3f} s, "
          f"pipelined {pipelined:.3f} s, loss {initial_loss:.6f} -> {loss:.6f}", file=sys.stderr, flush=True)
    return {"compile_s": compile_s, "blocked": statistics.median(blocked), "pipelined": pipelined,
            "initial_loss": initial_loss, "last_loss": last_loss,
            "peak_rss_mb": max(whole, steady), "step_peak_rss_mb": steady,
            "process_imported": sorted(m for m in ("jax", "lora_jax", "torch") if m in sys.modules)}


def _child(setup: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", setup, "--workdir", args.workdir, "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--batch", str(args.batch), "--seq", str(args.seq), "--reps", str(args.reps)]
    cmd += ["--tiny"] if args.tiny else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"peers: {setup} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(workdir: Path, chosen: set[str], args) -> None:
    """Write the tokens (and, for PEFT, the weights as a Hugging Face folder) every child reads."""
    import numpy as np

    cfg = model_config(args.tiny)
    np.save(workdir / "tokens.npy", tokens(cfg, args.batch, args.seq), allow_pickle=False)
    if any(s.startswith("peft_") for s in chosen):
        from lora_jax.models.export_hf import export_merged_hf

        export_merged_hf(workdir / "hf", weights(cfg), cfg)


# ----------------------------------------------------------------------------
# report


def _side(res: dict, side, style: str) -> float | None:
    names = (side,) if isinstance(side, str) else side
    times = [res[s][style] for s in names if s in res]
    return min(times) if len(times) == len(names) else None


def summarize(rounds: list[dict], args) -> dict:
    setups = [s for s in SETUPS if s in rounds[0]]
    med = lambda s, key: statistics.median(r[s][key] for r in rounds)
    out = {
        "shape": "tiny" if args.tiny else "smollm2-135m",
        "batch": args.batch, "seq": args.seq, "rank": args.rank, "alpha": args.alpha, "reps": args.reps,
        "rounds": len(rounds),
        "step_s": {style: {s: round(med(s, style), 6) for s in setups} for style in STYLES},
        "step_s_range": {style: {s: [round(min(r[s][style] for r in rounds), 4),
                                     round(max(r[s][style] for r in rounds), 4)] for s in setups}
                         for style in STYLES},
        "compile_s": {s: round(med(s, "compile_s"), 2) for s in setups},
        "initial_loss": {s: round(rounds[0][s]["initial_loss"], 7) for s in setups},
        "peak_rss_mb": {s: round(med(s, "peak_rss_mb"), 1) for s in setups},
        "step_peak_rss_mb": {s: round(med(s, "step_peak_rss_mb"), 1) for s in setups},
        "process_imported": {s: rounds[0][s]["process_imported"] for s in setups},
    }
    out["tokens_per_s"] = {s: round(args.batch * args.seq / out["step_s"]["blocked"][s], 1) for s in setups}
    met = {}
    for name, (num, den, target) in RATIOS.items():
        for style in STYLES:
            per_round = [(_side(r, num, style), _side(r, den, style)) for r in rounds]
            if all(a is not None and b is not None for a, b in per_round):
                key = f"{name}_{style}"
                out[key] = round(statistics.median(a / b for a, b in per_round), 4)
                if target is not None:
                    met[key] = out[key] <= target
    fp32 = [s for s in setups if s in ("ours_full", "ours_lora", "peft_lora", "qwix_lora", "nnx_lora")]
    quantized = [s for s in setups if s.endswith("_qlora")]
    losses = out["initial_loss"]
    spread = lambda xs: max(losses[s] for s in xs) - min(losses[s] for s in xs) if xs else None
    out["initial_loss_spread_fp32"] = spread(fp32)
    out["initial_loss_spread_qlora"] = spread(quantized)
    num, den, target = RSS_TARGET
    if num in setups and den in setups:
        for key in ("step_peak_rss", "peak_rss"):
            out[f"ours_qlora_over_peft_qlora_{key}"] = round(out[f"{key}_mb"][num] / out[f"{key}_mb"][den], 4)
        met["ours_qlora_over_peft_qlora_step_peak_rss"] = out["ours_qlora_over_peft_qlora_step_peak_rss"] <= target
    out["targets_met"] = met
    out["versions"] = describe()
    out["peer_settings"] = peer_settings(setups)
    return out


def peer_settings(setups) -> dict:
    """What each peer ran with (attention, optimizer, quantization details), from its builder."""
    out = {}
    for s in setups:
        if s.startswith("peft_"):
            import peers_torch

            dtype = "bfloat16" if s.endswith("_bf16") else "float32"
            out[s] = peers_torch.describe(s.removesuffix("_bf16")) | {"dtype": dtype}
        elif not s.startswith("ours_"):
            import peers_nnx

            out[s] = peers_nnx.describe(s)
    return out


def markdown(res: dict) -> str:
    """The README table: one row per setup, then the ratios."""
    lines = [
        f"Train step, {res['shape']} shape, batch {res['batch']} x {res['seq']}, rank {res['rank']} "
        f"(alpha {res['alpha']}) on all seven projections, AdamW; each setup in its own process, "
        f"medians over {res['rounds']} rounds of {res['reps']} steps per loop.",
        "",
        "| setup | s/step, blocked | s/step, pipelined | tokens/s | first call s | initial loss "
        "| peak RSS MB, steps | peak RSS MB, process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in SETUPS:
        if s not in res["step_s"]["blocked"]:
            continue
        lines.append(
            f"| {s} | {res['step_s']['blocked'][s]:.3f} | {res['step_s']['pipelined'][s]:.3f} | "
            f"{res['tokens_per_s'][s]:.0f} | {res['compile_s'][s]:.1f} | {res['initial_loss'][s]:.5f} | "
            f"{res['step_peak_rss_mb'][s]:.0f} | {res['peak_rss_mb'][s]:.0f} |")
    lines += ["", "| ratio | value | target |", "| --- | --- | --- |"]
    targets = {f"{k}_{style}": t for k, (_, _, t) in RATIOS.items() for style in STYLES}
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
    ap.add_argument("--reps", type=int, default=5, help="timed steps per loop style, after a warm-up of each")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per setup")
    ap.add_argument("--setups", nargs="+", choices=SETUPS, help="only these setups")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--one", choices=SETUPS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(time_one(args.one, args)))
        return {}
    chosen = [s for s in SETUPS if s in set(args.setups or SETUPS)]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="peers-") as work:
        args.workdir = work
        prepare(Path(work), set(chosen), args)
        for r in range(args.rounds):
            order = chosen if r % 2 == 0 else chosen[::-1]
            print(f"[peers] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            rounds.append({s: _child(s, args) for s in order})
    res = summarize(rounds, args)
    res["command"] = "python experiments/benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(res, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
