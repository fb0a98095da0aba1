"""Test-only: every Python that the tests start imports this (tests/helpers puts this folder on PYTHONPATH).

When torch.distributed is imported, its Python collectives are wrapped so that
- a bool tensor fails the run: NCCL has no bool type (torch casts bools to uint8 for it), so a bool that
  sums correctly on gloo can mean something else on GPUs;
- every rank checks that all ranks call the same collective with the same input shapes and dtypes: before
  each one, the ranks exchange a digest of (collective, shapes, dtypes) on a gloo group of their own and
  stop on a mismatch, naming both.
The second is what TORCH_DISTRIBUTED_DEBUG=DETAIL does in torch; on torch 2.14.1 DETAIL makes DDP's
constructor segfault on gloo (a 10-line script: init_process_group("gloo"), DDP(nn.Linear(4, 2)), 2 ranks).
DDP's own gradient all-reduces run in C++ and are not seen here, except through a Python communication hook
(distrnn's rank timing wraps the default all-reduce hook). Nothing is imported until torch.distributed is.
"""

import functools
import hashlib
import importlib.abc
import os
import sys

TARGET = "torch.distributed.distributed_c10d"
# collective -> the position of its input tensor(s) in the call
COLLECTIVES = {"all_reduce": 0, "broadcast": 0, "reduce": 0, "all_gather": 1, "all_gather_into_tensor": 1,
               "gather": 0, "scatter": 0, "reduce_scatter": 1, "reduce_scatter_tensor": 1, "all_to_all_single": 1}
_state = {"group": None, "busy": False}


def _tensors(value):
    import torch

    items = value if isinstance(value, (list, tuple)) else (value,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _default_timeout(c10d):
    """The default group's timeout (train.collective_timeout_s): torch has no public getter."""
    import torch

    try:
        return c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    except Exception:
        return None


def _same_everywhere(c10d, originals, name, inputs):
    """Every rank of the default group calls `name` with these inputs (a digest exchange on a side group)."""
    import torch

    if not c10d.is_initialized() or c10d.get_world_size() < 2:
        return
    if _state["group"] is None:  # the run's collective timeout, or a frozen rank would hold this exchange 30 min
        _state["group"] = c10d.new_group(backend="gloo", timeout=_default_timeout(c10d))
    fingerprint = f"{name}{[(tuple(t.shape), str(t.dtype)) for t in inputs]}"
    mine = torch.tensor(list(hashlib.sha256(fingerprint.encode()).digest())
                        + list(fingerprint.encode()[:200].ljust(200)),
                        dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(c10d.get_world_size())]
    originals["all_gather"](everyone, mine, group=_state["group"])
    if any(not torch.equal(theirs[:32], mine[:32]) for theirs in everyone):
        seen = [bytes(t[32:].tolist()).decode(errors="replace").strip() for t in everyone]
        raise AssertionError(f"ranks called different collectives (tests/collective_check): {seen}")


def _checked(c10d, originals, name, collective):
    import torch

    @functools.wraps(collective)
    def checked(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if any(t.dtype == torch.bool for t in _tensors(value)):
                raise AssertionError(f"torch.distributed.{name} got a bool tensor (tests/collective_check)")
        group = kwargs.get("group")
        if not _state["busy"] and group in (None, c10d.group.WORLD) and len(args) > COLLECTIVES[name]:
            _state["busy"] = True  # the exchange itself, and what new_group calls, are not checked
            try:
                _same_everywhere(c10d, originals, name, _tensors(args[COLLECTIVES[name]]))
            finally:
                _state["busy"] = False
        return collective(*args, **kwargs)

    return checked


class _Loader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.real.exec_module(module)
        originals = {name: getattr(module, name) for name in COLLECTIVES if hasattr(module, name)}
        for name, collective in originals.items():  # torch.distributed re-exports them next: the wrapped ones
            setattr(module, name, _checked(module, originals, name, collective))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = _Loader(spec.loader)
                    return spec
        return None


if os.environ.get("DISTRNN_TEST_COLLECTIVE_CHECK") == "1":
    sys.meta_path.insert(0, _Finder())
