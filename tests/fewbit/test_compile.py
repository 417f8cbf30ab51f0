"""torch.compile(fullgraph=True) through the few-bit ops (aot_eager: real AOTAutograd graphs, no C++ build).

An inductor run was checked by hand (see python -m benchmarks.fewbit.ops --inductor-check); it is not repeated
here because a cold inductor compile takes about a minute on the shared 2-core machine.
"""

import torch
import torch.nn.functional as F

import tightfit
from tightfit.fewbit.gated import swiglu
from tightfit.fewbit.lookup import get_table


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(8, 16)
        self.act = tightfit.nn.GELU(bits=2)
        self.out = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.out(self.act(self.a(x)) + swiglu(self.a(x), self.b(x), bits=3))


def test_compile_fullgraph_aot_eager_matches_eager():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(5, 8)
    eager_loss = model(x).square().sum()
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x).square().sum()
    loss.backward()
    assert torch.equal(loss, eager_loss)
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.equal(p.grad, g)
    # and the few-bit backward really ran: the activation's input gradient is the table gather
    t = get_table("gelu", 2)
    h = torch.randn(7, requires_grad=True)
    f = torch.compile(lambda v: tightfit.functional.gelu(v, bits=2), fullgraph=True, backend="aot_eager")
    y = f(h)
    assert torch.equal(y, F.gelu(h.detach()))
    y.sum().backward()
    assert torch.equal(h.grad, t.levels.float()[t.encode(h.detach())])
