"""Estimates for machines this one is not: N ranks under a fake process group, a CUDA GPU on a CPU-only
torch (attention's GPU kernels, CUDA autocast), and the CLI flags for them."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

import tightfit
from tightfit import cli
from tightfit.errors import InvalidInput
from tightfit.memory import SavedTensorCounter
from tightfit.memory.distributed import ddp_bucket_bytes
from tightfit.memory.fakecuda import CudaDisguise, sdpa_kernel
from tightfit.testing import Block


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 128, d: int = 32, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def _batch() -> torch.Tensor:
    return torch.randint(0, 128, (2, 64))


def test_fsdp2_estimate_keeps_a_shard_of_the_parameter_state():
    one = tightfit.estimate(TinyLM, _batch, optimizer_factory=torch.optim.AdamW)
    eight = tightfit.estimate(
        TinyLM, _batch, optimizer_factory=torch.optim.AdamW, world_size=8, parallel="fsdp2"
    )
    assert (eight.rank, eight.world_size, eight.parallel) == (0, 8, "fsdp2")
    padding = 8 * 4 * 128  # FSDP2 pads each parameter's dim 0 to a multiple of 8 rows (at most 7 rows)
    assert one.params_bytes <= 8 * eight.params_bytes <= one.params_bytes + 8 * padding * 10
    assert eight.grads_bytes == eight.params_bytes
    assert eight.activations_bytes == one.activations_bytes  # gathered parameters are not activations
    assert eight.peak_bytes < one.peak_bytes
    assert not torch.distributed.is_initialized()  # the fake group is gone


def test_ddp_estimate_is_the_plain_step_plus_its_buckets():
    one = tightfit.estimate(TinyLM, _batch, optimizer_factory=torch.optim.AdamW)
    two = tightfit.estimate(TinyLM, _batch, optimizer_factory=torch.optim.AdamW, world_size=2, parallel="ddp")
    assert two.peak_bytes == one.peak_bytes + ddp_bucket_bytes(TinyLM())


def test_estimate_refuses_a_world_without_a_way_to_spread_the_model():
    with pytest.raises(InvalidInput, match="needs parallel"):
        tightfit.estimate(TinyLM, _batch, world_size=4)
    with pytest.raises(InvalidInput, match="parallel must be"):
        tightfit.estimate(TinyLM, _batch, world_size=2, parallel="tp")


@pytest.mark.parametrize(
    ("dtype", "head_dim", "mask", "kernel"),
    [
        (torch.bfloat16, 64, False, "flash"),
        (torch.bfloat16, 64, True, "efficient"),
        (torch.float32, 64, False, "efficient"),
        (torch.bfloat16, 12, False, "math"),
    ],
)
def test_sdpa_takes_the_kernel_the_gpu_would(dtype, head_dim, mask, kernel):
    q = torch.empty(1, 2, 8, head_dim, dtype=dtype)
    assert sdpa_kernel(q, q, torch.ones(8, 8, dtype=torch.bool) if mask else None) == kernel


@pytest.mark.parametrize("mask", [False, True])
def test_fake_cuda_attention_keeps_a_log_sum_exp_not_the_probabilities(mask):
    b, h, t, d = 2, 4, 256, 64
    with FakeTensorMode(), CudaDisguise():
        q, k, v = (
            torch.randn(b, h, t, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in "qkv"
        )
        attn_mask = torch.ones(t, t, dtype=torch.bool, device="cuda").tril() if mask else None
        with SavedTensorCounter(exclude=[q, k, v, attn_mask]) as saved:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.1)
        out.sum().backward()
        assert q.grad is not None and q.grad.shape == q.shape
    kept = b * h * t * d * 2 + b * h * t * 4  # the output and a float32 log-sum-exp per query row
    bias = t * t * 2 if mask else 0  # the boolean mask as an additive bias in bf16, as the GPU makes it
    assert kept <= saved.bytes - bias <= kept + 64  # + the dropout RNG seed and offset
    assert saved.bytes < b * h * t * t * 2 + kept  # never the T x T probabilities with the mask's size


def test_fake_cuda_autocast_follows_cudas_op_lists():
    with FakeTensorMode(), CudaDisguise(autocast=torch.bfloat16):
        x = torch.randn(4, 8, device="cuda")
        lin = nn.Linear(8, 8, device="cuda")
        y = lin(x)
        z = F.layer_norm(y, (8,))
        s = torch.softmax(y, dim=-1)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32 and s.dtype == torch.float32


def test_estimate_for_a_gpu_on_this_cpu_names_the_gpu():
    report = tightfit.estimate(TinyLM, _batch, device="cuda", autocast=torch.bfloat16)
    assert report.device == "cuda:0" and set(report.peak_by_device) == {"cuda:0"}
    cpu = tightfit.estimate(TinyLM, _batch)
    assert report.activations_bytes < cpu.activations_bytes  # bf16 matmul inputs are kept


def test_cli_estimate_per_rank_on_a_fake_gpu(capsys):
    argv = ["profile", "gpt2-tiny", "--batch", "2", "--seq", "32", "--estimate", "--json"]
    assert cli.main([*argv, "--world-size", "4", "--parallel", "fsdp2", "--device", "cuda"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 4 and data["parallel"] == "fsdp2" and data["device"] == "cuda:0"
    assert data["peak_by_device"] == {"cuda:0": data["peak_bytes"]}


def test_cli_rank_options_need_an_estimate(capsys):
    assert cli.main(["profile", "gpt2-tiny", "--world-size", "2", "--parallel", "ddp"]) == 2
    assert "add --estimate" in capsys.readouterr().err
    assert cli.main(["profile", "gpt2-tiny", "--estimate", "--world-size", "2"]) == 2
    assert "needs --parallel" in capsys.readouterr().err


def test_a_plan_with_regions_across_blocks_is_refused_for_fsdp2():
    from types import SimpleNamespace

    from tightfit.errors import UserError
    from tightfit.memory.distributed import check_regions_fit_units
    from tightfit.remat.options import STORE, InSegment, Segment

    model = TinyLM()
    model.plan = SimpleNamespace(decisions=[SimpleNamespace(path="blocks.0", option=STORE)])
    check_regions_fit_units(model)  # one block per region: fine
    model.plan.decisions = [
        SimpleNamespace(path="blocks.0", option=Segment(2)),
        SimpleNamespace(path="blocks.1", option=InSegment()),
    ]
    with pytest.raises(UserError, match=r"RematConfig\(segments=False\)"):
        check_regions_fit_units(model)


class _Blocks(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 64)) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x.float().pow(2).mean()


def test_fake_cuda_autocast_is_replayed_by_checkpoints_recompute():
    def run(checkpointed: bool, autocast: torch.dtype | None) -> tightfit.MemoryReport:
        return tightfit.estimate(
            lambda: _Blocks(checkpointed), lambda: torch.randn(32, 64), device="cuda", autocast=autocast
        )

    plain, ckpt, ckpt32 = run(False, torch.bfloat16), run(True, torch.bfloat16), run(True, None)
    assert ckpt.device == "cuda:0"
    # a checkpointed block keeps its input only: the output of the block before (bf16: a Linear's, under
    # autocast; the first block's input is the batch, not an activation); the rest is recomputed in the
    # backward. The loss keeps its float32 input for pow.
    loss_input = 32 * 64 * 4
    assert ckpt.activations_bytes == 2 * 32 * 64 * 2 + loss_input < plain.activations_bytes
    assert ckpt32.activations_bytes == 2 * 32 * 64 * 4 + loss_input
    assert ckpt.peak_bytes < plain.peak_bytes


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))  # nested family: not units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(e(x) for e in self.experts)


class _EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder = nn.ModuleList(_Expert() for _ in range(3))
        self.decoder = nn.ModuleList(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True) for _ in range(2))
        self.acts = nn.Sequential(nn.GELU(), nn.GELU())  # no parameters: not units


def test_fsdp2_units_are_every_family_of_blocks_outermost_first():
    from tightfit.memory.distributed import find_blocks

    model = _EncoderDecoder()
    names = {id(m): n for n, m in model.named_modules()}
    units = [names[id(b)] for b in find_blocks(model)]
    assert units == ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1"]


def test_fake_cuda_autocast_estimate_of_a_remat_plan():
    from tightfit.remat import execute

    torch.manual_seed(0)
    model, x = _Blocks(False), torch.randn(512, 64)  # activations well above the parameters
    plain = tightfit.profile(model, x, time_steps=0)
    budget = plain.baseline_bytes + (plain.peak_bytes - plain.baseline_bytes) * 2 // 3
    plan = tightfit.rematerialize(model, x, budget, config=tightfit.RematConfig(flop_rate=1e10)).plan
    assert any(d.option.checkpointed for d in plan.decisions)  # something is recomputed in the backward

    def planned() -> nn.Module:
        m = _Blocks(False)
        execute.apply(m, plan.options)
        return m

    def batch() -> torch.Tensor:
        return torch.randn(512, 64)

    whole = tightfit.estimate(lambda: _Blocks(False), batch, device="cuda", autocast=torch.bfloat16)
    est = tightfit.estimate(planned, batch, device="cuda", autocast=torch.bfloat16)
    assert est.device == "cuda:0" and est.activations_bytes < whole.activations_bytes
