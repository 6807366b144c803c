"""The ``lora-jax`` command.

    lora-jax sweep CONFIG [--set key=value ...] [--quiet]   run (or resume) every run of a sweep
                     [--ray ADDRESS]                          ... as tasks on a Ray cluster
    lora-jax train CONFIG [--set ...]                        one run (the config without its sweep)
    lora-jax plan CONFIG [--set ...] [--audit]               counts, bytes and XLA cost per run, no training
    lora-jax eval CONFIG [--adapter DIR]                     evaluate the base (or an adapter) on the task
    lora-jax generate --model NAME --prompt TEXT [--adapter DIR[:W]] ...
    lora-jax export --gguf ADAPTER_DIR --model NAME --out FILE  an adapter as a llama.cpp adapter GGUF
    lora-jax plot RUNS_DIR                                   figures from stored results only
    lora-jax models                                          the embedded models and whether installed

Heavy modules load inside each subcommand, so ``plot`` never imports JAX.
Process-level choices belong here, not to ``import lora_jax``: before any
subcommand runs, :func:`process_settings` applies the host allocator settings
of :mod:`lora_jax.hostmem` (``LORA_JAX_MALLOC=system`` keeps the system's).
Errors in the user's input (:class:`lora_jax.errors.LoraJaxError`, and OS
errors on the paths it names, explained by :func:`explain_os_error`) print as
one paragraph with exit code 2; a sweep whose runs all ran but some failed
(a loss that became NaN) exits 1 naming them; Ctrl-C says how to resume and
exits with 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from pathlib import Path

from lora_jax import hostmem
from lora_jax.errors import LoraJaxError


def process_settings() -> bool:
    """Apply the command's process-wide settings; call before the first JAX computation.

    The host allocator keeps XLA:CPU's per-step scratch buffer mapped between
    steps (:func:`lora_jax.hostmem.configure`; measured in
    ``experiments/benchmarks/train_step.py`` in both loop styles). Returns
    whether those settings are in effect.
    """
    return hostmem.configure()


# errno -> what it means for a path the user gave, and the fix (``{where}`` names the options that set it).
_OS_ERRORS = {
    errno.EISDIR: "is a folder where a file is expected; give the file itself",
    errno.ENOTDIR: "a part of this path is a file where a folder is expected; {where}",
    errno.EEXIST: "a file is in the way where a folder is needed; remove or rename it, or {where}",
    errno.EACCES: "permission denied; {where}, or fix the folder's permissions",
    errno.EPERM: "operation not permitted; {where}, or fix the folder's permissions",
    errno.EROFS: "is on a read-only file system; {where}",
    errno.ENOSPC: "no space left on the device; free some space or {where}",
    errno.ENOENT: "no such file or folder; check the path (relative paths start from the current folder)",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter one",
}
_WHERE = {
    "sweep": "choose another --output-dir (or output_dir in the config)",
    "train": "choose another --output-dir or --run-name (or output_dir in the config)",
    "plot": "copy the sweep folder somewhere writable and plot it there",
}


def explain_os_error(e: OSError, command: str) -> str:
    """One paragraph for an OS error on a user's path: the path, what is wrong, and the fix.

    Errors raised with a message of their own (no ``errno``) are returned as they are.

    Examples:
      >>> explain_os_error(IsADirectoryError(21, "Is a directory", "configs"), "sweep")
      'configs: is a folder where a file is expected; give the file itself'
      >>> explain_os_error(FileNotFoundError("adapter: no such adapter folder"), "eval")
      'adapter: no such adapter folder'
    """
    what = _OS_ERRORS.get(e.errno) if e.errno is not None else None
    if what is None:
        return str(e)
    where = _WHERE.get(command, "choose another path")
    path = e.filename if e.filename is not None else "a path"
    return f"{path}: {what.format(where=where)}"


def check_adapter_folder(path: str, option: str = "--adapter") -> None:
    """Refuse an adapter path that is missing or not a folder, before any model is loaded.

    Raises:
      FileNotFoundError: with the option named and what a folder must hold.
    """
    from lora_jax.io import adapters, peft

    p = Path(path)
    holds = f"the folder holding {adapters.ADAPTER_CONFIG} (lora-jax) or {peft.PEFT_CONFIG} (PEFT)"
    if p.is_file():
        raise FileNotFoundError(f"{option} {path}: is a file; give {holds}")
    if not p.is_dir():
        raise FileNotFoundError(f"{option} {path}: no such folder; give {holds}")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lora.rank=16 (repeatable)")
    g = p.add_argument_group("several processes (see lora_jax.distributed; or LORA_JAX_COORDINATOR, ...)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", help="how many processes run this command")
    g.add_argument("--process-id", help="this process, 0 .. num-processes - 1")


def cmd_sweep(a) -> int:
    from lora_jax.runner import sweep

    out = sweep.run_sweep(a.config, a.overrides, quiet=a.quiet, output_dir=a.output_dir, ray=a.ray, fused=a.fused)
    print(f"results: {out / 'results.csv'}\nfigures: {out / 'figures'}")
    failed = sweep.failed_runs(out)
    if failed:
        # Every other run finished and is recorded; a script running sweeps still sees that some did not.
        shown = "; ".join(f"{name}: {reason}" for name, reason in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        print(f"lora-jax sweep: {len(failed)} run(s) failed: {shown}{more}. Their reasons are in results.csv; "
              "fix the cause and run the same command again (finished runs are kept).", file=sys.stderr)
        return 1
    return 0


def cmd_train(a) -> int:
    from pathlib import Path

    from lora_jax import config
    from lora_jax.io.files import locked
    from lora_jax.io.names import path_name
    from lora_jax.runner import build, sweep

    cfg = config.load_config(a.config, a.overrides)
    name = path_name(a.run_name or "run", "--run-name")
    build.validate_runs([(name, cfg)])
    sweep_dir = Path(a.output_dir or cfg.output_dir) / cfg.name
    with locked(sweep_dir, "lora-jax train"):
        s = sweep.run_one(name, cfg, sweep_dir / name, quiet=a.quiet)
    print(json.dumps({k: v for k, v in s.items() if k not in ("samples", "data", "versions")}, indent=1,
                     default=str))
    return 0 if s.get("status") == "finished" else 1


def cmd_plan(a) -> int:
    from lora_jax.runner import plan

    rows = plan.plan(a.config, a.overrides, compile_cost=not a.no_compile)
    print(plan.format_table(rows))
    if getattr(a, "audit", False):  # lora_jax.methods.audit: do the adapters train, does a swap recompile
        from lora_jax.methods import audit

        reports = audit.audit_config(a.config, a.overrides)
        print("\n".join(f"{name}: {r}" for name, r in reports))
        if not all(r.ok for _, r in reports):
            return 1
    from lora_jax.runner import fused

    fused.print_plan(a.config, a.overrides, compile_cost=not a.no_compile, force=a.fused)
    return 0


def cmd_eval(a) -> int:
    from lora_jax import config
    from lora_jax.runner import build, evaluate

    cfg = dataclasses.replace(config.load_config(a.config, a.overrides), method="base")
    if a.adapter:
        check_adapter_folder(a.adapter)
    build.validate_runs([("eval", cfg)])
    model = build.load_model(cfg.model)
    ctx = build.prepare(cfg, model)
    params = model.params
    if a.adapter:
        from lora_jax import adapters

        params = adapters.load(a.adapter, params)
    out = evaluate.evaluate(ctx, params)
    print(json.dumps(out, indent=1, default=str))
    return 0


def cmd_generate(a) -> int:
    from lora_jax import adapters, generate
    from lora_jax.models import registry

    specs = [adapters.parse_adapter_spec(s) for s in a.adapter]
    for folder, _ in specs:
        check_adapter_folder(folder)
    params, cfg, tok = registry.load_model(a.model, dequantize=not a.quantized)
    prompts = a.prompt if a.raw else [[{"role": "user", "content": p}] for p in a.prompt]
    extra = {}
    if a.side_by_side:  # every prompt answered by each adapter, all in one batch
        from lora_jax import members

        params = members.side_by_side(params, specs)
        extra["adapter_index"] = [k for k in range(len(specs)) for _ in prompts]
        prompts = prompts * len(specs)
    elif specs:
        params = adapters.combine_adapters(params, specs)
    import jax

    texts = generate.generate_text(params, cfg, tok, prompts, chat=not a.raw, max_new_tokens=a.max_new_tokens,
                                   temperature=a.temperature, top_p=a.top_p, key=jax.random.key(a.seed), **extra)
    for i, t in enumerate(texts):
        if a.side_by_side and i % len(a.prompt) == 0:
            print(f"== {specs[i // len(a.prompt)][0]}")
        print(t)
    return 0


def cmd_export(a) -> int:
    from lora_jax import adapters
    from lora_jax.errors import ConfigError
    from lora_jax.io import gguf_adapter
    from lora_jax.models import load_gguf, registry

    check_adapter_folder(a.gguf, "--gguf")
    out = Path(a.out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the path of the .gguf file to write")
    kind, path = registry.resolve(a.model)
    if kind != "gguf":
        raise ConfigError(f"--model {a.model!r} is not a GGUF model: llama.cpp applies an adapter to a GGUF base, "
                          "and the adapter's tensor names follow that file; pass the base .gguf file (or its "
                          "registered name)")
    arch = str(load_gguf.read_metadata(path).get("general.architecture", "llama"))
    params, cfg, _ = registry.load_model(a.model, tokenizer=False)  # quantized leaves stay quantized: shapes only
    adapted = adapters.load(a.gguf, params)
    gguf_adapter.export_gguf_adapter(adapted, cfg, out, architecture=arch, alpha=a.alpha)
    print(out)
    return 0


def cmd_plot(a) -> int:
    from lora_jax import plots

    for p in plots.make_all(a.runs_dir):
        print(p)
    return 0


def cmd_models(a) -> int:
    from lora_jax.models import registry

    print(json.dumps(registry.list_models(), indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lora-jax", description="LoRA / QLoRA experiments in JAX")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="run or resume every run of a config's sweep")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")
    p.add_argument("--output-dir", help="where runs go (default: the config's output_dir)")
    p.add_argument("--ray", metavar="ADDRESS", help="run each run as a Ray task: a cluster address (host:port), "
                   "'auto' for the running cluster, 'local' to start one here; the output dir must be shared")
    p.add_argument("--fused", action="store_true", help="train runs that can share a program as one (sweep.fused)")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("train", help="train one run: the config without its sweep block")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--output-dir")
    p.add_argument("--run-name", help="folder name of the run (default 'run'; slugged, kept inside the output dir)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("plan", help="parameter counts, base bytes, XLA FLOPs and memory per run; trains nothing")
    _add_config_args(p)
    p.add_argument("--no-compile", action="store_true", help="skip XLA's compiled cost and memory analysis")
    p.add_argument("--fused", action="store_true", help="also show the fused groups (as sweep.fused: true does)")
    p.add_argument("--audit", action="store_true", help="check on one batch that every adapter trains (A, B, ...) "
                   "and that swapping adapters does not recompile; exit 1 on a problem")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("eval", help="evaluate the base model, or base + adapter, on the config's task")
    _add_config_args(p)
    p.add_argument("--adapter", help="adapter folder (ours or PEFT format)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="generate text from a model (+ adapters)")
    p.add_argument("--model", default="smollm2-135m", help="registered name or local path")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable: a batch)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:WEIGHT]",
                   help="adapter folder, optionally with a weight; repeat to combine adapters linearly")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="prompt is raw text, not a chat message")
    p.add_argument("--quantized", action="store_true", help="keep GGUF blocks quantized (int4/int8 leaves)")
    p.add_argument("--side-by-side", action="store_true",
                   help="answer every prompt with each --adapter on its own, all in one batch")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="write an adapter folder in another format (llama.cpp's adapter GGUF)")
    p.add_argument("--gguf", required=True, metavar="ADAPTER_DIR",
                   help="the adapter folder (ours or PEFT) to write as a llama.cpp adapter GGUF")
    p.add_argument("--model", required=True, help="the base GGUF the adapter was trained on: registered name or path")
    p.add_argument("--out", required=True, help="the .gguf file to write (only this file is written)")
    p.add_argument("--alpha", type=float, help="the file's adapter.lora.alpha (default: the largest rank; each B "
                   "is rescaled so llama.cpp's alpha/rank gives the trained scale)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("plot", help="regenerate the figures of a sweep from its stored files")
    p.add_argument("runs_dir", help="runs/<sweep>")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("models", help="list the embedded models")
    p.set_defaults(fn=cmd_models)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "plot":
        process_settings()
    try:
        if hasattr(args, "config"):  # the config commands may run as several processes
            from lora_jax import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return args.fn(args)
    except OSError as e:
        # Files and folders the user named: the path, what is wrong with it and the fix; no traceback.
        print(f"lora-jax {args.command}: error: {explain_os_error(e, args.command)}", file=sys.stderr)
        return 2
    except (LoraJaxError, ModuleNotFoundError) as e:
        # Input errors (configs, files, missing extras): one clear paragraph, no traceback.
        print(f"lora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # The training loop stops at a step boundary and names the step it checkpointed.
        where = f" ({e})" if str(e) else ""
        print(f"lora-jax {args.command}: interrupted{where}. Finished runs and the last checkpoint of the current "
              "run are kept; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
