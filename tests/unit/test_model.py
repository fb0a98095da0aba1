from __future__ import annotations

import pytest
import torch
from torch import nn

from distrnn.config.schema import build_config
from distrnn.model import StackedRNN, count_parameters


def test_reference_parameter_count():
    # nn.RNN(28, 256, 2): 73,216 + 131,584; nn.Linear(256*28, 10): 71,690
    assert count_parameters(StackedRNN(build_config().model)) == 276_490


def test_reference_layers_match_the_seed():
    model = StackedRNN(build_config().model)
    assert isinstance(model.rnn, nn.RNN) and model.rnn.nonlinearity == "tanh" and model.rnn.batch_first
    assert (model.rnn.input_size, model.rnn.hidden_size, model.rnn.num_layers) == (28, 256, 2)
    assert (model.fc.in_features, model.fc.out_features) == (256 * 28, 10)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("head", ["all-steps", "last-step"])
def test_output_shape_for_each_cell_and_head(cell, head):
    model = StackedRNN(build_config(overrides=[f"model.cell={cell}", f"model.head={head}",
                                               "model.hidden_size=32"]).model)
    assert isinstance(model.rnn, {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell])
    for shape in [(5, 1, 28, 28), (5, 28, 28)]:  # ToTensor batches and plain sequences
        assert model(torch.rand(shape)).shape == (5, 10)


def test_relu_nonlinearity_reaches_the_rnn():
    model = StackedRNN(build_config(overrides=["model.nonlinearity=relu"]).model)
    assert model.rnn.nonlinearity == "relu"


def test_input_size_and_sequence_length_split_the_image():
    model = StackedRNN(build_config(overrides=["model.input_size=56", "model.sequence_length=14"]).model)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert model.fc.in_features == 256 * 14


def test_forward_equals_the_seed_formulation():
    """The seed passes an explicit h0 = zeros and flattens all steps; ours must compute the same."""
    torch.manual_seed(0)
    model = StackedRNN(build_config().model)
    x = torch.rand(4, 1, 28, 28)
    h0 = torch.zeros(2, 4, 256)
    out, _ = model.rnn(x.squeeze(1), h0)
    expected = model.fc(out.reshape(4, -1))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device, enabled, dtype, expected", [
    ("cuda", True, torch.bfloat16, torch.bfloat16),  # autocast's cuDNN RNN wrapper would run this in fp16
    ("cuda", True, torch.float16, None),  # fp16: autocast's own path, with the grad scaler
    ("cuda", False, torch.bfloat16, None),
    ("cpu", True, torch.bfloat16, None),  # CPU autocast keeps bf16
])
def test_bf16_on_cuda_runs_the_rnn_outside_autocast(device, enabled, dtype, expected):
    from distrnn.model import rnn_dtype_outside_autocast

    assert rnn_dtype_outside_autocast(device, enabled, dtype) == expected


def test_rnn_run_by_hand_in_bf16_trains_the_fp32_weights():
    torch.manual_seed(0)
    model = StackedRNN(build_config().model)
    x = torch.rand(4, 28, 28)
    out = model.recurrent_in(x, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model.recurrent(x), atol=0.02, rtol=0)
    out.float().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in model.rnn.parameters())


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_orthogonal_init_makes_each_recurrent_block_orthogonal(cell):
    torch.manual_seed(0)
    model = StackedRNN(build_config(overrides=[f"model.cell={cell}", "model.recurrent_init=orthogonal"]).model)
    default = StackedRNN(build_config(overrides=[f"model.cell={cell}"]).model)
    for name, weight in model.rnn.named_parameters():
        blocks = weight.detach().chunk(weight.shape[0] // 256) if name.startswith("weight_hh") else []
        for block in blocks:  # one for rnn, one per gate for gru (3) and lstm (4)
            assert torch.allclose(block @ block.T, torch.eye(256), atol=1e-4), name
    hh = default.rnn.weight_hh_l0.detach()[:256]
    assert not torch.allclose(hh @ hh.T, torch.eye(256), atol=1e-2)  # the uniform default is not
    assert count_parameters(model) == count_parameters(default)


def test_normalized_input_is_the_same_model_on_standardised_pixels():
    torch.manual_seed(0)
    plain = StackedRNN(build_config().model)
    normalized = StackedRNN(build_config(overrides=["model.normalize_input=true"]).model)
    normalized.load_state_dict(plain.state_dict())  # no extra parameters or buffers: same keys
    images = torch.rand(4, 1, 28, 28)
    expected = plain((images - 0.1307) / 0.3081)
    assert torch.allclose(normalized(images), expected, atol=1e-6)
    assert not torch.allclose(plain(images), expected, atol=1e-3)
