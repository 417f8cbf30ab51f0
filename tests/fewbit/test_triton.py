"""The Triton few-bit backend: its kernels under Triton's interpreter (`tests/fewbit/triton_cases.py`, run
in a subprocess with ``TRITON_INTERPRET=1``), and the fallbacks when Triton is missing or cannot run.

Triton is a dev/test dependency and optional at runtime: ``import tightfit`` never imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tightfit
from tightfit.fewbit import codec

CASES = Path(__file__).with_name("triton_cases.py")


def test_triton_kernels_under_the_interpreter():
    """Codes and backward of the Triton path equal the reference for every function family x fp32/bf16/
    fp16 x b in {1, 2, 3, 5, 8} x lengths 1, 7, 1,000,003 x a non-contiguous input (see triton_cases)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("TIGHTFIT_FEWBIT_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(CASES)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=CASES.parents[2])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_invalid_backend_name_is_a_clear_error(monkeypatch):
    codec.set_backend(None)
    monkeypatch.setenv("TIGHTFIT_FEWBIT_BACKEND", "cuda-magic")
    want = "TIGHTFIT_FEWBIT_BACKEND='cuda-magic'.*valid: auto, native, torch, triton"
    with pytest.raises(ValueError, match=want):
        tightfit.fewbit.backend()
    with pytest.raises(ValueError, match="valid: auto, native, torch, triton"):
        codec.set_backend("cuda-magic")
    monkeypatch.setenv("TIGHTFIT_FEWBIT_BACKEND", "torch")
    assert tightfit.fewbit.backend("cpu") == "torch"
    codec.set_backend("auto")  # the argument overrides the environment
    try:
        assert tightfit.fewbit.backend("cpu") == ("native" if codec._native.available() else "torch")
    finally:
        codec.set_backend(None)


def test_unavailable_triton_falls_back_with_a_note(monkeypatch):
    monkeypatch.setattr(codec, "_triton_state", {"error": "Triton cannot be imported (ImportError: test)"})
    monkeypatch.setattr(codec, "_notes", [])
    monkeypatch.setenv("TIGHTFIT_FEWBIT_BACKEND", "triton")
    codec.set_backend(None)
    with pytest.warns(RuntimeWarning, match="backend 'triton' was requested"):
        chosen = codec.backend("cpu")
    assert chosen in ("native", "torch") and "ImportError: test" in codec.backend_notes()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # noted once: no second warning
        x = torch.randn(33, requires_grad=True)
        tightfit.nn.GELU(bits=2)(x).sum().backward()
    # CUDA tensors get the pure-torch codec, noted once (no CUDA here: the note says why)
    with pytest.warns(RuntimeWarning, match="pure-torch codec"):
        assert codec._auto("cuda") == "torch"


def test_import_never_loads_triton_and_missing_triton_is_not_an_error():
    """``import tightfit`` does not import Triton; with Triton missing, a forced 'triton' backend falls
    back with a warning and the op runs."""
    code = (
        "import sys, warnings\n"
        "import tightfit, torch\n"
        "imported = 'triton' in sys.modules\n"
        "sys.modules['triton'] = None\n"  # from here on, import triton raises ImportError
        "x = torch.randn(64, requires_grad=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    tightfit.nn.SiLU(bits=2)(x).sum().backward()\n"
        "ok = torch.equal(x.grad, tightfit.fewbit.get_table('silu', 2).levels.float()[\n"
        "    tightfit.fewbit.get_table('silu', 2).encode(x.detach())])\n"
        "print(tightfit.fewbit.backend('cpu'), imported, ok,\n"
        "      any('Triton cannot be imported' in str(m.message) for m in w))\n"
    )
    env = dict(os.environ, TIGHTFIT_FEWBIT_BACKEND="triton")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    backend, *flags = out.stdout.split()
    assert backend in ("native", "torch") and flags == ["False", "True", "True"], out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (triton_cases: the kernels on CPU)")
def test_triton_on_cuda_matches_the_reference():
    """On a GPU: the automatic backend is Triton, and its codes and backward equal the reference codec."""
    pytest.importorskip("triton")
    codec.set_backend(None)
    assert tightfit.fewbit.backend("cuda") == "triton", tightfit.fewbit.backend_notes()
    g = torch.Generator().manual_seed(0)
    for bits in (1, 2, 3, 5, 8):
        borders = torch.sort(torch.randn((1 << bits) - 1, dtype=torch.float64, generator=g)).values
        levels = torch.randn(1 << bits, dtype=torch.float64, generator=g)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for n in (1, 7, 1_000_003):
                x, grad, b = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
                want = codec.encode_reference(x, borders, bits) if n < 100 else codec._encode_torch(
                    x, codec.compare_borders(borders, dtype), bits)
                assert torch.equal(codec.encode(x.cuda(), borders.cuda(), bits).cpu(), want)
                assert torch.equal(codec.decode_mul(want.cuda(), levels, grad.cuda(), bits, b.cuda()).cpu(),
                                   codec._decode_mul_torch(want, levels, grad, bits, b))
