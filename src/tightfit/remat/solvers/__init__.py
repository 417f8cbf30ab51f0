"""Rematerialization solvers: pure algorithms (numpy/scipy, no torch).

:class:`ChainCosts` is the chain DP that plans real models for ``tightfit.rematerialize`` (measured per-block
options plus one-level segments). The others are reference algorithms, tested against brute force and
against each other, that do not drive ``rematerialize``:
problems: :class:`Chain` (stages with tape options) and :class:`Dag` (forward graph with implied
backward); memory models in :mod:`.problems`. Solvers: :func:`solve_chain` (Rotor DP), :func:`revolve`
(binomial checkpointing), :func:`solve_bptt` (Gruslys et al.), :func:`solve_dag_ilp` (Checkmate on
HiGHS), :func:`solve_dag_lowerset` (Kusumoto et al.). :func:`simulate` checks any schedule.
"""

from .bptt import solve_bptt
from .chain_costs import Assignment, ChainCosts, OptionCost, Read
from .chain_dp import StageDecision, chain_min_memory, solve_chain, stage_decisions
from .dag import JointGraph, bwd_index, joint_graph
from .errors import InfeasibleBudget, InvalidSchedule
from .ilp import solve_dag_ilp
from .lowerset import lower_sets, solve_dag_lowerset, strategy_ops
from .problems import (
    Backward,
    Chain,
    Compute,
    Dag,
    ForwardCheckpoint,
    ForwardNoSave,
    ForwardTape,
    Free,
    Loss,
    Op,
    Release,
    Schedule,
    TapeOption,
    store_all_ops,
)
from .revolve import beta, revolve, revolve_extra_forwards
from .simulate import simulate, store_all_peak

__all__ = [
    # the chain DP behind rematerialize
    "ChainCosts",
    "OptionCost",
    "Read",
    "Assignment",
    # problems and schedules
    "Chain",
    "TapeOption",
    "Dag",
    "Schedule",
    "Op",
    "ForwardNoSave",
    "ForwardCheckpoint",
    "ForwardTape",
    "Loss",
    "Backward",
    "Free",
    "Compute",
    "Release",
    "store_all_ops",
    # chain solvers
    "solve_chain",
    "chain_min_memory",
    "StageDecision",
    "stage_decisions",
    "revolve",
    "revolve_extra_forwards",
    "beta",
    "solve_bptt",
    # DAG solvers
    "JointGraph",
    "joint_graph",
    "bwd_index",
    "solve_dag_ilp",
    "solve_dag_lowerset",
    "lower_sets",
    "strategy_ops",
    # checking
    "simulate",
    "store_all_peak",
    # errors
    "InfeasibleBudget",
    "InvalidSchedule",
]
