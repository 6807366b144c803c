"""rsLoRA (Kalajdzievski, 2023): the gradient of B at init and the first update vs rank, alpha/r vs alpha/sqrt(r).

SmolLM2-135M-Instruct's real weights (fp32, from the GGUF), LoRA on the q, o,
gate, up and down projections of every third layer (0, 3, ..., 27: 50 matrices;
k and v are left out because their d_out = 192 caps the rank below 256), alpha = 8,
ranks 1..256, one real batch of 4 x 128 tokens of the Python docs' training windows
per seed (the seed also draws A). At init B = 0, so the adapted model is the base
model and, for every matrix with base-weight gradient ``G = dL/dW`` (d_in, d_out)::

    dL/dB = s * A^T G          (exact; dL/dA = s * G B^T = 0)
    first Adam step:  dB = -lr * g / (|g| + eps)       (bias-corrected m / sqrt(v) of step 1)
    first SGD step:   dB = -g  (per unit learning rate)
    update of the weight:  dW = s * A @ dB

The script computes ``G`` once per seed with one backward pass of the base model,
then, for each rank and scaling, draws A with ``lora_jax.lora.init`` (the
library's kaiming-uniform init and its scale ``alpha/r`` or ``alpha/sqrt(r)``)
and records per matrix ``||dL/dB||_F``, ``||dW||_F`` of the first Adam and SGD
step, and the first-order loss change ``<G, dW>`` (no forward pass after the step:
the machine's budget). For seed 0 at the settings in ``CONFIG["checks"]`` the
same quantities come from the library's own train step
(``lora_jax.train.make_train_step`` with ``optax.adam``) and are compared:
``check.json`` holds the largest relative difference.

    python experiments/rslora_gradient_scale/rslora.py      # one CPU thread, see README for the time
    python experiments/rslora_gradient_scale/rslora.py --plot-only       # the figure from runs.csv

Writes next to this file: ``run.json`` (commit, config and its hash, written
first), ``per_matrix.csv``, ``runs.csv`` (per seed, scaling, rank),
``summary.csv`` (mean and std over seeds), ``check.json`` and
``figures/rslora.{png,pdf}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import runinfo  # noqa: E402

runinfo.one_thread()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

LAYERS = "0|3|6|9|12|15|18|21|24|27"  # every third layer: the budget of a shared 2-core machine
TARGETS = rf"layers/({LAYERS})/(attn/(q|o)_proj|mlp/(gate|up|down)_proj)/kernel"
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SCALINGS = {"alpha/r": False, "alpha/sqrt(r)": True}
CONFIG = {"model": "smollm2-135m", "task": "python-docs-lm", "split": "train", "targets": TARGETS, "alpha": 8.0,
          "ranks": list(RANKS), "scalings": list(SCALINGS), "seeds": [0, 1, 2], "batch_size": 4, "seq_len": 128,
          "adam_lr": 1e-3, "adam_eps": 1e-8, "init": "kaiming", "checks": [["alpha/sqrt(r)", 16]]}
RUN_COLS = ("seed", "scaling", "rank", "scale", "grad_b_norm", "adam_dw_norm", "sgd_dw_norm", "adam_dloss_linear",
            "sgd_dloss_linear", "loss0")
MEASURES = RUN_COLS[4:9]


def base_gradients(params, cfg, batch):
    """``(loss, {path: dL/dW})`` of the base model for the targeted kernels (one backward pass)."""
    import jax

    from lora_jax import paths
    from lora_jax.models import llama

    t, f = paths.split(params, lambda p, x: re.fullmatch(TARGETS, p) is not None)
    loss, g = jax.jit(jax.value_and_grad(lambda t, f, b: llama.loss(paths.combine(t, f), b, cfg)[0]))(t, f, batch)
    return float(loss), dict(paths.leaves_with_paths(g))


def first_update_fn():
    import jax
    import jax.numpy as jnp

    lr, eps = CONFIG["adam_lr"], CONFIG["adam_eps"]

    @jax.jit
    def first_update(a, g, s):
        gb = s * (a.T @ g)  # dL/dB at B = 0
        dw_adam = s * (a @ (-lr * gb / (jnp.abs(gb) + eps)))
        dw_sgd = s * (a @ -gb)
        return (jnp.linalg.norm(gb), jnp.linalg.norm(dw_adam), jnp.linalg.norm(dw_sgd), jnp.vdot(g, dw_adam),
                jnp.vdot(g, dw_sgd), dw_adam)

    return first_update


def library_check(params, cfg, batch, rank: int, rslora: bool, seed: int, expect: dict) -> dict:
    """One step of lora_jax's own train step (optax.adam): its grad norm and dW against the closed form above."""
    import jax
    import jax.numpy as jnp
    import optax

    from lora_jax import lora, train
    from lora_jax.models import llama

    rule = lora.LoraRule(pattern=TARGETS, rank=rank, alpha=CONFIG["alpha"], rslora=rslora)
    adapted = lora.init(jax.random.key(seed), params, [rule])
    tx = optax.adam(CONFIG["adam_lr"], eps=CONFIG["adam_eps"])
    step = train.make_train_step(lambda p, b: llama.loss(p, b, cfg), tx, donate=False)
    state, metrics = step(train.init_state(adapted, tx, jax.random.key(0)), batch)
    worst = 0.0
    for path, node in lora.nodes(state.params):
        dw = node.scale * (node.lora_a @ node.lora_b)
        ref = expect["dw"][path]
        worst = max(worst, float(jnp.linalg.norm(dw - ref) / jnp.linalg.norm(ref)))
    g_lib = float(metrics["grad_norm"])
    return {"rank": rank, "scaling": "alpha/sqrt(r)" if rslora else "alpha/r", "seed": seed,
            "grad_norm_library": g_lib, "grad_b_norm_closed_form": expect["grad_b_norm"],
            "grad_rel_diff": abs(g_lib - expect["grad_b_norm"]) / expect["grad_b_norm"],
            "dw_adam_max_rel_diff": worst}


