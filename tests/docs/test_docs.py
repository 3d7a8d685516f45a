"""The code the docs show runs as shown.

* Every Python block in README.md and docs/ uses only names ``tritonquant`` has, with keywords its
  functions take; every ``python -m tritonquant ...`` line parses with the CLI's parser.
* Each complete program in docs/integrations/ runs in a process of its own (the distributed ones
  under torchrun, as their first line says), unless it imports a package that is not installed; on a
  CPU with the torch the doc names, it prints what the doc quotes it printing.
* The fragments of README.md and docs/usage.md, which leave ``model``, ``batch`` and the like to the
  reader, run in order against small stand-ins for those names.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tritonquant as tq
from tritonquant.cli import build_parser
from tritonquant.config import QUANT_FIELDS, CompressConfig
from tritonquant.models import SmallCNN, cnn_batch

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "integrations").glob("*.md"))]
TORCHRUN = re.compile(r"^# (?P<file>\S+\.py) -- launch with: torchrun (?P<args>.*)$", re.M)


def blocks(path: Path, language: str = "python") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def has_placeholders(code: str) -> bool:
    """Whether the block stands ``...`` in for code the reader supplies (``model = ...``)."""
    return any(isinstance(node, ast.Constant) and node.value is Ellipsis for node in ast.walk(ast.parse(code)))


def keywords_of(function) -> set[str]:
    """The keywords ``function`` takes; ``**config`` (compress, attach, calibrate) stands for
    CompressConfig's."""
    def named(f) -> set[str]:
        return {name for name, p in inspect.signature(f).parameters.items() if p.kind is not p.VAR_KEYWORD}

    names = named(function)
    if len(names) < len(inspect.signature(function).parameters):
        names |= named(CompressConfig.from_kwargs) | set(QUANT_FIELDS)
    return names


def quoted_output(text_after: str) -> tuple[str | None, list[str]]:
    """(the torch version named, the quoted lines) of the sentence that tells what a program printed: the
    first one after the program's block that starts "On a CPU" or "Run on a CPU", up to its first full
    stop outside backquotes (a quoted line may end in "..."). (None, []) when there is none."""
    prose = re.sub(r"```.*?```", "", text_after.split("```python")[0], flags=re.S)
    start = re.search(r"^(Run o|O)n a CPU", prose, flags=re.M)
    if start is None:
        return None, []
    sentence, quoted = [], False
    for i, char in enumerate(prose[start.start():]):
        quoted ^= char == "`"
        after = prose[start.start() + i + 1:][:1]
        if char == "." and not quoted and after in ("", " ", "\n") and not "".join(sentence).endswith(".."):
            break
        sentence.append(char)
    sentence = "".join(sentence)
    version = re.search(r"torch (\d+\.\d+)", sentence)
    return version and version[1], re.findall(r"`([^`]+)`", sentence)


def programs(path: Path) -> list:
    text = path.read_text()
    found = re.finditer(r"```python\n(.*?)```", text, flags=re.S)
    return [(block[1], *quoted_output(text[block.end():])) for block in found if not has_placeholders(block[1])]


PYTHON_BLOCKS = [pytest.param(code, id=f"{doc_id(path)}-{i}") for path in DOCS for i, code in enumerate(blocks(path))]
PROGRAMS = [pytest.param(*program, id=f"{path.stem}-{i}") for path in sorted((ROOT / "docs" / "integrations").glob("*.md"))
            for i, program in enumerate(programs(path))]


def test_the_docs_hold_code_to_check():
    # (a change to how blocks are found that finds none would pass every test below)
    assert len(PYTHON_BLOCKS) >= 15 and len(PROGRAMS) >= 8


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_a_python_block_uses_names_and_keywords_tritonquant_has(code):
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tq":
            assert hasattr(tq, node.attr), f"tq.{node.attr} does not exist"
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "tq"):
            for keyword in node.keywords:
                assert keyword.arg is None or keyword.arg in keywords_of(getattr(tq, node.func.attr)), \
                    f"tq.{node.func.attr} takes no keyword {keyword.arg!r}"


CLI_LINES = sorted({(doc_id(path), line) for path in DOCS
                    for line in re.findall(r"python -m tritonquant [^`#\n]*", path.read_text())})


