"""How a failed collective is classified, from the texts gloo, torch and NCCL really print.
The rank logic on real gloo processes: tests/integration/test_distributed_processes.py."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from distrnn.errors import PeerUnresponsive
from distrnn.ranks.collectives import peer_failure


class TwoRanks:
    """What peer_failure reads of an Accelerator."""

    num_processes, process_index = 2, 0


# Real texts: gloo's and torch's as seen in 2-process CPU runs here, NCCL's from its sources (2.30.7) in the
# format torch's C10D_NCCL_CHECK builds ("NCCL error in: <file>:<line>, <ncclGetErrorString>, NCCL version ...",
# then the ncclResult's explanation, then "Last error:" and NCCL's last warning).
NCCL = "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, "
LOST = "rank 0 lost contact with another rank ("
UNANSWERED = "rank 0: no answer from another rank within train.collective_timeout_s=20 s ("


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                  "[127.0.0.1]:57028. This is typically caused by a remote worker crashing."), LOST),
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:34693: "
                  "Connection reset by peer. This is typically caused by a remote worker hanging"), LOST),
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                  "20000ms for recv operation to complete"), UNANSWERED),
    (RuntimeError("Application timeout caused pair closure"), UNANSWERED),
    (dist.DistBackendError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=78, "
                           "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=20000) ran for 20004 milliseconds "
                           "before timing out."), UNANSWERED),
    (dist.DistBackendError(NCCL + "remote process exited or there was a network error, NCCL version 2.30.7\n"
                           "ncclRemoteError: A call failed possibly due to a network error or a remote process "
                           "exiting prematurely.\nLast error:\nsocketProgress: Connection closed by remote peer "
                           "n2<45892>"), LOST),
    (dist.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server "
                           "shutdown or crash?"), LOST),
    (dist.DistBackendError(NCCL + "unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL version "
                           "2.30.7\nncclSystemError: System call (e.g. socket, malloc) or external library call "
                           "failed or device error. \nLast error:\nError while creating shared memory segment "
                           "/dev/shm/nccl-5KJqcd (size 9637888), error: No space left on device (28)"),
     "rank 0: DistBackendError (not a lost peer): " + NCCL + "unhandled system error (run with NCCL_DEBUG=INFO for "
     "details), NCCL version 2.30.7; last error: Error while creating shared memory segment /dev/shm/nccl-5KJqcd "
     "(size 9637888), error: No space left on device (28)"),
    (dist.DistBackendError(NCCL + "invalid usage (run with NCCL_DEBUG=WARN for details), NCCL version 2.30.7\n"
                           "ncclInvalidUsage: This usually reflects invalid usage of NCCL library.\nLast error:\n"
                           "Mismatched NCCL version detected : rank 0 version 23007 rank 1 version 22105"),
     "rank 0: DistBackendError (not a lost peer): " + NCCL + "invalid usage (run with NCCL_DEBUG=WARN for details), "
     "NCCL version 2.30.7; last error: Mismatched NCCL version detected : rank 0 version 23007 rank 1 version 22105"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), None),
    (ValueError("Connection closed by peer"), None),
])
def test_a_failed_collective_is_classified_by_what_it_says(error, expected):
    """A peer gone, a peer that did not answer, or an NCCL/system error that keeps its own text; anything else
    is not a collective's failure (None: it keeps its traceback)."""
    found = peer_failure(TwoRanks(), error, heartbeats=None, collective_timeout_s=20)
    if expected is None:
        assert found is None
    elif expected in (LOST, UNANSWERED):
        assert str(found).startswith(expected), found
        assert isinstance(found, PeerUnresponsive) == (expected == UNANSWERED)
    else:
        assert str(found) == expected and "lost contact" not in str(found)