def run(out: Path) -> None:
    import jax

    from lora_jax import lora
    from lora_jax.data import batching, get_task
    from lora_jax.models import registry

    info = runinfo.start(out, CONFIG)
    t0 = time.time()
    params, cfg, tok = registry.load_model(CONFIG["model"], dequantize=True)
    windows = get_task(CONFIG["task"]).tokenize_split(CONFIG["split"], tok, max_len=CONFIG["seq_len"])
    data = batching.pad_examples(windows, CONFIG["seq_len"])
    first_update = first_update_fn()
    per_matrix, runs, checks = [], [], []
    for seed in CONFIG["seeds"]:
        batch = batching.batch_at(data, 0, batch_size=CONFIG["batch_size"], seed=seed)
        loss0, grads = base_gradients(params, cfg, batch)
        for scaling, rslora in SCALINGS.items():
            for rank in RANKS:
                rule = lora.LoraRule(pattern=TARGETS, rank=rank, alpha=CONFIG["alpha"], rslora=rslora)
                nodes = lora.nodes(lora.init(jax.random.key(seed), params, [rule]))
                tot = dict.fromkeys(RUN_COLS[4:9], 0.0)
                dws = {}
                for path, node in nodes:
                    gb, dwa, dws_, lin_a, lin_s, dws[path] = first_update(node.lora_a, grads[path], node.scale)
                    vals = dict(zip(RUN_COLS[4:9], (float(gb), float(dwa), float(dws_), float(lin_a), float(lin_s))))
                    per_matrix.append({"seed": seed, "scaling": scaling, "rank": rank, "matrix": path,
                                       "scale": node.scale, **vals})
                    for k in ("grad_b_norm", "adam_dw_norm", "sgd_dw_norm"):
                        tot[k] += vals[k] ** 2
                    for k in ("adam_dloss_linear", "sgd_dloss_linear"):
                        tot[k] += vals[k]
                for k in ("grad_b_norm", "adam_dw_norm", "sgd_dw_norm"):
                    tot[k] = math.sqrt(tot[k])
                runs.append({"seed": seed, "scaling": scaling, "rank": rank, "scale": nodes[0][1].scale, **tot,
                             "loss0": loss0})
                if seed == 0 and [scaling, rank] in CONFIG["checks"]:
                    checks.append(library_check(params, cfg, batch, rank, rslora, seed,
                                                {"dw": dws, "grad_b_norm": tot["grad_b_norm"]}))
                print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in runs[-1].items()}),
                      file=sys.stderr, flush=True)
            del dws
    write_csv(out / "per_matrix.csv", per_matrix, ("seed", "scaling", "rank", "matrix", *RUN_COLS[3:9]))
    write_csv(out / "runs.csv", runs, RUN_COLS)
    write_csv(out / "summary.csv", summarize(runs), ("scaling", "rank", "n_seeds", *(
        f"{m}_{s}" for m in MEASURES for s in ("mean", "std"))))
    (out / "check.json").write_text(json.dumps(checks, indent=1) + "\n")
    runinfo.finish(out, info, wall_s=round(time.time() - t0, 1), n_runs=len(runs), n_matrix_rows=len(per_matrix))


