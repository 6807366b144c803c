"""Every class of bad input gets one clear paragraph from the command: exit code, message, no traceback.

One table drives ``lora_jax.cli.main`` in-process: each row builds its input
(a config, a folder, an adapter, a results.csv, generation options), names the
exit code and a fragment of the message, and may check the files afterwards
(nothing written where the command stopped before any run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import pytest
from tiny_models import write_tiny_chat_gguf, write_yaml_config

from lora_jax import cli, lora
from lora_jax.io import adapters as io_adapters
from lora_jax.io import peft as io_peft
from lora_jax.models import registry


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model, adapters for it (ours and PEFT's) and a finished-looking sweep folder."""
    root = tmp_path_factory.mktemp("world")
    gguf = write_tiny_chat_gguf(root / "tiny.gguf")
    params, _, _ = registry.load_model(str(gguf), dequantize=True)
    adapted = lora.init(jax.random.key(0), params, [lora.LoraRule(pattern=r".*attn/q_proj/kernel", rank=2, alpha=4)])
    io_adapters.save_adapter(root / "adapter", adapted)
    io_peft.export_peft(root / "peft", adapted, base_model_name_or_path="tiny", model_kind="llama")
    return {"root": root, "gguf": gguf}


def write_config(path: Path, gguf: Path, **over) -> Path:
    cfg = {
        "name": "t",
        "method": "lora",
        "model": {"name": str(gguf)},
        "task": {"name": "python-docs-lm", "max_len": 64, "n_train": 16, "n_val": 4},
        "lora": {"rank": 2, "alpha": 4},
        "train": {"steps": 1, "batch_size": 4, "log_every": 1, "eval_batches": 1},
    }
    return write_yaml_config(path, cfg, over)


@dataclass
class Case:
    """One bad input: ``build(tmp, world) -> argv``, the exit code, a message fragment, a check of the files."""

    build: Callable[[Path, dict], list[str]]
    code: int
    fragment: str
    after: Callable[[Path], None] | None = None
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = field(default=None, repr=False)


def sweep(**over) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, w: ["sweep", str(write_config(tmp / "c.yaml", w["gguf"], **over)), "--quiet",
                           "--output-dir", str(tmp / "out")]


def nothing_written(tmp: Path) -> None:
    assert not (tmp / "out" / "t").exists(), "the command stopped before any run: no run folder, no summary"


def raw_config(data: bytes) -> Callable[[Path, dict], list[str]]:
    def build(tmp, w):
        (tmp / "c.yaml").write_bytes(data)
        return ["sweep", str(tmp / "c.yaml"), "--output-dir", str(tmp / "out")]

    return build


def output_in(make: Callable[[Path], Path]) -> Callable[[Path, dict], list[str]]:
    def build(tmp, w):
        return ["sweep", str(write_config(tmp / "c.yaml", w["gguf"])), "--quiet", "--output-dir", str(make(tmp))]

    return build


def a_file(tmp: Path) -> Path:
    (tmp / "taken").write_text("not a folder")
    return tmp / "taken"


def run_name_is_a_file(tmp, w):
    (tmp / "out" / "t").mkdir(parents=True)
    (tmp / "out" / "t" / "r").write_text("a file named like the run")
    return ["train", str(write_config(tmp / "c.yaml", w["gguf"])), "--quiet", "--output-dir", str(tmp / "out"),
            "--run-name", "r"]


def escaping_run_name(tmp, w):
    (tmp / "deep" / "er").mkdir(parents=True)
    return ["train", str(write_config(tmp / "c.yaml", w["gguf"])), "--quiet", "--output-dir",
            str(tmp / "deep" / "er" / "out"), "--run-name", "../../../x"]


def stayed_inside(tmp: Path) -> None:
    assert (tmp / "deep" / "er" / "out" / "t" / "x" / "summary.json").is_file()
    assert not (tmp / "x").exists() and not (tmp / "deep" / "x").exists() and not (tmp / "deep" / "er" / "x").exists()


