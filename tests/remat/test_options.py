"""The remat option types: one key, label, description and validation each; JSON keys round-trip."""

from __future__ import annotations

import pytest

from tightfit.remat.options import (
    DEFAULT_OPTIONS,
    IN_SEGMENT,
    NAMED_OPTIONS,
    RECOMPUTE,
    SAVE_LINEAR,
    SAVE_MATMUL,
    STORE,
    InSegment,
    KeepOps,
    Option,
    Recompute,
    SavePolicy,
    Segment,
    Store,
    parse_option,
    segment_length,
)

EVERY_KIND = [STORE, SAVE_MATMUL, SAVE_LINEAR, KeepOps(frozenset({0, 5}), 9, "0123abcdef99"), RECOMPUTE]
EVERY_KIND += [Segment(3), IN_SEGMENT]


def test_every_option_subclass_is_covered_here() -> None:
    # remat's own kinds (the planner adds ``tightfit.planner.variants.Combined``, tested there)
    own = {c for c in Option.__subclasses__() if c.__module__ == "tightfit.remat.options"}
    assert {type(o) for o in EVERY_KIND} == own


@pytest.mark.parametrize("option", EVERY_KIND, ids=str)
def test_keys_round_trip_and_every_option_describes_itself(option: Option) -> None:
    assert parse_option(option.key) == option and parse_option(option) is option
    assert hash(parse_option(option.key)) == hash(option)
    assert option.label and option.description and str(option) == option.key
    assert option.checkpointed == (not isinstance(option, Store))


def test_the_json_keys_of_saved_plans_are_unchanged() -> None:
    assert [o.key for o in DEFAULT_OPTIONS] == list(NAMED_OPTIONS)
    assert NAMED_OPTIONS == ("store", "save-matmul", "save-linear", "recompute")
    assert (Segment(4).key, IN_SEGMENT.key) == ("segment:4", "in-segment")
    assert KeepOps(frozenset({7, 3}), 8, "abc").key == "keep-ops:3,7@8:abc"
    assert parse_option("keep-ops:@8:abc") == KeepOps(frozenset(), 8, "abc")


def test_labels_and_units() -> None:
    assert KeepOps(frozenset({1, 2}), 4, "d").label == "keep 2 ops" and Segment(5).label == "segment of 5"
    assert [segment_length(o) for o in (Segment(5), STORE, IN_SEGMENT)] == [5, 1, 1]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Segment(1), ValueError, "at least 2"),
        (lambda: SavePolicy("save-all"), ValueError, "unknown save policy.*save-matmul"),
        (lambda: KeepOps(frozenset({9}), 9, "d"), ValueError, r"must lie in \[0, 9\)"),
        (lambda: KeepOps(frozenset({1}), 9, "a:b"), ValueError, "malformed keep-ops digest"),
        (lambda: parse_option("fast"), ValueError, "unknown remat option 'fast'; valid: store"),
        (lambda: parse_option("segment:two"), ValueError, "malformed option"),
        (lambda: parse_option("keep-ops:1@x"), ValueError, "malformed option"),
        (lambda: parse_option(3), TypeError, "Option or its key"),
    ],
)
def test_bad_options_are_refused_with_the_valid_forms(make, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        make()


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Segment(2).length = 3  # type: ignore[misc]
    assert isinstance(RECOMPUTE, Recompute) and isinstance(IN_SEGMENT, InSegment)