def write_csv(path: Path, rows: list[dict], cols) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_runs(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: (v if k == "scaling" else float(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and sample std over seeds per (scaling, rank) of each of :data:`MEASURES`."""
    out = []
    for scaling in SCALINGS:
        for rank in RANKS:
            sel = [r for r in runs if r["scaling"] == scaling and int(r["rank"]) == rank]
            if not sel:
                continue
            row = {"scaling": scaling, "rank": rank, "n_seeds": len(sel)}
            for m in MEASURES:
                xs = [r[m] for r in sel]
                row[f"{m}_mean"] = statistics.fmean(xs)
                row[f"{m}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
            out.append(row)
    return out


def plot(runs: list[dict], out_dir: Path) -> None:
    """Four panels against rank, mean over seeds with a band of one std: ||dL/dB||, ||dW|| of Adam and SGD, <G, dW>."""
    from matplotlib.figure import Figure

    summary = summarize(runs)
    panels = (("grad_b_norm", "||dL/dB||_F at init (50 matrices)"),
              ("adam_dw_norm", "||dW||_F, first Adam step (lr 1e-3)"),
              ("sgd_dw_norm", "||dW||_F, first SGD step (per unit lr)"),
              ("adam_dloss_linear", "<G, dW>: first-order loss change, Adam"))
    fig = Figure(figsize=(16, 3.8), layout="constrained")
    axes = fig.subplots(1, 4)
    colors = {"alpha/r": "tab:red", "alpha/sqrt(r)": "tab:blue"}
    for ax, (m, title) in zip(axes, panels):
        for scaling, color in colors.items():
            rows = [r for r in summary if r["scaling"] == scaling]
            rk = [r["rank"] for r in rows]
            mu = [r[f"{m}_mean"] for r in rows]
            sd = [r[f"{m}_std"] for r in rows]
            ax.plot(rk, mu, "o-", color=color, label=f"scale {scaling} (mean of {rows[0]['n_seeds']} seeds)")
            ax.fill_between(rk, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], color=color,
                            alpha=0.25, lw=0, label=f"{scaling}: +-1 std")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(RANKS))
        ax.set_xticklabels([str(r) for r in RANKS])
        ax.set_xlabel("LoRA rank r")
        if m != "adam_dloss_linear":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[3].set_ylabel("nats/token (negative: the loss falls)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"rslora.{ext}", dpi=130)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from the stored runs.csv")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    if not args.plot_only:
        run(args.out)
    plot(read_runs(args.out / "runs.csv"), args.out / "figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
