"""Rematerialization solvers: pure algorithms (numpy/scipy, no torch).

Problems: :class:`Chain` (stages with tape options) and :class:`Dag` (forward graph with implied
backward); memory models in :mod:`.problems`. Solvers: :func:`solve_chain` (Rotor DP), :func:`revolve`
(binomial checkpointing), :func:`solve_bptt` (Gruslys et al.), :func:`solve_dag_ilp` (Checkmate on
HiGHS), :func:`solve_dag_lowerset` (Kusumoto et al.). :func:`simulate` checks any schedule.
"""

from .chain_dp import StageDecision, chain_min_memory, solve_chain, stage_decisions
from .errors import InfeasibleBudget, InvalidSchedule
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
from .simulate import simulate

__all__ = [
    # problems and schedules
    "Chain", "TapeOption", "Dag", "Schedule", "Op",
    "ForwardNoSave", "ForwardCheckpoint", "ForwardTape", "Loss", "Backward", "Free", "Compute", "Release",
    "store_all_ops",
    # chain solvers
    "solve_chain", "chain_min_memory", "StageDecision", "stage_decisions",
    # checking
    "simulate",
    # errors
    "InfeasibleBudget", "InvalidSchedule",
]
