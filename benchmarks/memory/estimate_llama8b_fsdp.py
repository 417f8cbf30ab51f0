"""Per-rank memory of a Llama-3-8B-sized model under FSDP2 on 8 GPUs, estimated on this CPU.

    python -m benchmarks.memory.estimate_llama8b_fsdp [--world-size 8] [--seq 4096] [--layers 32]

The model is built from Llama-3-8B's configuration (random init, no weights) in bfloat16 under fake
tensors; the step is one rank's (batch 1, sequence 4096, AdamW) with ``fully_shard`` on every decoder
layer and then the root, under a fake process group, on a fake CUDA device (attention takes the GPU's
flash / memory-efficient kernel). Printed beside it: the single-rank estimate of the same step, and the
parameters plus optimizer state divided by the world size. Also the wall time and the process's peak RSS
of the estimate (the issue's targets: < 60 s, < 2 GiB): RSS is reported only as the cost of the
estimator itself (nothing is allocated for the model); tightfit never measures training memory with it.

Results: benchmarks/results/latest/estimate_llama8b_fsdp.{json,txt}.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import tightfit
from benchmarks.common import results
from tightfit.sizes import format_size

# meta-llama/Meta-Llama-3-8B config.json
LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def factories(layers: int, batch: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(LLAMA3_8B | {"num_hidden_layers": layers}), attn_implementation="sdpa")

    def model_factory() -> torch.nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly (inv_freq stays float32)
        try:
            return LlamaForCausalLM(config).train()
        finally:
            torch.set_default_dtype(previous)

    def batch_factory() -> dict:
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        return {"input_ids": ids, "labels": ids, "use_cache": False}

    return model_factory, batch_factory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 in Llama-3-8B)")
    parser.add_argument("--results", default="estimate_llama8b_fsdp", help="name in results/latest/")
    args = parser.parse_args()
    with results.Transcript() as transcript:
        data = run(args)
    results.say_written(results.write(args.results, data, text=transcript.text))


def run(args: argparse.Namespace) -> dict:
    model_factory, batch_factory = factories(args.layers, args.batch, args.seq)

    def optimizer(params):  # foreach: one op per step instead of one per parameter, same state
        return torch.optim.AdamW(params, foreach=True)

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    rank = tightfit.estimate(
        model_factory,
        batch_factory,
        optimizer_factory=optimizer,
        world_size=args.world_size,
        parallel="fsdp2",
        device="cuda",
    )
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    start_single = time.perf_counter()
    single = tightfit.estimate(model_factory, batch_factory, optimizer_factory=optimizer, device="cuda")
    single_wall = time.perf_counter() - start_single
    rss_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    n = args.world_size
    state = single.params_bytes + single.optimizer_bytes
    print(rank)
    print()
    print(
        f"Llama-3-8B-sized ({args.layers} layers), bf16 parameters, AdamW, batch {args.batch}, "
        f"seq {args.seq}, fake CUDA device"
    )
    print(f"{'':34}{'per rank (FSDP2, ' + str(n) + ' ranks)':>28}{'one rank, no sharding':>24}")
    for name, a, b in (
        ("parameters", rank.params_bytes, single.params_bytes),
        ("gradients", rank.grads_bytes, single.grads_bytes),
        ("optimizer state", rank.optimizer_bytes, single.optimizer_bytes),
        ("activations saved for backward", rank.activations_bytes, single.activations_bytes),
        ("peak", rank.peak_bytes, single.peak_bytes),
    ):
        print(f"{name:34}{format_size(a):>28}{format_size(b):>24}")
    print(f"(parameters + optimizer state) / {n}: {format_size(state // n)}")
    print(f"per-rank peak at {rank.peak_phase}, op {rank.peak_op}, module {rank.peak_module!r}")
    print(
        f"per-rank estimate took {wall:.1f} s wall, {cpu:.1f} s CPU (target < 60 s); "
        f"single-rank {single_wall:.1f} s"
    )
    print(
        f"process max RSS after the per-rank estimate {format_size(rss)} (target < 2 GiB); "
        f"after both {format_size(rss_all)}"
    )
    return {
        "settings": vars(args)
        | {"optimizer": "AdamW(foreach=True)", "dtype": "bfloat16", "device": "fake cuda", "mode": "train"},
        "per_rank": {
            "params_bytes": rank.params_bytes,
            "grads_bytes": rank.grads_bytes,
            "optimizer_bytes": rank.optimizer_bytes,
            "activations_bytes": rank.activations_bytes,
            "peak_bytes": rank.peak_bytes,
            "peak_phase": str(rank.peak_phase),
            "peak_op": str(rank.peak_op),
            "wall_s": wall,
            "cpu_s": cpu,
            "max_rss_bytes": rss,
        },
        "single_rank": {
            "params_bytes": single.params_bytes,
            "optimizer_bytes": single.optimizer_bytes,
            "activations_bytes": single.activations_bytes,
            "peak_bytes": single.peak_bytes,
            "wall_s": single_wall,
        },
        "params_plus_optimizer_over_world": state // n,
        "report": str(rank),
    }


if __name__ == "__main__":
    main()
