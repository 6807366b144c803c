"""Tests for lora_jax.config: schema, safe YAML, overrides, sweeps, model checks."""

import dataclasses
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from lora_jax import config as C
from lora_jax import quant
from lora_jax.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ----------------------------------------------------------------------------
# Good configs


def test_empty_and_minimal_files_take_the_defaults(tmp_path):
    assert C.load_config(write(tmp_path, "", "empty.yaml")) == C.ExperimentConfig(name="empty")
    cfg = C.load_config(write(tmp_path, "method: qlora\nlora: {rank: 4}\n"))
    assert (cfg.name, cfg.method, cfg.lora.rank, cfg.quant.format, cfg.quant.block_size) == (
        "exp",
        "qlora",
        4,
        "nf4",
        64,
    )


def test_values_are_normalized(tmp_path):
    cfg = C.load_config(write(tmp_path, "optim: {lr: 1, betas: [0.9, 0.95], weight_decay: 0}\nlora: {alpha: 16}\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an int where a float is expected
    assert cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert isinstance(cfg.lora.alpha, float)
    hash(cfg)  # frozen and hashable


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads `3e-4` as a string; the config loader reads it as YAML 1.2 does.
    assert C.load_config(write(tmp_path, "optim: {lr: 3e-4}\n")).optim.lr == 3e-4


def test_sections_validate_when_built_in_python():
    with pytest.raises(ConfigError, match=r"lora\.rank: must be >= 1 \(got 0\)"):
        C.LoraConfig(rank=0)
    with pytest.raises(TypeError):
        C.LoraConfig(8)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        C.LoraConfig().rank = 4


def test_quant_formats_match_the_codecs():
    # plus gguf: keep a GGUF file's own quantized tensors (lora_jax.runner.build.file_quantized)
    assert set(typing.get_args(typing.get_type_hints(C.QuantConfig)["format"])) == set(quant.FORMATS) | {"gguf"}


# ----------------------------------------------------------------------------
# Bad configs: each error names the key path and shows the value.

BAD = [
    ("lora: {rank: 0}", r"lora\.rank: must be >= 1 \(got 0\)"),
    ("lora: {rank: -4}", r"lora\.rank: must be >= 1 \(got -4\)"),
    ("lora: {rank: '8'}", r"lora\.rank: expected an int, got str '8'"),
    ("lora: {rank: 8.0}", r"lora\.rank: expected an int, got float 8\.0"),
    ("lora: {rank: true}", r"lora\.rank: expected an int, got bool True \(booleans are not numbers\)"),
    ("lora: {rslora: 1}", r"lora\.rslora: expected a bool \(true/false\), got int 1"),
    ("lora: {alpha: 0}", r"lora\.alpha: must be > 0 \(got 0\.0\)"),
    ("lora: {dropout: 1.0}", r"lora\.dropout: must be in \[0, 1\) \(got 1\.0\)"),
    ("lora: {init: xavier}", r"lora\.init: unknown value 'xavier'; choose one of kaiming, gaussian"),
    ("lora: {targets: 'layers/(q'}", r"lora\.targets: is not a valid regex"),
    ("lora: {rnak: 8}", r"lora\.rnak: unknown key \(did you mean 'lora\.rank'\?\)"),
    ("rank: 8", r"rank: unknown key \(did you mean 'lora\.rank'\?\)"),
    ("lora: 8", r"lora: expected a mapping of lora settings, got int 8"),
    ("optim: {lr: 0}", r"optim\.lr: must be > 0 \(got 0\.0\)"),
    ("optim: {lr: -1.0e-4}", r"optim\.lr: must be > 0 \(got -0\.0001\)"),
    ("optim: {lr: fast}", r"optim\.lr: expected a number, got str 'fast'"),
    ("optim: {schedule: cosin}", r"optim\.schedule: unknown value 'cosin'.*did you mean 'cosine'"),
    ("optim: {betas: [0.9]}", r"optim\.betas: expected a list of 2 numbers, got list \[0\.9\]"),
    ("optim: {betas: [0.9, 1.5]}", r"optim\.betas: must both be in \[0, 1\)"),
    ("optim: {name: adam, weight_decay: 0.1}", r"optim\.weight_decay: adam has no weight decay"),
    ("optim: {warmup_steps: 500}\ntrain: {steps: 100}", r"optim\.warmup_steps: 500 is more than train\.steps=100"),
    (
        "method: lorra",
        r"method: unknown value 'lorra'; choose one of base, lora, qlora, full \(did you mean 'lora'\?\)",
    ),
    ("quant: {format: nf3}", r"quant\.format: unknown value 'nf3'.*did you mean 'nf4'"),
    ("quant: {block_size: 48}", r"quant\.block_size: unknown value 48; choose one of 0, 32, 64, 128, 256"),
    ("quant: {block_size: true}", r"quant\.block_size: unknown value True"),
    ("task: {name: summarization}", r"task\.name: unknown value 'summarization'.*code-summarization"),
    ("task: {name: jsonl}", r"task\.path: task 'jsonl' reads the user's file; set task\.path"),
    ("task: {path: data.jsonl}", r"task\.path: the built-in task 'code-summarization' takes no file"),
    ("task: {max_len: 4}", r"task\.max_len: must be >= 16 \(got 4\)"),
    ("task: {max_len: 4096}", r"task\.max_len: 4096 is longer than model\.max_seq_len=2048"),
    ("task: {n_val: 0}", r"task\.n_val: must be >= 1 \(got 0\)"),
    ("train: {steps: 0}", r"train\.steps: must be >= 1 \(got 0\)"),
    ("train: {batch_size: -2}", r"train\.batch_size: must be >= 1 \(got -2\)"),
    ("model: {name: smolm2-135m}", r"model\.name: unknown model \(did you mean 'smollm2-135m'\?\)"),
    ("model: {dtype: float16}", r"model\.dtype: unknown value 'float16'; choose one of float32, bfloat16"),
    ("seed: -1", r"seed: must be in \[0, 2\*\*32\) \(got -1\)"),
    ("name: my run", r"name: must be a folder name"),
    ("- lora\n- rank", r"exp\.yaml: the top level must be a mapping .*got list"),
    ("lora:\n  rank: 8\n   alpha: 4\n", r"exp\.yaml:3:\d+: YAML syntax error"),
    (
        "lora: {rank: 4}\nlora: {rank: 8}\n",
        r"exp\.yaml:2:1: YAML syntax error: duplicate key 'lora' \(first given on line 1\)",
    ),
    ("sweep: {lora.rank: [1, 0]}", r"sweep run lora\.rank=0: lora\.rank: must be >= 1 \(got 0\)"),
    ("sweep: {lora.rnak: [1, 2]}", r"sweep\.lora\.rnak: unknown key \(did you mean 'lora\.rank'\?\)"),
    ("sweep: {lora.rank: 4}", r"sweep\.lora\.rank: expected a non-empty list of values, got int 4"),
    ("sweep: {lora.rank: [4, 4]}", r"sweep\.lora\.rank: a value is listed twice"),
    ("sweep: {lora: [{rank: 4}]}", r"sweep\.lora: a section; list a key inside it"),
    ("sweep_mode: zip\nsweep: {lora.rank: [1, 2], seed: [0]}", r"sweep_mode zip needs lists of one length"),
    ("sweep_mode: cartesian\nsweep: {seed: [0]}", r"sweep_mode: unknown value 'cartesian'"),
]


@pytest.mark.parametrize("text, match", BAD, ids=[t for t, _ in BAD])
def test_bad_config_is_rejected_before_compute(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        C.load_config(write(tmp_path, text))


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError, match=r"3 problems") as info:
        C.load_config(write(tmp_path, "method: lorra\nlora: {rank: 0}\noptim: {lr: -1}\n"))
    assert [e.split(":")[1] for e in info.value.errors] == [" method", " lora.rank", " optim.lr"]


def test_python_tags_are_rejected_by_the_safe_loader(tmp_path):
    marker = tmp_path / "ran"
    p = write(tmp_path, f"lora:\n  rank: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml:2:\d+: .*python/object/apply:os\.system.*not allowed"):
        C.load_config(p)
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"not allowed"):
        C.apply_overrides({}, ["lora.rank=!!python/object/apply:os.system ['echo hi']"])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        C.load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------
# Overrides


def test_overrides_set_typed_values(tmp_path):
    p = write(tmp_path, "lora: {rank: 8}\n")
    cfg = C.load_config(
        p,
        ["lora.rank=16", "optim.lr=3e-4", "train.steps=10", r"lora.targets=layers/\d+/attn/(q|v)_proj/kernel",
         "optim.betas=[0.9, 0.95]", "lora.alpha=null", "method=qlora", "quant.double_quant=false", "name=other"],
    )  # fmt: skip
    assert (cfg.lora.rank, cfg.optim.lr, cfg.train.steps, cfg.optim.betas) == (16, 3e-4, 10, (0.9, 0.95))
    assert cfg.lora.targets == r"layers/\d+/attn/(q|v)_proj/kernel"
    assert (cfg.lora.alpha, cfg.method, cfg.quant.double_quant, cfg.name) == (None, "qlora", False, "other")


def test_overrides_take_strings_verbatim_and_do_not_mutate():
    raw = {"lora": {"rank": 8}}
    out = C.apply_overrides(raw, ["lora.targets=[qv]_proj", "model.name=./no", "task.path=null", "lora=null"])
    assert out["lora"] == {"rank": 8, "targets": "[qv]_proj"}  # a YAML list if parsed
    assert out["model"]["name"] == "./no" and out["task"]["path"] is None
    assert raw == {"lora": {"rank": 8}}


@pytest.mark.parametrize(
    "item, match",
    [
        ("lora.rank", r"--set 'lora\.rank': expected key=value, e\.g\. --set lora\.rank=16"),
        ("lora.rnak=16", r"unknown key 'lora\.rnak' \(did you mean 'lora\.rank'\?\)"),
        ("lr=1e-3", r"unknown key 'lr' \(did you mean 'optim\.lr'\?\)"),
        ("lora.rank.x=1", r"unknown key 'lora\.rank\.x'"),
        ("sweep.lora.rnak=[1]", r"unknown sweep axis 'lora\.rnak' \(did you mean 'lora\.rank'\?\)"),
        ("lora=4", r"lora is a section; give a mapping"),
    ],
)
def test_bad_overrides(item, match):
    with pytest.raises(ConfigError, match=match):
        C.apply_overrides({}, [item])


def test_bad_override_value_fails_on_load(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml: lora\.rank: expected an int, got str 'big'"):
        C.load_config(write(tmp_path, ""), ["lora.rank=big"])


def test_override_pins_a_sweep_axis(tmp_path):
    p = write(tmp_path, "sweep: {method: [base, lora], lora.rank: [1, 4, 16]}\n")
    runs = C.load_sweep(p, ["lora.rank=2"])
    assert [n for n, _ in runs] == ["base", "lora"] and runs[1][1].lora.rank == 2
    assert [n for n, _ in C.load_sweep(p, ["sweep.seed=[0, 1]", "method=lora"])] == [
        "lora_r1_s0", "lora_r1_s1", "lora_r4_s0", "lora_r4_s1", "lora_r16_s0", "lora_r16_s1",
    ]  # fmt: skip
    assert [n for n, _ in C.load_sweep(p, ["sweep=null"])] == ["lora"]


# ----------------------------------------------------------------------------
# Sweeps


def test_grid_dedupes_runs_a_method_does_not_distinguish():
    raw = {
        "sweep": {"lora.rank": [1, 2, 4, 8, 16, 32, 64], "seed": [0, 1, 2], "method": ["base", "lora", "qlora", "full"]}
    }
    runs = C.expand_sweep(raw)
    methods = [c.method for _, c in runs]
    assert [methods.count(m) for m in ("base", "lora", "qlora", "full")] == [3, 21, 21, 3]
    names = [n for n, _ in runs]
    assert len(set(names)) == len(names)
    assert names[:5] == ["base_s0", "lora_r1_s0", "qlora_r1_s0", "full_s0", "base_s1"]
    assert "qlora_r8_s2" in names and "base_s2" in names and "full_s0" in names
    base = dict(runs)["base_s1"]
    assert base.seed == 1 and base.lora == C.LoraConfig()  # the rank axis was not applied
    assert len({C.config_hash(c) for _, c in runs}) == len(runs)


def test_base_with_a_rank_sweep_is_one_run():
    runs = C.expand_sweep({"method": "base", "sweep": {"lora.rank": [1, 2, 4]}})
    assert [n for n, _ in runs] == ["base"]


def test_lora_ignores_quant_axes():
    runs = C.expand_sweep({"sweep": {"method": ["lora", "qlora"], "quant.format": ["nf4", "fp4", "int4"]}})
    assert [n for n, _ in runs] == ["lora", "qlora_nf4", "qlora_fp4", "qlora_int4"]


def test_zip_mode_pairs_the_axes():
    raw = {"sweep_mode": "zip", "sweep": {"lora.rank": [4, 8, 16], "lora.alpha": [8, 16, 32]}}
    runs = C.expand_sweep(raw)
    assert [n for n, _ in runs] == ["lora_r4_alpha8", "lora_r8_alpha16", "lora_r16_alpha32"]
    assert [(c.lora.rank, c.lora.alpha) for _, c in runs] == [(4, 8.0), (8, 16.0), (16, 32.0)]


def test_run_names_are_filesystem_safe_stable_and_unique():
    raw = {"sweep": {"lora.targets": [".*q_proj/kernel", ".*v_proj/kernel"], "optim.lr": [1e-4, 3e-4],
                     "quant.targets": [".*"], "lora.rslora": [True, False], "task.n_train": [None, 100]}}  # fmt: skip
    names = [n for n, _ in C.expand_sweep(raw)]
    assert names == [n for n, _ in C.expand_sweep(raw)]  # deterministic
    assert len(set(names)) == len(names) == 16
    for n in names:
        assert all(ch.isalnum() or ch in "._+-" for ch in n), n
    assert names[0].startswith("lora_lora-targets-") and "_lr0.0001_rslora-on_n_train-none" in names[0]


def test_no_sweep_is_one_run_named_after_the_method():
    ((name, cfg),) = C.expand_sweep({"method": "full"})
    assert name == "full" and cfg == C.ExperimentConfig(method="full")


def test_load_config_checks_the_sweep_but_returns_the_base(tmp_path):
    cfg = C.load_config(write(tmp_path, "lora: {rank: 8}\nsweep: {lora.rank: [1, 2]}\n"))
    assert cfg.lora.rank == 8
    with pytest.raises(ConfigError, match=r"this config declares a sweep"):
        C.from_dict({"sweep": {"seed": [0]}})


# ----------------------------------------------------------------------------
# Hash and round trip


def test_round_trip(tmp_path):
    for _, cfg in C.load_sweep(CONFIGS / "qlora_formats.yaml") + C.load_sweep(CONFIGS / "rank_sweep.yaml")[:4]:
        text = C.to_yaml(cfg)
        assert C.from_dict(yaml.safe_load(text)) == cfg
        p = tmp_path / "resolved.yaml"
        p.write_text(text)
        assert C.load_config(p) == cfg
        assert C.config_hash(C.load_config(p)) == C.config_hash(cfg)


def test_config_hash_is_stable_and_ignores_what_the_method_does_not_read():
    cfg = C.ExperimentConfig()
    assert C.config_hash(cfg) == C.config_hash(C.from_dict(C.to_dict(cfg)))
    assert len(C.config_hash(cfg)) == 64
    assert C.config_hash(cfg) != C.config_hash(dataclasses.replace(cfg, seed=1))
    assert C.config_hash(cfg) == C.config_hash(dataclasses.replace(cfg, name="x", output_dir="elsewhere"))
    lora_run = dataclasses.replace(cfg, quant=C.QuantConfig(format="fp4"))
    assert C.config_hash(cfg) == C.config_hash(lora_run)  # lora reads no quant.*
    qlora = dataclasses.replace(cfg, method="qlora")
    assert C.config_hash(qlora) != C.config_hash(dataclasses.replace(lora_run, method="qlora"))


# ----------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize("name, n_runs", [("quickstart.yaml", 4), ("rank_sweep.yaml", 27), ("qlora_formats.yaml", 4)])
def test_shipped_configs_load_and_expand(name, n_runs):
    C.load_config(CONFIGS / name)
    runs = C.load_sweep(CONFIGS / name)
    assert len(runs) == n_runs
    assert len({n for n, _ in runs}) == n_runs


def test_quickstart_runs():
    runs = C.load_sweep(CONFIGS / "quickstart.yaml")
    assert [n for n, _ in runs] == ["base", "lora_r1", "lora_r4", "lora_r16"]
    assert [c.lora.rank for _, c in runs[1:]] == [1, 4, 16]
    assert all(c.name == "quickstart" and c.model.name == "smollm2-135m" for _, c in runs)


def test_zip_sweeps_may_repeat_a_value_within_an_axis():
    runs = C.expand_sweep({"sweep_mode": "zip", "sweep": {"seed": [0, 0, 1, 1], "lora.rank": [4, 8, 4, 8]}})
    assert sorted((c.seed, c.lora.rank) for _, c in runs) == [(0, 4), (0, 8), (1, 4), (1, 8)]
    with pytest.raises(ConfigError, match="listed twice"):
        C.expand_sweep({"sweep": {"seed": [0, 0]}})


# ----------------------------------------------------------------------------
# The config package is standard library + PyYAML only


def test_loading_a_config_imports_no_jax_or_numpy():
    code = (
        "import lora_jax.config, sys; cfg = lora_jax.config.load_config('configs/quickstart.yaml'); "
        "assert 'jax' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    )
    root = CONFIGS.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_names_that_moved_out_keep_working_from_the_config_package():
    from lora_jax.runner import build

    assert C.check_against_model is build.check_against_model
    assert "check_against_model" not in C.__all__  # a star import stays free of JAX
    assert all(hasattr(C, name) for name in C.__all__)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        C.no_such_name  # noqa: B018


def test_file_names_with_spaces_or_accents_name_the_sweep(tmp_path):
    p = tmp_path / "my rank sweep é.yaml"
    p.write_text("lora:\n  rank: 4\n")
    assert C.load_config(p).name == "my-rank-sweep-e"
    only_symbols = tmp_path / "日本.yaml"
    only_symbols.write_text("lora:\n  rank: 4\n")
    assert C.load_config(only_symbols).name == "config"


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"):
        C.load_config(p)


def test_a_config_full_of_unknown_keys_lists_twenty_problems_and_counts_the_rest(tmp_path):
    p = tmp_path / "junk.yaml"
    p.write_text("".join(f"junk_{i}: 1\n" for i in range(500)))
    with pytest.raises(ConfigError) as info:
        C.load_config(p)
    assert len(info.value.errors) == 500
    text = str(info.value)
    assert text.startswith("500 problems:") and "... and 480 more" in text and len(text) < 6000


def test_errors_of_a_config_without_sweep_have_no_sweep_prefix(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  rank: 0\n")
    with pytest.raises(ConfigError) as info:
        C.load_sweep(p)
    assert "sweep run" not in str(info.value) and "lora.rank: must be >= 1 (got 0)" in str(info.value)
