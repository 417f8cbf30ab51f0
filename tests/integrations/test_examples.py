"""Every example runs on its tiny configuration (in process: the interpreter's startup is paid once)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_plain_loop_tiny():
    from examples import plain_loop

    result = plain_loop.main(["--tiny", "--fewbit"])
    assert result["highest_step_peak"] <= result["budget"] and result["plans"] == 1
    assert all(loss == loss for loss in result["losses"])  # finite


def test_hf_trainer_minilm_tiny(tmp_path):
    from examples import hf_trainer_minilm

    result = hf_trainer_minilm.main(["--tiny", "--output-dir", str(tmp_path)])
    assert result["highest_step_peak"] <= result["budget"] and result["plans"] >= 1
    plain = hf_trainer_minilm.main(["--tiny", "--plain", "--output-dir", str(tmp_path / "plain")])
    # recompute only: the run is the one without tightfit, logged losses and test accuracy included
    assert len(result["losses"]) == 4 and result["losses"] == plain["losses"]
    assert result["accuracy"] == plain["accuracy"]


def test_peft_lora_tiny(tmp_path):
    pytest.importorskip("peft")
    from examples import peft_lora

    result = peft_lora.main(["--tiny", "--output-dir", str(tmp_path)])
    assert result["highest_step_peak"] <= result["budget"] and result["train_loss"] > 0


def test_lightning_tiny():
    pytest.importorskip("pytorch_lightning")
    from examples import lightning_encoder

    module = lightning_encoder.main(["--tiny", "--fewbit"])
    assert len(module.losses) == 4
