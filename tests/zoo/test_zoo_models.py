"""Structure of the plain-torch models: the LSTM is a chain of time steps, the U-Net keeps its skips."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tightfit import zoo
from tightfit.zoo.lstm import LSTMLanguageModel


def _lstm_loss_by_segments(model: LSTMLanguageModel, x, labels, bounds, use_checkpoint):
    """The model's forward with the recurrence run segment by segment (optionally checkpointed)."""
    xs = model.dropout(model.embed(x))
    state = model.rnn.initial_state(xs)
    outs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if use_checkpoint:
            out, state = checkpoint(model.rnn.run, xs, state, start, stop, use_reentrant=False)
        else:
            out, state = model.rnn.run(xs, state, start, stop)
        outs.append(out)
    logits = model.head(torch.cat(outs, dim=1))
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    )


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_lstm_runs_as_a_chain_of_time_step_segments(use_checkpoint):
    model_factory, batch_factory = zoo.get("lstm-tiny")
    model, batch = model_factory(), batch_factory(seq_len=9)
    assert model.config.dropout > 0  # dropout masks must be reproduced too

    torch.manual_seed(1)
    reference = model(**batch)
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    loss = _lstm_loss_by_segments(model, batch["x"], batch["labels"], [0, 4, 7, 9], use_checkpoint)
    loss.backward()
    assert torch.equal(loss, reference)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, ref_grads[n]), n


def test_lstm_step_advances_every_layer():
    model = zoo.get("lstm-tiny").model_factory(dropout=0.0)
    xs = torch.randn(3, 5, model.config.embed_dim)
    state = model.rnn.initial_state(xs)
    out, new_state = model.rnn.step(xs[:, 0], state)
    assert out.shape == (3, model.config.hidden_size) and len(new_state) == model.config.num_layers
    torch.testing.assert_close(out, new_state[-1][0])
    full, _ = model.rnn(xs)
    torch.testing.assert_close(full[:, 0], out)


def test_unet_decoder_uses_encoder_skips():
    """Zeroing the full-resolution encoder output changes the result only through the skip connection."""
    model = zoo.get("unet-tiny").model_factory().eval()
    x = torch.randn(1, 3, 16, 16)
    seen = []
    handle = model.ups[-1].register_forward_pre_hook(lambda m, args: seen.append(args[1].shape))
    model(x)
    handle.remove()
    assert seen == [torch.Size([1, model.config.width, 16, 16])]
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 18, 18))


def test_resnet50_has_bottleneck_stages_with_batchnorm():
    with torch.device("meta"):
        net = zoo.get("resnet50").model_factory()
    assert [len(s) for s in net.stages] == [3, 4, 6, 3]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 53
    assert net.fc.in_features == 2048 and net.fc.out_features == 1000


def test_llama_tiny_uses_grouped_query_attention_swiglu_and_rmsnorm():
    model = zoo.get("llama-1b-tiny").model_factory()
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features * 2 == attn.q_proj.out_features  # 4 query heads share 2 kv heads
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__ == "LlamaMLP" and hasattr(mlp, "gate_proj")  # SwiGLU: gate, up, down
    assert "RMSNorm" in type(model.model.norm).__name__
