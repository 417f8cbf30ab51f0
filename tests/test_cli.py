"""The command line end to end through `tightfit.cli.main`, on tiny models only."""

import json
import subprocess
import sys
import textwrap

import pytest

import tightfit
from tightfit import cli
from tightfit.cli import demo, profile
from tightfit.cli._args import parse_budget

SMALL = ["--batch", "2", "--seq", "8"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_json_has_the_report_fields(capsys):
    code, out, err = run(capsys, "profile", "gpt2-tiny", *SMALL, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "gpt2-tiny" and data["estimated"] is False
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes", "flops"):
        assert data[key] > 0, key
    # AdamW by default: exp_avg and exp_avg_sq per parameter, plus a 4-byte step count per tensor
    assert 2 * data["params_bytes"] < data["optimizer_bytes"] <= 2 * data["params_bytes"] + 4 * 64
    assert data["per_module"]


def test_estimate_matches_profile_through_the_cli(capsys):
    args = ["profile", "lstm-tiny", *SMALL, "--optimizer", "sgd", "--json"]
    real = json.loads(run(capsys, *args)[1])
    fake = json.loads(run(capsys, *args, "--estimate")[1])
    assert fake["estimated"] is True and fake["optimizer_bytes"] == real["optimizer_bytes"] == 0
    for key in ("params_bytes", "activations_bytes", "peak_bytes", "flops"):
        assert fake[key] == real[key], key


def test_profile_table_and_image_options(capsys):
    code, out, err = run(
        capsys, "profile", "resnet50-tiny", "--batch", "2", "--image", "16", "--dtype", "bfloat16"
    )
    assert code == 0, err
    assert "resnet50-tiny on cpu" in out and "activations saved for backward" in out and "peak" in out


def test_profile_a_model_file(capsys, tmp_path):
    path = tmp_path / "net.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch

            class Net(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    nn = torch.nn
                    self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))

                def forward(self, x):
                    return self.body(x).square().mean()

            def make():
                return Net(), torch.randn(4, 8)

            def logits():
                return torch.nn.Linear(8, 3), torch.randn(4, 8)
            """
        )
    )
    code, out, err = run(capsys, "profile", f"{path}:make", "--json", "--optimizer", "none")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == f"{path}:make"
    assert data["params_bytes"] == 4 * (8 * 16 + 16 + 16 + 1) and data["optimizer_bytes"] == 0
    assert data["inputs_bytes"] == 4 * 4 * 8
    # the factory takes no dtype: it builds under the default dtype, which works under fake tensors too
    code, out, err = run(capsys, "profile", f"{path}:make", "--json", "--estimate", "--dtype", "bfloat16")
    assert code == 0, err
    half = json.loads(out)
    assert half["estimated"] and half["params_bytes"] * 2 == data["params_bytes"]
    assert half["inputs_bytes"] * 2 == data["inputs_bytes"]
    code, _, err = run(capsys, "profile", f"{path}:logits")
    assert code == 2 and "the loss must be a scalar tensor, got (4, 3)" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["profile", "gpt-2"], "unknown model 'gpt-2': did you mean 'gpt2'"),
        (["profile", "gpt2-tiny", "--image", "32"], "gpt2-tiny takes token sequences"),
        (["profile", "gpt2-tiny", "--batch", "0"], "--batch must be a positive integer"),
        (["profile", "gpt2-tiny", "--seq", "4096"], "exceeds the model's 128 positions"),
        (["profile", "missing_file.py:make"], "model file not found"),
        (["profile", "gpt2-tiny", "--device", "cuda"], "no cuda device is available"),
        (["profile", "gpt2-tiny", "--seq", "8", "--image", "8"], "not allowed with argument"),
        (["profile", "gpt2-tiny", "--dtype", "int8"], "invalid choice"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_user_mistakes_are_one_line_with_status_2(capsys, argv, needle):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_model_file_failures_say_which_part(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def make():\n    raise RuntimeError('no weights here')\n")
    code, _, err = run(capsys, "profile", f"{path}:make")
    assert code == 2 and "the factory raised" in err and "RuntimeError: no weights here" in err
    code, _, err = run(capsys, "profile", f"{path}:build")
    assert code == 2 and "no attribute named 'build'; callables defined there: make" in err


def test_refuses_to_profile_a_model_larger_than_ram(capsys, monkeypatch):
    monkeypatch.setattr(profile, "available_ram", lambda: 1000)
    code, _, err = run(capsys, "profile", "gpt2-tiny", *SMALL)
    assert code == 2 and "more than the 1000 B of RAM available; add --estimate" in err
    code, out, err = run(capsys, "profile", "gpt2-tiny", *SMALL, "--estimate", "--json")
    assert code == 0, err


def test_internal_bugs_keep_their_traceback(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in tightfit")

    monkeypatch.setattr(tightfit, "profile", broken)
    with pytest.raises(RuntimeError, match="a bug in tightfit"):
        cli.main(["profile", "gpt2-tiny", *SMALL])


def test_plan_is_wired_and_its_budget_errors_are_one_line(capsys):
    code, _, err = run(capsys, "plan", "gpt2-tiny", "--budget", "2gigs")
    assert code == 2 and "--budget: invalid size '2gigs'" in err and "GiB" in err
    assert "Traceback" not in err


def test_parse_budget_names_accepted_forms():
    assert parse_budget("2GiB") == 2 * 2**30
    with pytest.raises(cli.CliError, match="--budget: invalid size '2 gigs'.*GiB"):
        parse_budget("2 gigs")


def test_every_command_measures_the_same_step_by_default():
    parser = cli.build_parser()
    profiled = parser.parse_args(["profile", "gpt2-tiny"])
    planned = parser.parse_args(["plan", "gpt2-tiny", "--budget", "min"])
    assert profiled.optimizer == planned.optimizer == "adamw"


def test_help_imports_neither_torch_nor_the_library():
    code = (
        "import sys\n"
        "from tightfit.cli import main\n"
        "assert main(['--help']) == 0 and main(['plan', '--help']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(\n"
        "    ('tightfit.memory', 'tightfit.remat', 'tightfit.zoo')))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_models_lists_names_and_no_command_prints_help(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "gpt2-xl" in out and "llama-1b" in out and "-tiny" not in out
    code, out, _ = run(capsys)
    assert code == 2 and "profile" in out and "demo" in out


def test_demo_sections_on_a_tiny_model(capsys):
    code, out, err = run(capsys, "demo", "--model", "gpt2-tiny", *SMALL, "--large", "llama-1b-tiny")
    assert code == 0, err
    titles = [s.title for s in demo.DEMO_SECTIONS]
    assert all(t in out for t in titles)
    assert "The step peaks at" in out and "Activations saved for the backward pass take" in out
    assert "transformer.h.*" in out  # per-block consumers are folded across blocks
    assert "Nothing was allocated: llama-1b-tiny" in out
    variants = ("PyTorch", "FewBit(bits=2)", "Sketch(ratio=0.5)", "rematerialize", "tightfit.plan (+fewbit)")
    for variant in variants:
        assert variant in out


def test_python_dash_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "tightfit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"tightfit {tightfit.__version__}"