@pytest.mark.parametrize("where, line", CLI_LINES, ids=[f"{w}: {line.strip()}" for w, line in CLI_LINES])
def test_a_command_line_in_the_docs_parses(where, line):
    # Placeholders such as <results> stand for a value; 7 is one for every option that takes one.
    argv = shlex.split(re.sub(r"<[^>]*>", "7", line))[3:]
    build_parser().parse_args(argv)


def test_the_quoted_output_of_a_program_is_found():
    text = ("\n```\n\n```bash\nrun it\n```\n\nRun on a CPU (torch 2.13): `step 0 loss 5.086\nactivations` ... "
            "`total ... 7.53x` ... `7.529...`. Use `cuda` on a GPU.\n\n```python\nx = 1\n```\nOn a CPU this prints `2`.")
    assert quoted_output(text) == ("2.13", ["step 0 loss 5.086\nactivations", "total ... 7.53x",
                                                "7.529..."])
    assert quoted_output("\n```\nOn a GPU it prints `1`.") == (None, [])


def printed(quoted: str, output: str) -> bool:
    """Whether ``output`` holds ``quoted``, whose "..." stand for anything, with runs of white space and
    backquotes (Lightning quotes names in its messages) not counted."""
    def plain(text: str) -> str:
        return " ".join(text.replace("`", "").split())

    output, position = plain(output), 0
    for piece in (plain(piece) for piece in quoted.split("...")):
        position = output.find(piece, position)
        if position < 0:
            return False
        position += len(piece)
    return True


@pytest.mark.parametrize("code, quoted_torch, quoted", PROGRAMS)
def test_an_integration_program_runs(code, quoted_torch, quoted, tmp_path):
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(code))
                 if isinstance(node, ast.ImportFrom) and node.module}
    missing = sorted(name for name in imported if importlib.util.find_spec(name) is None)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    launch = TORCHRUN.search(code)
    script = tmp_path / (launch["file"] if launch else "example.py")
    script.write_text(code)
    env = dict(os.environ)
    if launch:
        command = [sys.executable, "-m", "torch.distributed.run", *shlex.split(launch["args"])]
        processes = int(re.search(r"--nproc_per_node[= ](\d+)", launch["args"])[1])
        if torch.cuda.device_count() < processes:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU per process, or the programs' CPU (gloo) path
    else:
        command = [sys.executable, script.name]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip(), "the program printed nothing"
    # What the doc says it printed, where this run is the one the doc describes: on a CPU, with that torch.
    if quoted_torch is not None and torch.__version__.startswith(quoted_torch + ".") and not torch.cuda.is_available():
        for line in quoted:
            assert printed(line, result.stdout + result.stderr), f"the doc quotes {line!r}; the program printed:\n" + \
                result.stdout[-3000:]


def stand_ins() -> dict:
    """What the fragments leave to the reader: a model, a batch and its targets, a loss, an optimizer,
    a data loader and a trainer, all small."""
    torch.manual_seed(0)
    model = SmallCNN(width=8, blocks=1)
    batch, target = cnn_batch(8, size=16)

    class Trainer:
        def train(self) -> None:
            F.cross_entropy(model(batch), target).backward()

    return {"tq": tq, "torch": torch, "F": F, "model": model, "batch": batch, "target": target, "x": batch,
            "y": target, "loss_fn": F.cross_entropy, "loss_of": lambda b: F.cross_entropy(model(b), target),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.01), "loader": [(batch, target)] * 2,
            "trainer": Trainer()}


@pytest.mark.parametrize("doc, check", [
    ("README.md", lambda ns: ns["session"].stats.packed_tensors > 0 and ns["x_hat"].shape == ns["x"].shape),
    ("docs/usage.md", lambda ns: ns["session"].stats.packed_tensors > 0 and ns["handle"].forwards > 0),
], ids=["README", "usage"])
def test_the_fragments_run_in_order_against_stand_ins(doc, check):
    namespace = stand_ins()
    for code in blocks(ROOT / doc):
        exec(compile(code, doc, "exec"), namespace)
    assert check(namespace)
