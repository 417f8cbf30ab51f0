"""Users' own models as path/to/file.py:factory: each failure names the part that failed."""

import textwrap

import pytest
import torch

from tightfit import zoo
from tightfit._step import forward_loss

MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x).pow(2).mean()
"""


def _write(tmp_path, body, name="mymodel.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(MODEL) + textwrap.dedent(body))
    return path


def test_factory_returning_model_and_batch(tmp_path):
    path = _write(tmp_path, "def make():\n    return Net(), torch.randn(3, 4)\n")
    model_factory, batch_factory = zoo.get(f"{path}:make")
    model = model_factory()
    batch = batch_factory()
    assert batch.shape == (3, 4)
    assert forward_loss(model, batch).shape == ()
    half = batch_factory(dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert model_factory(dtype=torch.float64).lin.weight.dtype == torch.float64  # applied when not taken


def test_factory_with_sample_batch_function_and_kwargs(tmp_path):
    body = """
    def make(dtype=None):
        return Net().to(dtype or torch.float32)

    def sample_batch(batch_size=2):
        return {"x": torch.ones(batch_size, 4)}
    """
    path = _write(tmp_path, body)
    model_factory, batch_factory = zoo.load(f"{path}:make")
    assert batch_factory(batch_size=5, seq_len=7)["x"].shape == (5, 4)  # seq_len not taken: dropped
    assert model_factory(dtype=torch.float64).lin.weight.dtype == torch.float64


def test_sibling_imports_work(tmp_path):
    (tmp_path / "helper_mod_tf.py").write_text("WIDTH = 4\n")
    body = "from helper_mod_tf import WIDTH\ndef make():\n    return Net(), torch.randn(2, WIDTH)\n"
    path = _write(tmp_path, body)
    assert zoo.get(f"{path}:make").batch_factory().shape == (2, 4)


@pytest.mark.parametrize(
    ("body", "attr", "needle"),
    [
        ("def make():\n    return Net()\n", "missing", r"no attribute named 'missing'; callables .*: .*make"),
        ("make = 3\n", "make", "non-callable int named 'make'"),
        (
            "import no_such_module_xyz\n",
            "make",
            r"importing .* failed: line \d+: ModuleNotFoundError: .*_xyz",
        ),
        ("def make(:\n", "make", "importing .* failed: .*SyntaxError"),
    ],
)
def test_load_failures_name_the_part(tmp_path, body, attr, needle):
    path = _write(tmp_path, body)
    with pytest.raises(zoo.ModelFileError, match=needle):
        zoo.get(f"{path}:{attr}")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("def make():\n    raise RuntimeError('no')\n", r"the factory raised line \d+: RuntimeError: no"),
        ("def make():\n    return 42\n", "the factory returned int, expected an nn.Module"),
        ("def make():\n    return 'a', 'b'\n", r"returned \(str, ...\)"),
    ],
)
def test_factory_call_failures_name_the_part(tmp_path, body, needle):
    model_factory, _ = zoo.get(f"{_write(tmp_path, body)}:make")
    with pytest.raises(zoo.ModelFileError, match=needle) as e:
        model_factory()
    assert isinstance(e.value, ValueError)


def test_missing_file_and_bad_spec(tmp_path):
    with pytest.raises(zoo.ModelFileError, match="model file not found"):
        zoo.get(f"{tmp_path}/nope.py:make")
    with pytest.raises(zoo.ModelFileError, match="expected path/to/file.py:factory"):
        zoo.load("model.py:not-an-identifier")


def test_model_only_factory_without_sample_batch_says_how_to_fix(tmp_path):
    path = _write(tmp_path, "def make():\n    return Net()\n")
    _, batch_factory = zoo.get(f"{path}:make")
    needle = r"return \(model, batch\) from make\(\), or define sample_batch"
    with pytest.raises(zoo.ModelFileError, match=needle):
        batch_factory()


LLAMA = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)

def make():
    ids = torch.randint(0, 128, (2, 16))
    return LlamaForCausalLM(CONFIG), {"input_ids": ids, "labels": ids, "use_cache": False}

def make_cast():
    ids = torch.randint(0, 128, (2, 16))
    return LlamaForCausalLM(CONFIG).to(torch.bfloat16), {"input_ids": ids, "labels": ids, "use_cache": False}
"""


@pytest.mark.parametrize("factory", ["make", "make_cast"])
def test_bf16_llama_file_is_estimated_with_its_float32_rotary_buffer(tmp_path, factory):
    """A bf16 Llama keeps its rotary inv_freq in float32 by design; under --estimate neither that buffer
    nor the file's own .to(torch.bfloat16) on fake parameters is refused."""
    import tightfit

    path = tmp_path / "llama_file.py"
    path.write_text(textwrap.dedent(LLAMA))
    model_factory, batch_factory = zoo.get(f"{path}:{factory}")
    report = tightfit.estimate(
        lambda: model_factory(dtype="bfloat16"), lambda: batch_factory(dtype="bfloat16")
    )
    assert report.params_bytes > 0 and report.peak_bytes > report.params_bytes
    model = model_factory(dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    if factory == "make":  # built in bf16 (the default dtype while it runs): inv_freq stays float32
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
