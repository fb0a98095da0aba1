"""Numeric settings (fp32 means fp32, deterministic kernels) and what counts as losing a peer."""

from __future__ import annotations

import pytest
import torch

from distrnn import devices


@pytest.fixture
def restore_numerics():
    yield
    devices.set_numerics(tf32=False, deterministic=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def test_fp32_means_fp32_unless_tf32_is_asked_for(restore_numerics):
    devices.set_numerics(tf32=False, deterministic=False)
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"  # torch's own default is tf32 for cuDNN RNNs
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    devices.set_numerics(tf32=True, deterministic=False)
    assert torch.backends.cudnn.rnn.fp32_precision == "tf32" and torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_deterministic_sets_what_exactness_on_a_gpu_needs(restore_numerics, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    devices.set_numerics(tf32=False, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
