"""Op-level remat options: the op sequence of a block is captured with its costs, views/in-place chains and
random ops are grouped, and ``keep-ops`` options keep what they say with gradients identical to autograd."""

from __future__ import annotations

import pytest
import torch

from tightfit.memory import SavedTensorCounter
from tightfit.remat import execute
from tightfit.remat.blocks import find_blocks
from tightfit.remat.execute import keep_ops_option
from tightfit.remat.measure import measure_group, op_options, record_units
from tightfit.remat.options import RECOMPUTE, STORE, KeepOps, Option, parse_option
from tightfit.testing import build, clone, grads_after_step, same_grads

from .test_execute import Net, _x


def _units_of_block():
    model, x = Net().train(), _x()
    group = find_blocks(model, x).groups[0]
    return model, x, group, record_units(group)


def test_units_group_dropout_noise_and_cover_every_kept_op_once() -> None:
    _, _, _, profile = _units_of_block()
    units = profile.units
    assert units
    ops = [i for u in units for i in u.ops]
    assert len(ops) == len(set(ops))  # an op is in one unit
    randoms = [u for u in units if u.random]
    assert len(randoms) == 1  # the block's dropout: bernoulli_ and the in-place scaling of its noise
    assert len(randoms[0].ops) >= 2 and randoms[0].bytes == 2 * 10 * 96 * 4  # one float per element
    assert all(u.bytes >= 0 and u.seconds >= 0 for u in units)
    assert sum(u.bytes for u in units) > 0


def test_keep_ops_options_give_identical_gradients_and_keep_between_recompute_and_store() -> None:
    model, x, _, profile = _units_of_block()
    options = op_options(profile)
    assert options and all(isinstance(o, KeepOps) for o in options)
    reference = grads_after_step(clone(model), x)

    def saved(option: Option) -> int:
        m = clone(model)
        execute.apply(m, {f"blocks.{i}": [option] for i in range(3)})
        with SavedTensorCounter(exclude=[m, x]) as c:
            loss = m(x)
        del loss
        return c.bytes

    keeps = {o: saved(o) for o in (STORE, RECOMPUTE, *options)}
    for option in options:
        m = clone(model)
        execute.apply(m, {f"blocks.{i}": [option] for i in range(3)})
        assert same_grads(reference, grads_after_step(m, x)), option
        assert keeps[RECOMPUTE] < keeps[option] < keeps[STORE], (option, keeps)
    assert [keeps[o] for o in options] == sorted(keeps[o] for o in options)  # larger fractions keep more


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-1b-tiny", "resnet50-tiny"])
def test_generated_options_are_measured_exact_on_zoo_blocks(name: str) -> None:
    model, batch = build(name)
    group = find_blocks(model, batch).groups[0]
    costs = measure_group(group, reps=1)
    generated = [o for o in costs if isinstance(o, KeepOps)]
    assert generated, f"no op-level options for {group.path}"
    for o in generated:
        assert costs[o].exact, o
        assert costs[RECOMPUTE].keep <= costs[o].keep < costs[STORE].keep  # others are dropped


def test_option_names_round_trip_and_bad_ones_are_rejected() -> None:
    ops = ["aten.mm.default", "aten.gelu.default"] * 4
    option = keep_ops_option([7, 3, 3], ops)
    assert option.key.startswith("keep-ops:3,7@8:") and parse_option(option.key) == option
    assert option.indices == frozenset({3, 7}) and option.count == 8
    assert option.label == "keep 2 ops" and STORE.label == "store"
    for bad in ("keep-ops:1,x@8:ab", "keep-ops:1,2"):
        with pytest.raises(ValueError, match="malformed option"):
            parse_option(bad)
    model = Net()
    with pytest.raises(ValueError, match="unknown remat option"):
        execute.apply(model, {"blocks.0": ["keep-some"]})
    assert execute.applied(model) == {}


@pytest.mark.parametrize("which", [0, -1])
def test_keep_ops_under_torch_compile_keep_gradients_identical(which: int) -> None:
    """Compiled traces see other ops than eager (the indices do not apply): matmuls and random ops are
    kept there, so dropout is not re-drawn in the compiled backward."""
    torch._dynamo.reset()
    model, batch = build("gpt2-tiny", n_layer=2)
    ref = clone(model)
    group = find_blocks(model, batch).groups[0]
    option = op_options(record_units(group))[which]
    assert isinstance(option, KeepOps)
    execute.apply(model, {p: [option] for p in ("transformer.h.0", "transformer.h.1")})
    compiled = torch.compile(model, backend="aot_eager")
    assert same_grads(grads_after_step(ref, batch), grads_after_step(compiled, batch))
    torch._dynamo.reset()


def test_a_call_running_other_ops_than_measured_runs_again_under_recompute() -> None:
    """Op positions are only meaningful for the measured op sequence: under autocast (extra casts) the
    block runs other ops; the call runs again under recompute (a planner measuring it gets an error)."""
    model, x, _, profile = _units_of_block()
    option = op_options(profile)[0]
    execute.apply(model, {f"blocks.{i}": [option] for i in range(3)})
    grads_after_step(model, x)  # the measured context: fine
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with execute.strict_op_sequences(), pytest.raises(execute.OpSequenceError, match="keep-ops"):
            model(x)
        with pytest.warns(execute.OpSequenceWarning, match="runs under recompute"):
            model(x)
