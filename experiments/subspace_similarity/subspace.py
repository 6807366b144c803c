"""Subspace similarity between the r=8 and r=64 adapters of one layer (LoRA paper, sec. 7.2, fig. 3).

Hu et al. (2021) write the update as ``dW = B A`` with ``A`` of shape (r, k)
(k = input dim) and compare the two adapters of one layer trained with r=8 and
r=64 through the right-singular vectors of ``A``:

    phi(A_8, A_64, i, j) = || U_8[:, :i]^T U_64[:, :j] ||_F^2 / min(i, j)   in [0, 1]

(their eq. 4), where ``U_r`` holds the right-singular vectors of ``A_r``,
i.e. an orthonormal basis of the *input* subspace that the adapter reads,
ordered by singular value. lora-jax stores ``A`` transposed, ``(d_in, r)``, so
the same vectors are the LEFT singular vectors of our ``A`` (``A = U S V^T``,
``U`` of shape (d_in, r)). For two independent random subspaces of dimensions
i and j in R^d, E||U_i^T U_j||_F^2 = i j / d, so the random baseline is
phi = max(i, j) / d (d = 576 here).

Besides the paper's measure (``A``), two more variants are computed:

* ``A_init``: the same phi between the two *initial* (random, kaiming) A
  factors, rebuilt from the run's seed exactly as the runner builds them --
  the empirical random baseline, including anything the shared seed does.
* ``dW``: the left singular vectors of the update ``dW = s A B`` (d_in, d_out):
  the input directions the learned update actually uses. This discards the
  part of a random ``A`` that ``B`` does not read, which dominates ``A`` after a
  short run.

Inputs: the adapters saved by the rank sweep of ``experiments/rank_plateau``
(``runs/rank_plateau/lora_r8/adapter`` and ``lora_r64/adapter``).

    python experiments/subspace_similarity/subspace.py \
        --runs experiments/rank_plateau/runs/rank_plateau

Writes next to this file: ``phi_selected_layers.csv`` (phi(i, j), i, j <= 8,
for the layers of ``--layers``), ``phi_summary.csv`` (per layer and projection:
phi(1,1), the mean of phi over i, j <= 8, and the fraction of the update's
energy in the top direction), and ``figures/subspace_similarity.{png,pdf}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent
PROJ = ("q_proj", "v_proj")


def left_basis(m: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column space of ``m`` (d_in, k), ordered by singular value."""
    u, _, _ = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    return u


def phi_matrix(u_small: np.ndarray, u_big: np.ndarray, imax: int, jmax: int) -> np.ndarray:
    """phi(i, j) for i = 1..imax, j = 1..jmax (eq. 4 of the LoRA paper)."""
    g = (u_small[:, :imax].T @ u_big[:, :jmax]) ** 2  # (imax, jmax)
    cum = np.cumsum(np.cumsum(g, axis=0), axis=1)  # ||U_i^T U_j||_F^2
    i = np.arange(1, imax + 1)[:, None]
    j = np.arange(1, jmax + 1)[None, :]
    return cum / np.minimum(i, j)


