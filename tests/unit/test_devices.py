"""Numeric settings (fp32 means fp32, deterministic kernels) and what counts as losing a peer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distrnn import devices
from distrnn.distributed import peer_failure


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


class TwoRanks:
    num_processes, process_index = 2, 0


@pytest.mark.parametrize("error, lost", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:6023"), True),
    (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation"), True),
    (dist.DistBackendError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)"), True),
    (dist.DistNetworkError("failed to recv, got 0 bytes"), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1971, invalid usage, NCCL version 2.27.3"), False),
    (RuntimeError("CUDA out of memory"), False),
    (ValueError("Connection closed by peer"), False),
])
def test_a_lost_peer_is_recognised_by_type_then_by_gloos_text(error, lost):
    found = peer_failure(TwoRanks(), error)
    assert (found is not None) == lost
    if lost:
        assert str(found).startswith("rank 0 lost contact with another rank (")
