"""`FewBit`: the configuration of few-bit activation gradients for `tightfit.convert_`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tightfit.fewbit._bits import check_bits
from tightfit.fewbit.activations import spec_for_name

__all__ = ["FewBit", "DEFAULT_BITS"]

# Why 2 bits (4 levels): the saved input of an activation shrinks 16x against fp32 (8x against bf16), and
# the fitted GELU/SiLU tables already follow the derivative closely (weighted L2 error about 8e-3 under
# N(0,1); data/tables.json holds every table's error). 1 bit is a coarse step function; 3-4 bits cost
# more memory for a smaller further gain. Training accuracy against the exact baseline is measured by
# benchmarks/fewbit/convergence.py, with results in docs/benchmarks/fewbit.md.
DEFAULT_BITS = 2


@dataclass(frozen=True)
class FewBit:
    """Replace activations with few-bit-backward versions: ``tightfit.convert_(model, FewBit(bits=2))``.

    - ``bits``: code width per element, 1..8 (piecewise-linear functions use their exact 1-2 bit table).
    - ``calibration``: a `tightfit.fewbit.calibrate.Calibration`; each converted module then gets a table
      fitted to its own recorded pre-activations instead of the N(0,1) weight. Not serialised by
      ``to_dict`` (it holds data); ``to_dict`` records only whether one was given.
    - ``include``: registry names (or ACT2FN names) to convert; None means every supported activation.
    - ``exclude``: registry names never converted (reported as skipped).
    - ``gated``: also fuse gated MLPs (Llama-style ``down(act(gate(x)) * up(x))``) into the few-bit
      SwiGLU/GEGLU op.
    - ``on_unsupported``: "skip" (report activation-like modules we cannot convert) or "error".
    """

    bits: int = DEFAULT_BITS
    calibration: Any = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)
    gated: bool = True
    on_unsupported: str = "skip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits, "FewBit.bits"))
        if self.on_unsupported not in ("skip", "error"):
            raise ValueError(f"FewBit.on_unsupported must be 'skip' or 'error', got {self.on_unsupported!r}")
        if self.include is not None:
            object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for name in (*(self.include or ()), *self.exclude):
            spec_for_name(name)  # raises a clear ValueError listing valid names

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = self.calibration is not None
        d["include"] = list(self.include) if self.include is not None else None
        d["exclude"] = list(self.exclude)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FewBit:
        d = dict(d)
        if d.pop("calibration", None):
            raise ValueError(
                "this FewBit config was made with a calibration; pass it again: "
                "FewBit.from_dict(d | {'calibration': None}) then dataclasses.replace(...)"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FewBit field(s) {sorted(unknown)}; valid: {sorted(known)}")
        if d.get("include") is not None:
            d["include"] = tuple(d["include"])
        if "exclude" in d:
            d["exclude"] = tuple(d["exclude"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> FewBit:
        return cls.from_dict(json.loads(text))
