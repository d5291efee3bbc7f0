"""The runnable examples of the docs execute as written (in a temporary folder)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _examples(doc: str) -> dict[str, str]:
    text = (DOCS / doc).read_text()
    blocks = re.findall(r"```python\n(# example: (\S+)\n.*?)```", text, flags=re.S)
    return {name: code for code, name in blocks}


API_EXAMPLES = list(_examples("api.md"))  # every `# example:` block of docs/api.md, in order


def test_every_named_example_is_found():
    assert set(_examples("optim.md")) == {"nanogpt", "huggingface"}
    # one per section at least; no name twice, no example outside a python block
    assert {"models", "partitions", "operators", "linalg", "extract", "compare", "train",
            "optim", "distributed", "errors"} <= set(API_EXAMPLES)
    text = (DOCS / "api.md").read_text()
    assert len(re.findall(r"^# example: ", text, flags=re.M)) == len(API_EXAMPLES)


@pytest.mark.parametrize("name", ["nanogpt", "huggingface"])
def test_optim_examples_run(name, tmp_path, monkeypatch, capsys):
    if name == "huggingface":
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(_examples("optim.md")[name], f"docs/optim.md:{name}", "exec"), {})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) >= 4
    losses = [float(re.search(r"(?:loss|val) ([0-9.]+)", line).group(1)) for line in lines]
    assert losses[-1] < losses[0]  # the loop trains
    if name == "nanogpt":
        assert (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("name", API_EXAMPLES)
def test_api_examples_run(name, tmp_path, monkeypatch, capsys):
    """Each example of docs/api.md runs as written (its asserts are the checks) and prints."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_examples("api.md")[name], f"docs/api.md:{name}", "exec"), {})
    assert capsys.readouterr().out.strip()
