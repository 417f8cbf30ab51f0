"""`Sketch`: the configuration `tightfit.convert_` applies to turn linear layers into randomized ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tightfit.convert import config_from_dict
from tightfit.sketch.ops import validate_options

__all__ = ["Sketch"]

SHARED_POLICIES = ("share", "separate")
KEPT_ALIVE_POLICIES = ("skip", "convert")


@dataclass(frozen=True)
class Sketch:
    """Randomized linear layers: keep k = ratio·N token rows of a sketch of each linear input for grad_W.

    ratio/k: how many rows to keep (exactly one; ratio defaults to 0.5 when neither is given).
    sketch: "gaussian" | "rademacher" | "rows" | "norm_rows" (tightfit.sketch.sketches documents each).
    blocks: diagonal blocks of the gaussian/rademacher sketch; None picks them so the sketch costs ~5%.
    min_tokens: below this many tokens a call runs exactly (its sketch would save too little).
    shared: "share" lets layers reading the same tensor (q/k/v) reuse one sketch; "separate" does not.
    kept_alive: with an example batch, layers whose input another op also saves for backward (so
        sketching frees nothing) are "skip"ped (default) or converted anyway ("convert").
    """

    ratio: float | None = None
    k: int | None = None
    # gaussian: the paper's main sketch, unbiased, variance close to the dense Gaussian's at ~5% extra cost
    sketch: str = "gaussian"
    blocks: int | None = None
    min_tokens: int = 0
    shared: str = "share"  # one sketch per input tensor: q/k/v would otherwise keep 3 sketches
    kept_alive: str = "skip"  # converting such a layer costs variance and saves no memory

    def __post_init__(self) -> None:
        if self.ratio is None and self.k is None:
            object.__setattr__(self, "ratio", 0.5)  # the paper's mildest setting: half the rows
        validate_options(self.ratio, self.k, self.sketch, self.blocks)
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative int, got {self.min_tokens!r}")
        if self.shared not in SHARED_POLICIES:
            raise ValueError(f"shared must be one of {SHARED_POLICIES}, got {self.shared!r}")
        if self.kept_alive not in KEPT_ALIVE_POLICIES:
            raise ValueError(f"kept_alive must be one of {KEPT_ALIVE_POLICIES}, got {self.kept_alive!r}")

    def module_options(self) -> dict[str, Any]:
        """Keyword arguments for RandomizedLinear / RandomizedConv1D (without the share object)."""
        return {"ratio": self.ratio if self.k is None else None, "k": self.k, "sketch": self.sketch,
                "blocks": self.blocks, "min_tokens": self.min_tokens}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `Sketch.from_dict(d)` rebuilds an equal config."""
        return {"technique": "sketch", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sketch:
        return config_from_dict(cls, data, "sketch")
