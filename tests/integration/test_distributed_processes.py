"""Rank logic on real gloo processes: exact counts at any world size, and who prints an error."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.helpers import BIN, REPO, run
from tests.ranks import tiny_model_and_data


def on_ranks(n: int, scenario: str):
    return run([str(BIN / "python"), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                str(REPO / "tests" / "ranks.py"), scenario], timeout=120,
               env={"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distrnn.train: error")]


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_confusion_matrix_and_mistakes_are_the_same_at_any_world_size(processes):
    """On the same weights: the same matrix (trace = correct, sum = seen), the same 7 most confident
    mistakes, on every rank, for 1001 images that no world size divides evenly."""
    model, split = tiny_model_and_data()
    with torch.no_grad():
        logits = model(split.images.float() / 255)
    predictions, probabilities = logits.argmax(1), logits.softmax(1).max(1).values
    confusion = [[int(((split.labels == t) & (predictions == p)).sum()) for p in range(10)] for t in range(10)]
    wrong = [(float(probabilities[i]), i) for i in range(len(split)) if predictions[i] != split.labels[i]]
    truth = {"counts": [sum(confusion[i][i] for i in range(10)), 1001], "confusion": confusion,
             "mistakes": [[i, int(predictions[i])] for _, i in sorted(wrong, reverse=True)[:7]]}
    result = on_ranks(processes, "exact")
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads(r) for r in re.findall(r"RESULT (\{.*?\]\]\})", result.stdout)]  # ranks interleave lines
    assert len(got) == processes and all(g == truth for g in got)


def test_an_error_on_rank_1_only_is_printed_by_rank_1_naming_it():
    result = on_ranks(2, "rank1-error")
    assert result.returncode != 0
    assert errors(result.stderr) == [
        f"distrnn.train: error on rank 1 (node {__import__('socket').gethostname().split('.')[0]}): "
        "rank 1's own problem"]


def test_the_same_error_on_every_rank_is_printed_once():
    result = on_ranks(3, "same-error")
    assert result.returncode != 0
    assert errors(result.stderr) == ["distrnn.train: error: the same problem everywhere"]


def test_an_unexpected_error_on_the_main_process_releases_the_others_at_once():
    result = on_ranks(2, "main-raises")
    assert result.returncode != 0
    assert "KeyError: 'missing key'" in result.stderr  # the real cause, with its traceback (a bug, not bad input)
    left = {int(r): float(s) for r, s in re.findall(r"LEFT rank (\d) after ([\d.]+) s", result.stderr)}
    assert set(left) == {0, 1} and left[1] < 30  # not the 300 s collective timeout
    assert "lost contact" not in result.stderr


def test_every_rank_uses_the_main_processs_answer():
    result = on_ranks(3, "from-main")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"RESULT \[(\d+)\]", result.stdout) == ["0", "0", "0"]


def test_accumulation_steps_skip_ddps_gradient_all_reduce(tmp_path, data_dir):
    """2 ranks x 320 images / batch 16 = 20 batches, 21 with 3 per step: gradients are all-reduced on
    batches 3, 6, ..., 21 only (accelerate's accumulate uses DDP's no_sync in between)."""
    result = run([str(BIN / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                  str(REPO / "tests" / "ranks.py"), "accumulate"], timeout=300,
                 env={"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "DISTRNN_DATA_DIR": str(data_dir),
                      "RUN_DIR": str(tmp_path / "run")})
    assert result.returncode == 0, result.stderr[-3000:]
    for got in [json.loads(r) for r in re.findall(r"RESULT (\{.*?\})", result.stdout)]:
        assert got == {"reduced_at": list(range(2, 21, 3)), "steps": 7, "batches": 21}


class TwoRanks:
    """What peer_failure reads of an Accelerator."""

    num_processes, process_index = 2, 0


# Real texts: gloo's and torch's as seen in 2-process CPU runs here, NCCL's from its sources (2.30.7) in the
# format torch's C10D_NCCL_CHECK builds ("NCCL error in: <file>:<line>, <ncclGetErrorString>, NCCL version ...",
# then the ncclResult's explanation, then "Last error:" and NCCL's last warning).


def test_the_tests_collectives_refuse_a_bool_tensor():
    """tests/collective_check, which every test's processes load, fails a collective given a bool."""
    result = on_ranks(2, "bool-collective")
    assert result.returncode != 0
    assert "torch.distributed.all_reduce got a bool tensor (tests/collective_check)" in result.stderr


def test_the_tests_collectives_refuse_ranks_that_call_different_ones():
    result = on_ranks(2, "mismatched-collectives")
    assert result.returncode != 0
    assert ("ranks called different collectives (tests/collective_check): [\"all_reduce[((2,), 'torch.float32')]\", "
            "\"all_reduce[((3,), 'torch.float32')]\"]") in result.stderr