def load_factors(adapter_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    tensors = load_file(str(adapter_dir / "adapter.safetensors"))
    config = json.loads((adapter_dir / "lora_jax_adapter.json").read_text())
    return tensors, config["adapters"]


def initial_factors(params, rank: int, alpha: float, targets: str, seed: int) -> dict[str, np.ndarray]:
    """The runner's initial A factors (B = 0), rebuilt from the seed (lora_jax.runner.build.build_params)."""
    import jax

    from lora_jax import lora

    rules = [lora.LoraRule(pattern=targets, rank=rank, alpha=alpha)]
    p = lora.init(jax.random.fold_in(jax.random.key(seed), 1), params, rules)
    return {path: np.asarray(node.lora_a) for path, node in lora.nodes(p)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("experiments/rank_plateau/runs/rank_plateau"))
    ap.add_argument("--small", default="lora_r8")
    ap.add_argument("--big", default="lora_r64")
    ap.add_argument("--layers", default="0,7,15,22,29", help="layers written in full and drawn")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    t0 = time.time()
    shown = [int(x) for x in args.layers.split(",")]
    ts, cs = load_factors(args.runs / args.small / "adapter")
    tb, cb = load_factors(args.runs / args.big / "adapter")
    r_small = int(next(iter(cs.values()))["rank"])
    r_big = int(next(iter(cb.values()))["rank"])
    run_cfg = json.loads((args.runs / args.small / "summary.json").read_text())
    import yaml

    cfg_small = yaml.safe_load((args.runs / args.small / "config.yaml").read_text())
    cfg_big = yaml.safe_load((args.runs / args.big / "config.yaml").read_text())
    from lora_jax.models import registry

    params, _, _ = registry.load_model("smollm2-135m", dequantize=True)
    init_small, init_big = (initial_factors(params, r, c["lora"]["alpha"], c["lora"]["targets"], c["seed"])
                            for r, c in ((r_small, cfg_small), (r_big, cfg_big)))

    paths = sorted(cs, key=lambda p: (int(p.split("/")[1]), p))
    d_in = None
    full_rows, summary_rows, heat = [], [], {}
    for path in paths:
        layer, proj = int(path.split("/")[1]), path.split("/")[3]
        if proj not in PROJ:
            continue
        a8, b8 = ts[f"{path}/lora_a"], ts[f"{path}/lora_b"]
        a64, b64 = tb[f"{path}/lora_a"], tb[f"{path}/lora_b"]
        d_in = a8.shape[0]
        s8, s64 = float(cs[path]["scale"]), float(cb[path]["scale"])
        i8, i64 = init_small[path], init_big[path]
        variants = {
            "A": (left_basis(a8), left_basis(a64)),
            "A_init": (left_basis(i8), left_basis(i64)),
            "dW": (left_basis(s8 * a8 @ b8)[:, :r_small], left_basis(s64 * a64 @ b64)[:, :r_big]),
        }
        # How far A moved from its init (relative Frobenius norm), and how concentrated dW is.
        moved8 = float(np.linalg.norm(a8 - i8) / np.linalg.norm(i8))
        moved64 = float(np.linalg.norm(a64 - i64) / np.linalg.norm(i64))
        sv8 = np.linalg.svd(s8 * a8 @ b8, compute_uv=False)
        sv64 = np.linalg.svd(s64 * a64 @ b64, compute_uv=False)
        row = {"layer": layer, "proj": proj, "A_rel_change_r8": round(moved8, 4), "A_rel_change_r64": round(moved64, 4),
               "dW_top1_energy_r8": round(float(sv8[0] ** 2 / np.sum(sv8**2)), 4),
               "dW_top1_energy_r64": round(float(sv64[0] ** 2 / np.sum(sv64**2)), 4),
               "dW_fro_r8": round(float(np.sqrt(np.sum(sv8**2))), 5),
               "dW_fro_r64": round(float(np.sqrt(np.sum(sv64**2))), 5)}
        for name, (u_s, u_b) in variants.items():
            phi = phi_matrix(u_s, u_b, r_small, r_big)
            row[f"phi11_{name}"] = round(float(phi[0, 0]), 4)
            row[f"phi_mean8x8_{name}"] = round(float(phi[:, :r_small].mean()), 4)
            row[f"phi88_{name}"] = round(float(phi[r_small - 1, r_small - 1]), 4)
            if layer in shown:
                heat[(name, proj, layer)] = phi
                for i in range(r_small):
                    for j in range(r_small):  # the CSV keeps j <= 8; the figure shows j <= 64
                        full_rows.append({"variant": name, "layer": layer, "proj": proj, "i": i + 1, "j": j + 1,
                                          "phi": round(float(phi[i, j]), 5),
                                          "random_baseline": round(max(i + 1, j + 1) / d_in, 5)})
        summary_rows.append(row)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("phi_selected_layers.csv", full_rows), ("phi_summary.csv", summary_rows)):
        with open(args.out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    plot(heat, shown, r_small, r_big, d_in, args.out / "figures")
    means = {}
    for proj in PROJ:
        for name in ("A", "A_init", "dW"):
            sel = [r for r in summary_rows if r["proj"] == proj]
            means[f"{proj}/{name}"] = {
                "phi11_mean": round(float(np.mean([r[f"phi11_{name}"] for r in sel])), 4),
                "phi_mean8x8_mean": round(float(np.mean([r[f"phi_mean8x8_{name}"] for r in sel])), 4),
            }
    print(json.dumps({"d_in": d_in, "r_small": r_small, "r_big": r_big, "n_layers": len(summary_rows) // 2,
                      "random_phi11": round(1 / d_in, 5), "random_mean8x8": round(float(np.mean(
                          [max(i, j) / d_in for i in range(1, 9) for j in range(1, 9)])), 5),
                      "means_over_layers": means, "run_small_status": run_cfg.get("status"),
                      "seconds": round(time.time() - t0, 1)}, indent=1))
    return 0


def plot(heat, layers, r_small, r_big, d_in, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rows: (variant, proj); columns: layers. i = 1..8 (rows of each map), j = 1..64 (columns).
    combos = [(v, p) for v in ("A", "dW", "A_init") for p in PROJ]
    fig, axes = plt.subplots(len(combos), len(layers), figsize=(2.6 * len(layers), 1.25 * len(combos) + 0.6),
                             squeeze=False)
    im = None
    for r, (v, p) in enumerate(combos):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            phi = heat.get((v, p, layer))
            if phi is None:
                ax.axis("off")
                continue
            im = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                           extent=(0.5, r_big + 0.5, r_small + 0.5, 0.5))
            ax.set_yticks([1, 4, 8] if r_small >= 8 else [1, r_small])
            ax.set_xticks([1, 8, 16, 32, 64] if r_big >= 64 else [1, r_big])
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
            if c == 0:
                label = {"A": "A (paper)", "dW": "dW = sAB", "A_init": "A at init"}[v]
                ax.set_ylabel(f"{label}\n{p}\ni (r=8)", fontsize=7)
            if r == len(combos) - 1:
                ax.set_xlabel("j (r=64)", fontsize=7)
    fig.suptitle(f"phi(A_r8, A_r64, i, j) = ||U_i^T U_j||_F^2 / min(i,j); random baseline max(i,j)/{d_in}",
                 fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="phi")
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"subspace_similarity.{ext}", dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
