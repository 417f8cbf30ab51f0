"""Move the flat benchmarks/results/* files into latest/ and history/ and add provenance derived from git.

Run once from the repository root (a no-op when no flat results file is left):

    python scripts/migrate_results.py [--dry-run]

Results written before the harness recorded provenance lack ``commit``, ``tightfit_version`` and friends.
They are derived here, never typed:

* ``commit``: the file's recorded ``meta.git_head``; where a ``meta.git_head_note`` names another commit
  (the H100 runs ran on a copy of the tree that reported the session-start commit), the commit the note
  names, and ``provenance_note`` says so; where nothing is recorded (text files, one JSON), the last commit
  that wrote the file (``git log``), which is at or after the code that produced it, said in
  ``provenance_note``. ``commit_source`` names which of these it is.
* ``tightfit_version``: ``__version__`` in ``git show <commit>:src/tightfit/_version.py``.
* ``torch_version``: the version the file records (``meta.torch``, or ``torch X`` in a text result), else
  null; ``transformers_version`` null; ``dirty`` null (unknown).
* ``device``: the accelerator the file records (``meta.accelerator`` for a CUDA run, ``on NVIDIA ...`` in
  a text result), ``cuda`` when a text result says only that, else ``cpu``.
* ``migrated: true`` and ``migration_date``.

The files the README cites go to ``latest/`` under their own names (a text result gets a JSON companion,
``<name>.json``, holding the fields above and the text); every JSON record is also copied to
``history/<utc>_<commit>_<name>.json`` (the time the run recorded, else the commit's date). Superseded and
orphan results go to ``history/`` only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LATEST, HISTORY = RESULTS / "latest", RESULTS / "history"

# the results the README cites (their stems); every other flat result file is history
CITED = {
    "remat_gpt2_b8t256",
    "remat_cnn_resnet50",
    "remat_cnn_unet",
    "remat_cnn_resnet50_w64_224px",
    "remat_cnn_unet_w64_224px",
    "remat_lstm",
    "remat_lstm_h512",
    "remat_lstm_h100",
    "remat_overhead_h4",
    "remat_overhead_h4_seg25",
    "remat_overhead_h100",
    "remat_overhead_h256",
    "ruler_vs_allocator",
    "ruler_vs_allocator_h100",
    "ruler_vs_allocator_h100_opbyop",
}
NOTE_COMMIT = re.compile(r"\b(?:at commit|code of|commit) ([0-9a-f]{7,40})\b")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def full_commit(short: str) -> str:
    return git("rev-parse", "--verify", f"{short}^{{commit}}")


def tightfit_version(commit: str) -> str | None:
    for path in ("src/tightfit/_version.py", "src/tightfit/__init__.py"):
        try:
            text = git("show", f"{commit}:{path}")
        except subprocess.CalledProcessError:
            continue
        m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
        if m:
            return m.group(1)
    return None


def last_commit_of(path: Path) -> tuple[str, str]:
    """(full hash, UTC 'YYYY-MM-DD HH:MM:SS') of the last commit that wrote ``path``."""
    out = git("log", "-1", "--format=%H %ct", "--", str(path.relative_to(ROOT)))
    commit, stamp = out.split()
    return commit, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(stamp)))


def provenance_of_json(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    head, note = meta.get("git_head"), meta.get("git_head_note")
    named = NOTE_COMMIT.search(note or "")
    out: dict[str, Any] = {}
    if named and (head is None or not full_commit(named.group(1)).startswith(head)):
        commit = full_commit(named.group(1))
        out["commit_source"] = "meta.git_head_note"
        out["provenance_note"] = (
            f"meta.git_head ({head}) is not the code that ran: meta.git_head_note names commit "
            f"{named.group(1)}, taken as `commit` by scripts/migrate_results.py"
        )
    elif head:
        commit, out["commit_source"] = full_commit(head), "meta.git_head"
    else:
        commit, _ = last_commit_of(path)
        out["commit_source"] = "git log"
        out["provenance_note"] = (
            "the file records no commit: `commit` is the last commit that wrote it (git log), at or after "
            "the code that produced it"
        )
    accel = meta.get("accelerator")
    on_cuda = str((meta.get("args") or {}).get("device", "cpu")).startswith("cuda")
    return {
        "commit": commit,
        "tightfit_version": tightfit_version(commit),
        "torch_version": meta.get("torch"),
        "transformers_version": None,
        "dirty": None,
        "device": accel if on_cuda and accel else ("cuda" if on_cuda else "cpu"),
        **out,
    }


def provenance_of_text(path: Path, text: str) -> dict[str, Any]:
    commit, utc = last_commit_of(path)
    torch_m = re.search(r"\btorch (\d+\.\d+\.\d+\S*?),", text)
    gpu = re.search(r"\bon (NVIDIA [^;,\n]+)", text)
    device = gpu.group(1).strip() if gpu else ("cuda" if re.search(r"\bon cuda\b", text) else "cpu")
    return {
        "commit": commit,
        "tightfit_version": tightfit_version(commit),
        "torch_version": torch_m.group(1) if torch_m else None,
        "transformers_version": None,
        "dirty": None,
        "device": device,
        "commit_source": "git log",
        "provenance_note": (
            "a text result that records no commit: `commit` is the last commit that wrote it (git log), at "
            "or after the code that produced it; `utc` is that commit's date"
        ),
        "_utc": utc,
    }


def stamp(utc: str) -> str:
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.strptime(utc, "%Y-%m-%d %H:%M:%S"))


def history_name(utc: str, commit: str, stem: str, suffix: str) -> Path:
    return HISTORY / f"{stamp(utc)}_{commit[:7]}_{stem}{suffix}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the moves, change nothing")
    a = ap.parse_args()
    flat = sorted(p for p in RESULTS.iterdir() if p.is_file())
    if not flat:
        print("nothing to migrate: no files directly under benchmarks/results/")
        return
    today = time.strftime("%Y-%m-%d", time.gmtime())
    moves: list[tuple[Path, Path]] = []
    writes: list[tuple[Path, str]] = []
    stems = sorted({p.stem for p in flat})
    for stem in stems:
        files = {p.suffix: p for p in flat if p.stem == stem}
        cited = stem in CITED
        if ".json" in files:
            data = json.loads(files[".json"].read_text())
            prov = provenance_of_json(files[".json"], data["meta"])
            utc = data["meta"].get("utc")
            rec = {"name": stem, **prov, "migrated": True, "migration_date": today, **data}
        elif ".txt" in files:
            text = files[".txt"].read_text()
            prov = provenance_of_text(files[".txt"], text)
            utc = prov.pop("_utc")
            rec = {
                "name": stem,
                **prov,
                "migrated": True,
                "migration_date": today,
                "conditions": {"utc": utc},
                "text": text.splitlines(),
            }
        else:
            raise SystemExit(f"{stem}: neither .json nor .txt; migrate it by hand")
        body = json.dumps(rec, indent=1, default=str) + "\n"
        hist_json = history_name(utc, rec["commit"], stem, ".json")
        writes.append((hist_json, body))
        if cited:
            writes.append((LATEST / f"{stem}.json", body))
            for suffix, p in files.items():
                if suffix != ".json":
                    moves.append((p, LATEST / p.name))
            if ".json" in files:
                moves.append((files[".json"], None))  # replaced by the record written above
        else:
            for suffix, p in files.items():
                if suffix == ".json":
                    moves.append((p, None))
                else:
                    moves.append((p, history_name(utc, rec["commit"], stem, suffix)))
    for dest, _ in writes:
        if dest.exists():
            raise SystemExit(f"{dest} exists: refusing to overwrite (history is append-only)")
    for _src, dest in moves:
        if dest is not None and dest.exists():
            raise SystemExit(f"{dest} exists: refusing to overwrite")
    for dest, body in writes:
        print(f"write {dest.relative_to(ROOT)}")
        if not a.dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(body)
    for src, dest in moves:
        print(
            f"{'remove' if dest is None else 'move'} {src.relative_to(ROOT)}"
            + ("" if dest is None else f" -> {dest.relative_to(ROOT)}")
        )
        if not a.dry_run:
            if dest is None:
                src.unlink()
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(src, dest)


if __name__ == "__main__":
    main()
