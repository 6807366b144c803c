"""The README's code runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_compose_section_runs(capsys):
    blocks = python_blocks("Compose LoRA in your research code")
    assert blocks, "the section lost its code block"
    namespace: dict = {}
    for code in blocks:  # later blocks build on earlier ones, as in a notebook
        exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "ParamCount(trainable=" in out
    assert "QTensor 4.126953125" in out
