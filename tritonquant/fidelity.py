"""Does compressed training train as well as exact training? Real data, small models, several seeds.

Four tasks, all on data that ships with an installed package (nothing is downloaded):
* ``digits``: scikit-learn's 8x8 handwritten digits (1797 images), a BatchNorm+ReLU CNN; metric:
  held-out accuracy.
* ``stdlib-lm``: a character-level language model on Python's own standard-library sources, a small
  transformer (LayerNorm/RMSNorm, attention, GELU/SiLU, dropout); metric: held-out loss (nats/char).
* ``stdlib-lm-fused``: the same without attention dropout, so that attention runs fused and saves no
  probabilities.
* ``stdlib-words``: the same model and corpus at the word level (4096 tokens: identifiers, keywords
  and punctuation), so that the loss's log-probabilities span a wide vocabulary; metric: held-out loss
  (nats/token).

``train_run`` trains one configuration for one seed and returns its curve; ``benchmarks/fidelity.py``
sweeps configurations and seeds and writes docs/fidelity.md's tables and plots.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .autobits import calibrate
from .models import DigitsCNN, TinyTransformer
from .session import compress

# Standard-library modules present (as single files) in CPython 3.10 through 3.13.
CORPUS_MODULES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "csv.py", "dataclasses.py", "difflib.py",
    "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py", "pprint.py", "random.py",
    "shutil.py", "string.py", "tarfile.py", "textwrap.py", "typing.py",
)
VOCAB = 128  # ASCII; anything else becomes "?"
WORD_VOCAB = 4096  # the 4095 most frequent words and symbols, and one id for all others
SEQ = 64


@dataclass
class Task:
    name: str
    metric: str  # "accuracy" (higher is better) or "loss" (lower is better)
    make_model: Callable[[], nn.Module]
    train_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[nn.Module], float]
    lr: float
    steps: int


@dataclass
class RunResult:
    task: str
    label: str
    seed: int
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    packed_ratio: float = 1.0

    @property
    def final(self) -> float:
        return self.metric[-1]


def digits_task(steps: int = 300, batch: int = 64) -> Task:
    from sklearn.datasets import load_digits  # an optional dependency: pip install 'tritonquant[fidelity]'

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [1797, 1, 8, 8] in [-1, 1]
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # one fixed split
    test, train = order[:360], order[360:]

    def train_batch(gen: torch.Generator):
        idx = train[torch.randint(0, len(train), (batch,), generator=gen)]
        return images[idx], labels[idx]

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(images[test]).argmax(1) == labels[test]).float().mean().item()

    return Task("digits", "accuracy", lambda: DigitsCNN(width=32), train_batch, evaluate, lr=2e-3, steps=steps)


def stdlib_text() -> str:
    root = os.path.dirname(os.__file__)
    return "".join(open(os.path.join(root, name), encoding="utf-8").read() for name in CORPUS_MODULES)


def stdlib_corpus() -> torch.Tensor:
    """The corpus as int64 character codes < VOCAB."""
    codes = torch.tensor(list(stdlib_text().encode("ascii", errors="replace")), dtype=torch.int64)
    return codes.clamp(max=VOCAB - 1)


def stdlib_words() -> torch.Tensor:
    """The corpus as int64 word ids < WORD_VOCAB: runs of word characters and single other symbols,
    numbered by frequency from 1; 0 stands for every word outside the vocabulary."""
    words = re.findall(r"\w+|[^\w\s]", stdlib_text())
    ids = {w: i for i, (w, _) in enumerate(Counter(words).most_common(WORD_VOCAB - 1), 1)}
    return torch.tensor([ids.get(w, 0) for w in words], dtype=torch.int64)


def language_task(name: str, corpus: torch.Tensor, vocab: int, steps: int, batch: int,
                  attention_dropout: bool = True) -> Task:
    """Next-token prediction on ``corpus`` (last 10% held out) with a 2-layer ``TinyTransformer``.

    Without ``attention_dropout`` (the residual dropout stays), SDPA takes its fused path on CPU, which
    saves q, k, v, the output and the log-sum-exp instead of the probabilities."""
    split = int(len(corpus) * 0.9)
    train_text, test_text = corpus[:split], corpus[split:]
    eval_starts = torch.linspace(0, len(test_text) - SEQ - 2, 128).long()  # fixed held-out windows

    def windows(text: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(SEQ + 1)
        chunk = text[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(gen: torch.Generator):
        return windows(train_text, torch.randint(0, len(train_text) - SEQ - 2, (batch,), generator=gen))

    def evaluate(model: nn.Module) -> float:
        tokens, targets = windows(test_text, eval_starts)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(tokens).reshape(-1, vocab), targets.reshape(-1)).item()
        model.train(was_training)
        return loss

    def make_model() -> nn.Module:
        model = TinyTransformer(vocab=vocab, dim=64, heads=4, layers=2, seq=SEQ, dropout=0.1)
        if not attention_dropout:
            for block in model.blocks:
                block.attn.dropout = 0.0
        return model

    return Task(name, "loss", make_model, train_batch, evaluate, lr=2e-3, steps=steps)


def stdlib_lm_task(steps: int = 300, batch: int = 32) -> Task:
    return language_task("stdlib-lm", stdlib_corpus(), VOCAB, steps, batch)


def stdlib_lm_fused_task(steps: int = 300, batch: int = 32) -> Task:
    return language_task("stdlib-lm-fused", stdlib_corpus(), VOCAB, steps, batch, attention_dropout=False)


def stdlib_words_task(steps: int = 300, batch: int = 32) -> Task:
    return language_task("stdlib-words", stdlib_words(), WORD_VOCAB, steps, batch)


TASKS = {"digits": digits_task, "stdlib-lm": stdlib_lm_task, "stdlib-lm-fused": stdlib_lm_fused_task,
         "stdlib-words": stdlib_words_task}


def _loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_run(task: Task, label: str, context: Callable[[], contextlib.AbstractContextManager] | None,
              seed: int, eval_every: int = 50) -> RunResult:
    """Train ``task`` from the seed's initial weights; ``context`` wraps each step's forward (None: exact).

    The batches and the model's initial weights depend only on the seed, so runs with the same seed
    differ only by compression.
    """
    torch.manual_seed(seed)
    model = task.make_model()
    every = getattr(context, "calibrate_every", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1000 + seed)
    result = RunResult(task.name, label, seed)
    raw = packed = 0
    for step in range(1, task.steps + 1):
        batch = task.train_batch(gen)
        opt.zero_grad(set_to_none=True)
        if every and (step - 1) % every == 0:
            context.calibrate(model, lambda: _loss(model, batch))
        with (context() if context else contextlib.nullcontext()) as session:
            loss = _loss(model, batch)
        loss.backward()
        opt.step()
        if session is not None and hasattr(session, "stats"):
            raw += session.stats.raw_bytes
            packed += session.stats.packed_bytes
        if step % eval_every == 0 or step == task.steps:
            result.steps.append(step)
            result.train_loss.append(loss.item())
            result.metric.append(task.evaluate(model))
    result.packed_ratio = raw / packed if packed else 1.0
    return result


def compress_context(**config) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of fresh ``compress`` blocks with ``config`` (min_bytes 0: these models are small)."""
    config.setdefault("min_bytes", 0)
    return lambda: compress(**config)


@dataclass
class MeasuredAuto:
    """A context factory for ``bits="auto", budget=budget`` whose plan ``tq.calibrate`` measures on the
    current batch before the first step and then every ``calibrate_every`` steps (``train_run`` calls
    ``calibrate``); ``config`` holds the other ``compress`` keywords, shared by both calls."""

    budget: float
    calibrate_every: int
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config.setdefault("min_bytes", 0)

    def calibrate(self, model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> None:
        calibrate(model, loss_fn, self.budget, **self.config)

    def __call__(self) -> contextlib.AbstractContextManager:
        return compress(bits="auto", budget=self.budget, **self.config)
