"""`tightfit plan` (CLI wiring functions) and --estimate planning under fake tensors."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import tightfit.zoo as zoo
from tightfit.cli import CliError, build_parser
from tightfit.remat import Planner, estimate_planner, execute
from tightfit.testing import step_peak


def _args(*argv: str) -> object:
    return build_parser().parse_args(["plan", *argv])


def test_plan_command_prints_the_plan_and_plots(tmp_path, capsys) -> None:  # noqa: ANN001
    plot = tmp_path / "memory.png"
    args = _args("gpt2-tiny", "--budget", "min", "--batch", "4", "--seq", "64", "--json", "--plot", str(plot))
    assert args._run(args) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[: out.rindex("}") + 1])
    assert plan["measured_peak"] <= plan["budget"] == plan["min_budget"] < plan["baseline_peak"]
    assert any(d["option"] != "store" for d in plan["decisions"])
    assert plot.stat().st_size > 10_000


def test_plan_command_planner_flags(capsys) -> None:  # noqa: ANN001
    args = _args("lstm-tiny", "--budget", "min", "--no-segments", "--no-op-level", "--free-output", "--json")
    assert args._run(args) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[: out.rindex("}") + 1])
    options = {d["option"] for d in plan["decisions"]}
    assert not any(o.startswith(("segment", "keep-ops")) for o in options), options
    assert any("frees the model output" in n for n in plan["notes"])


def test_plan_command_user_errors() -> None:
    args = _args("gpt2-tiny", "--budget", "1KiB")
    with pytest.raises(CliError, match="smallest feasible budget"):
        args._run(args)
    args = _args("gpt2-tiny", "--budget", "lots")
    with pytest.raises(CliError, match="--budget"):
        args._run(args)
    args = _args("gpt2-tiny", "--budget", "min", "--estimate", "--compile", "aot_eager")
    with pytest.raises(CliError, match="--compile"):
        args._run(args)
    for bad in ("x0.5", "xfast"):
        args = _args("gpt2-tiny", "--budget", bad)
        with pytest.raises(CliError, match="step-time ratio"):
            args._run(args)


def test_plan_command_budget_as_a_step_time_ratio(capsys) -> None:  # noqa: ANN001
    args = _args("gpt2-tiny", "--budget", "x3", "--batch", "4", "--seq", "64", "--json")
    assert args._run(args) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[: out.rindex("}") + 1])
    assert plan["min_budget"] <= plan["budget"] < plan["baseline_peak"]
    assert plan["measured_peak"] <= plan["budget"]


def test_estimate_matches_the_real_planner_on_memory() -> None:
    model_factory, batch_factory = zoo.get("gpt2-tiny")
    make_model = functools.partial(model_factory, n_layer=4)
    make_batch = functools.partial(batch_factory, batch_size=4, seq_len=64)
    fake, mode = estimate_planner(make_model, make_batch)
    torch.manual_seed(0)
    model, batch = make_model().train(), make_batch()
    real = Planner(model, batch)
    assert fake.baseline_peak == real.baseline_peak  # FakeTensorMode is byte-exact without remat
    assert abs(fake.frugal_peak - real.frugal_peak) <= 0.01 * real.frugal_peak
    budget = (real.min_budget + real.baseline_peak) // 2
    with mode:
        plan = fake.plan(budget)
    assert plan.checkpointed and plan.measured_peak <= budget
    assert plan.time > fake.baseline_time  # FLOP-based: recomputation costs FLOPs
    execute.apply(model, plan.options)  # the estimated plan runs on the real model within ~1%
    assert step_peak(model, batch) <= budget * 1.01


def test_plan_command_estimate_names_its_flop_rate(capsys) -> None:  # noqa: ANN001
    args = _args("gpt2-tiny", "--budget", "min", "--estimate", "--flop-rate", "2e11", "--json")
    assert args._run(args) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[: out.rindex("}") + 1])
    assert plan["measured_peak"] <= plan["budget"] == plan["min_budget"]
    assert any("--estimate" in n and "2e+11 FLOP/s" in n for n in plan["notes"]), plan["notes"]
