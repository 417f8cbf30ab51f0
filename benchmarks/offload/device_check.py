"""Device checks of the offload fixes the CPU suite runs only through `SimulatedTarget`: the real
`CudaTarget` with pinned buffers, in one short script (about a minute on one GPU).

1. varying sequence lengths: gradients bit-identical to the model without offload at every step, the
   pinned pool bounded by two steps' moved bytes, every pool buffer pinned;
2. a prefetch that is never read (the gradient stops before block 0): the pool is released (every
   buffer unpinned with ``cudaHostUnregister``, return code checked) with no error;
3. a tensor every block saves (rotary-style): the backward's prefetch order starts at the last block;
4. ``torch.save``/``torch.load`` of a converted model: it loads converted and trains exactly;
5. the ``tests/offload`` CUDA test (exact pinned pool, lower allocator peak).

    python -m benchmarks.offload.device_check             # on a GPU
    python -m benchmarks.offload.device_check --simulated  # CPU: the same checks on SimulatedTarget

Prints one line per check and exits non-zero on the first failure. It writes no results file: it checks
behaviour, it measures nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import subprocess
import sys

import torch
from torch import nn

import tightfit
from tightfit.offload import Offload, SimulatedTarget, offloader_of


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(self.ln(x))
        if pos is not None:
            h = h * pos
        return x + self.drop(self.out(torch.nn.functional.gelu(h)))


class _Net(nn.Module):
    def __init__(self, d: int, n: int, shared: bool = False) -> None:
        super().__init__()
        self.d = d
        self.shared = shared
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.randn(*x.shape[:-1], 4 * self.d, device=x.device) if self.shared else None
        for block in self.blocks:
            x = block(x, pos)
        return x.square().mean()


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(1)
        model(x).backward()
    return [p.grad.clone() for p in model.parameters()]


def _check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated", action="store_true", help="CPU with SimulatedTarget")
    args = parser.parse_args()
    device = torch.device("cpu" if args.simulated else "cuda")
    target = SimulatedTarget(copy_delay=2) if args.simulated else None
    d = 64 if args.simulated else 512
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (simulated target)'}, "
          f"torch {torch.__version__}")

    def convert(model: nn.Module, config: Offload, **kw: object) -> object:
        return tightfit.convert_(model, config, target=target, **kw)

    # 1. varying sequence lengths
    torch.manual_seed(0)
    model = _Net(d, 6).to(device)
    ref = copy.deepcopy(model)
    convert(model, Offload(min_bytes=0))
    off = offloader_of(model)
    moved = []
    for T in (128, 160, 192, 224, 176):
        x = torch.randn(4, T, d, device=device)
        off.reset_stats()
        same = all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(model, x)))
        _check(f"1. T={T} gradients bit-identical", same)
        gc.collect()
        moved.append(off.stats.offloaded_bytes)
        bound = moved[-1] + (moved[-2] if len(moved) > 1 else 0)
        _check(f"1. T={T} pool bounded", off.host_bytes <= bound, f"(pool {off.host_bytes} <= {bound})")
    pinned = args.simulated or all(b.is_pinned() for b in off.pool.free_buffers())
    _check("1. pool buffers pinned", pinned)

    # 2. a prefetch never read, then the pool released
    model = _Net(d, 3).to(device)
    convert(model, Offload(min_bytes=0, keep_last=0, prefetch=2))
    off = offloader_of(model)
    h = torch.randn(4, 128, d, device=device, requires_grad=True)
    h1 = model.blocks[0](h)
    h2 = model.blocks[1](h1)
    loss = model.blocks[2](h2).square().mean()
    torch.autograd.grad(loss, h2)
    del h1, h2, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
    off.pool.release()
    _check("2. pool released after an unread prefetch", off.host_bytes == 0 and off.pool.in_use == 0)

    # 3. a tensor every block saves
    model = _Net(d, 4, shared=True).to(device)
    ref = copy.deepcopy(model)
    convert(model, Offload(min_bytes=0), trace=True)
    off = offloader_of(model)
    x = torch.randn(4, 128, d, device=device)
    same = all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(model, x)))
    order = [e for e in off.trace if e[0] != "d2h"]
    _check("3. shared tensor: gradients bit-identical", same)
    first = [("unpack", 3), ("fetch", 3), ("fetch", 2)]
    _check("3. shared tensor: prefetch order from the last block", order[:3] == first, str(order[:4]))

    # 4. pickling
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    same = all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(loaded, x)))
    _check("4. torch.save/load of a converted model", same and offloader_of(loaded).stats.offloaded > 0)

    # 5. the CUDA test of the suite
    if device.type == "cuda":
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/offload/test_mechanism.py", "-k", "cuda"])
        _check("5. tests/offload CUDA test", code == 0)


if __name__ == "__main__":
    main()
