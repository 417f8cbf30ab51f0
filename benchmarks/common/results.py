"""Result files with provenance: ``results/latest/<name>.*`` and ``history/<stamp>_<commit>_<name>.json``.

``latest/`` holds what the README and docs cite; a rerun overwrites it. ``history/`` is append-only: every
run adds one JSON file there and no file in it is ever rewritten (a name that exists gets a ``-2``, ``-3``
suffix). Every JSON record starts with its provenance, read from the packages and from git, never typed:

* ``tightfit_version``, ``torch_version``, ``transformers_version`` (null when not installed), and
  ``tightfit_source_sha256``, a hash of the imported tightfit package's ``.py`` files (it identifies the
  code that ran when the tree was dirty);
* ``commit`` (``git rev-parse HEAD`` of the checkout the benchmarks run from) and ``dirty`` (whether
  ``git status --porcelain --untracked-files=no`` lists a tracked file; both null outside a git checkout);
* ``device`` (``cpu`` or the accelerator's name);

then ``conditions`` (Python, torch threads, CPUs, load average, UTC time, the command line) and whatever the
benchmark adds (its ``settings`` and results). ``TIGHTFIT_BENCH_RESULTS=<dir>`` writes a trial run's files
under ``<dir>/latest`` and ``<dir>/history`` instead.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1]
REPO = BENCHMARKS.parent
# TIGHTFIT_BENCH_RESULTS=<dir> sends a trial run's files elsewhere (history/ is never to be edited)
RESULTS = Path(os.environ.get("TIGHTFIT_BENCH_RESULTS") or BENCHMARKS / "results").resolve()
LATEST = RESULTS / "latest"
HISTORY = RESULTS / "history"
# the machine's state when the benchmark started (the record's ``conditions`` add the state at its end)
_STARTED = {
    "utc_start": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    "load_avg_start": list(os.getloadavg()),
}
PROVENANCE_KEYS = (
    "tightfit_version",
    "torch_version",
    "transformers_version",
    "tightfit_source_sha256",
    "commit",
    "dirty",
    "device",
)


def git(*args: str, cwd: Path = REPO) -> str | None:
    """stdout of ``git args`` in ``cwd`` (stripped), or None when git fails or is missing."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(cwd: Path = REPO) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether a tracked file differs from it); (None, None) outside a git checkout."""
    commit = git("rev-parse", "HEAD", cwd=cwd)
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return commit, None if status is None else bool(status)


def package_version(name: str) -> str | None:
    """The installed distribution's version (from its metadata, without importing it), or None."""
    module = sys.modules.get(name)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_hash(package_dir: Path) -> str:
    """sha256 over the sorted relative paths and contents of a package's ``.py`` files."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def device_name(device: Any = "cpu") -> str:
    """``cpu``, or the name of the accelerator a ``cuda`` device is (``NVIDIA H100 80GB HBM3``)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return str(dev.type)


def provenance(device: Any = "cpu") -> dict[str, Any]:
    """Versions, commit and dirtiness, and the device: where the numbers of a run come from."""
    import torch

    import tightfit

    commit, dirty = git_state()
    package_dir = Path(tightfit.__file__).resolve().parent
    out = {
        "tightfit_version": tightfit.__version__,
        "torch_version": torch.__version__,
        "transformers_version": package_version("transformers"),
        "tightfit_source_sha256": source_hash(package_dir),
        "commit": commit,
        "dirty": dirty,
        "device": device_name(device),
    }
    if commit is not None and REPO not in package_dir.parents:
        out["provenance_note"] = (
            f"tightfit was imported from {package_dir}, outside this checkout: `commit` and `dirty` describe "
            "the benchmarks, `tightfit_source_sha256` the library"
        )
    return out


def conditions() -> dict[str, Any]:
    """What the machine was doing: Python, threads, CPUs, load average and UTC time (at the start and now),
    the command line."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        **_STARTED,
        "load_avg": list(os.getloadavg()),
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": command_line(),
    }


def command_line() -> str:
    """How this process was started, as one would type it from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def record(name: str, data: Mapping[str, Any], *, device: Any = "cpu") -> dict[str, Any]:
    """The JSON record of one run: name, provenance, conditions, then ``data``."""
    clash = set(data) & {"name", "conditions", *PROVENANCE_KEYS}
    if clash:
        raise ValueError(f"result data may not set {sorted(clash)}: they come from the harness")
    return {"name": name, **provenance(device), "conditions": conditions(), **data}


def _history_path(rec: Mapping[str, Any], suffix: str = ".json") -> Path:
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.strptime(rec["conditions"]["utc"], "%Y-%m-%d %H:%M:%S"))
    commit = (rec.get("commit") or "nogit")[:7]
    base = f"{stamp}_{commit}_{rec['name']}"
    path, n = HISTORY / f"{base}{suffix}", 1
    while path.exists():
        n += 1
        path = HISTORY / f"{base}-{n}{suffix}"
    return path


def write(
    name: str,
    data: Mapping[str, Any],
    *,
    device: Any = "cpu",
    csv_rows: Sequence[Mapping[str, Any]] | None = None,
    figure: Any = None,
    text: str | None = None,
) -> dict[str, Path]:
    """Write one run: ``latest/<name>.json`` (+ ``.csv`` of ``csv_rows``, ``.png`` of a matplotlib
    ``figure``, ``.txt`` of ``text``), and the same JSON to ``history/``. Returns the paths written."""
    rec = record(name, data, device=device)
    if text is not None:
        rec["text"] = text.splitlines()
    LATEST.mkdir(parents=True, exist_ok=True)
    HISTORY.mkdir(parents=True, exist_ok=True)
    body = json.dumps(rec, indent=1, default=str) + "\n"
    paths = {"json": LATEST / f"{name}.json", "history": _history_path(rec)}
    paths["json"].write_text(body)
    paths["history"].write_text(body)
    if csv_rows:
        paths["csv"] = LATEST / f"{name}.csv"
        write_csv(paths["csv"], csv_rows)
    if figure is not None:
        paths["png"] = LATEST / f"{name}.png"
        figure.savefig(paths["png"])
    if text is not None:
        paths["txt"] = LATEST / f"{name}.txt"
        paths["txt"].write_text(text if text.endswith("\n") else text + "\n")
    return paths


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], skip: Iterable[str] = ()) -> None:
    """Rows of dicts as CSV (columns of the first row, minus ``skip``)."""
    skip = set(skip)
    cols = [k for k in rows[0] if k not in skip]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def load(path: str | Path) -> dict[str, Any]:
    """A results JSON file (``latest/<name>.json`` may be given as just ``<name>``)."""
    p = Path(path)
    if not p.exists() and (LATEST / f"{p.name}.json").exists():
        p = LATEST / f"{p.name}.json"
    return json.loads(p.read_text())


def say_written(paths: Mapping[str, Path]) -> None:
    """Print where a run's files went, relative to the repository root."""
    shown = [str(p.relative_to(REPO)) if REPO in p.parents else str(p) for p in paths.values()]
    print(f"wrote {', '.join(shown)}", flush=True)


class Transcript:
    """Tee everything printed to stdout inside the ``with`` into ``.text`` (the run's text result)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._stdout: Any = None

    def write(self, s: str) -> int:
        self._parts.append(s)
        return self._stdout.write(s)

    def flush(self) -> None:
        self._stdout.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno ... of the real stdout
        return getattr(self._stdout, name)

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def __enter__(self) -> Transcript:
        self._stdout, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.stdout = self._stdout