def read_only(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """A read-only output folder: chmod where it binds; as root (where it does not) the OS's answer, patched in."""
    ro = tmp / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self.is_relative_to(ro) and self != ro:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def eval_with(adapter: Callable[[Path, dict], Path]) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, w: ["eval", str(write_config(tmp / "c.yaml", w["gguf"])), "--adapter", str(adapter(tmp, w))]


def edited(name: str, file: str, edit: Callable[[dict], None]) -> Callable[[Path, dict], Path]:
    def make(tmp, w):
        d = tmp / name
        d.mkdir()
        for f in (w["root"] / name).iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((d / file).read_text())
        edit(cfg)
        (d / file).write_text(json.dumps(cfg))
        return d

    return make


def scale_1e6(cfg: dict) -> None:
    for entry in cfg["adapters"].values():
        entry["scale"] = 1e6


def generate(*opts: str, adapter: str | None = None) -> Callable[[Path, dict], list[str]]:
    def build(tmp, w):
        extra = ["--adapter", str(tmp / adapter)] if adapter else []
        return ["generate", "--model", str(w["gguf"]), "--raw", *opts, *extra]

    return build


CSV = "run,method,rank,seed,status,val_loss\nbase,base,,0,finished,3.0\nlora_r1,lora,1,0,finished,2.5\n"


def plot(text: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp, w):
        (tmp / "s").mkdir()
        (tmp / "s" / "results.csv").write_text(text)
        return ["plot", str(tmp / "s")]

    return build


CASES = {
    # configs
    "config is a folder": Case(lambda tmp, w: ["sweep", str(tmp)], 2, "is a folder where a file is expected"),
    "config not UTF-8": Case(raw_config(b"name: t\nmethod: lora\nseed: \xff\n"), 2, "not UTF-8"),
    "unknown keys": Case(sweep(**{"lora.rnak": 4}), 2, "did you mean", nothing_written),
    "rank too large": Case(sweep(**{"lora.rank": 64}), 2, "lora.rank=64 is too large", nothing_written),
    "targets match nothing": Case(sweep(**{"lora.targets": "nothing/.*"}), 2, "matches no parameter", nothing_written),
    "missing data file": Case(sweep(**{"task.name": "text", "task.path": "/nonexistent/d.txt"}), 2, "is not a file",
                              nothing_written),
    "data path is a folder": Case(sweep(**{"task.name": "text", "task.path": "/"}), 2, "is a folder, not a file",
                                  nothing_written),
    "max_len too small": Case(sweep(**{"task.name": "code-summarization", "task.max_len": 32}), 2,
                              "task.max_len=32 is too small for task 'code-summarization'", nothing_written),
    "batch larger than the data": Case(sweep(**{"task.n_train": 2}), 2, "batch_size=4 is larger than task.n_train=2",
                                       nothing_written),
    "block size does not divide": Case(sweep(method="qlora", **{"quant.block_size": 64}), 2,
                                       "quant.block_size=64 does not divide", nothing_written),
    # paths
    "run name leaves the folder": Case(escaping_run_name, 0, '"run": "x"', stayed_inside),
    "output dir is a file": Case(output_in(a_file), 2, "is a file where a folder is expected"),
    "output dir read-only": Case(output_in(lambda tmp: tmp / "ro" / "out"), 2, "permission denied", patch=read_only),
    "run name is a file": Case(run_name_is_a_file, 2, "a file is in the way where a folder is needed"),
    # adapters
    "adapter scale edited": Case(eval_with(edited("adapter", "lora_jax_adapter.json", scale_1e6)), 2,
                                 "scale 1e+06 disagrees with alpha"),
    "PEFT target_modules mismatch": Case(
        eval_with(edited("peft", "adapter_config.json", lambda c: c.update(target_modules=["v_proj"]))), 2,
        "target_modules=['v_proj'] does not select module 'model.layers.0.self_attn.q_proj'"),
    "eval, missing adapter": Case(eval_with(lambda tmp, w: tmp / "nope"), 2, "--adapter"),
    "eval, adapter is a file": Case(eval_with(lambda tmp, w: a_file(tmp)), 2, "is a file; give the folder holding"),
    "generate, missing adapter": Case(generate("--prompt", "hi", adapter="nope"), 2, "nope: no such folder"),
    # results.csv
    "results.csv empty": Case(plot(CSV.splitlines()[0] + "\n"), 2, "no runs listed"),
    "results.csv no header": Case(plot(""), 2, "the header lacks ['run', 'status']"),
    "results.csv ragged": Case(plot(CSV + "lora_r2,lora,2\n"), 2, "fewer cells than the header"),
    "results.csv duplicated": Case(plot(CSV + "lora_r1,lora,1,0,finished,2.4\n"), 2, "run 'lora_r1' is listed again"),
    "results.csv text in a number": Case(plot(CSV.replace(",2.5", ",low")), 2, "column 'val_loss' holds 'low'"),
    "results.csv run escapes": Case(plot(CSV.replace("lora_r1,", "../../x,")), 2, "has a path separator or '..'"),
    # generation
    "empty prompt": Case(generate("--prompt", "  "), 2, "empty"),
    "NaN temperature": Case(generate("--prompt", "hi", "--temperature", "nan"), 2, "temperature must be >= 0"),
    "negative temperature": Case(generate("--prompt", "hi", "--temperature", "-1"), 2, "temperature must be >= 0"),
    "top-p zero": Case(generate("--prompt", "hi", "--top-p", "0"), 2, "top_p must be in (0, 1]"),
    "top-p above one": Case(generate("--prompt", "hi", "--top-p", "1.5"), 2, "top_p must be in (0, 1]"),
    "max tokens zero": Case(generate("--prompt", "hi", "--max-new-tokens", "0"), 2, "max_new_tokens must be a"),
    "max tokens negative": Case(generate("--prompt", "hi", "--max-new-tokens", "-3"), 2, "max_new_tokens must be"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_paragraph(name, world, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    argv = case.build(tmp_path, world)
    if case.patch:
        case.patch(monkeypatch, tmp_path)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert case.fragment in (err if code else out), err or out
    assert "Traceback" not in err
    if code:
        assert err.startswith(f"lora-jax {argv[0]}: error: "), err
    if case.after:
        case.after(tmp_path)
