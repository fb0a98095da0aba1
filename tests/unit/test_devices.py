"""Numeric settings (fp32 means fp32, deterministic kernels) and what counts as losing a peer."""

from __future__ import annotations

import pytest
import torch

from distrnn.ranks import devices


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


# torch.cpu.get_capabilities() of the three CPU kinds these machines have (the keys that matter here).
AVX2_ONLY = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
AVX512_NO_BF16 = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
AVX512_BF16 = {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}
AMX = {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}


@pytest.fixture
def fake_cpu(monkeypatch):
    def fake(capabilities: dict, level: str) -> None:
        monkeypatch.setattr(devices, "cpu_capabilities", lambda: capabilities)
        monkeypatch.setattr(devices, "cpu_capability", lambda: level)
    return fake


@pytest.mark.parametrize(("capabilities", "level"), [(AVX2_ONLY, "AVX2"), (AVX512_NO_BF16, "AVX512")])
def test_auto_is_fp32_on_a_cpu_that_emulates_bf16(fake_cpu, capabilities, level):
    fake_cpu(capabilities, level)
    choice = devices.choose_precision("auto", on_cpu=True)
    assert (choice.chosen, choice.describe()) == ("no", f"auto -> no (this CPU has no native bf16: {level})")
    assert devices.emulated_bf16_warning(choice) is None  # auto chose for the user: nothing to warn about


@pytest.mark.parametrize(("capabilities", "feature"), [(AVX512_BF16, "AVX512-BF16"), (AMX, "AVX512-BF16")])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(fake_cpu, capabilities, feature):
    fake_cpu(capabilities, "AVX512")
    choice = devices.choose_precision("auto", on_cpu=True)
    assert (choice.chosen, choice.describe()) == ("bf16", f"auto -> bf16 (this CPU runs bf16 natively: {feature})")
    assert devices.choose_precision("bf16", on_cpu=True).describe() == "bf16"  # native: said plainly, no warning
    assert devices.emulated_bf16_warning(devices.choose_precision("bf16", on_cpu=True)) is None


def test_amx_alone_counts_as_native(fake_cpu):
    fake_cpu({"amx_bf16": True}, "AVX512")
    assert devices.choose_precision("auto", on_cpu=True).chosen == "bf16"


def test_explicit_bf16_on_an_emulating_cpu_runs_as_asked_with_one_warning(fake_cpu):
    fake_cpu(AVX2_ONLY, "AVX2")
    choice = devices.choose_precision("bf16", on_cpu=True)
    assert choice.chosen == "bf16"
    warning = devices.emulated_bf16_warning(choice)
    assert warning.startswith("warning: precision bf16 is emulated on this CPU (this CPU has no native bf16: AVX2)")
    assert "24x" in warning and warning.endswith("use --precision auto or --precision no")
    assert "\n" not in warning
    assert devices.choose_precision("no", on_cpu=True).describe() == "no"


@pytest.mark.parametrize(("native", "chosen"), [(True, "bf16"), (False, "no")])
def test_auto_on_a_gpu_follows_its_native_bf16(monkeypatch, native, chosen):
    monkeypatch.setattr(devices, "gpu_bf16_supported", lambda: native)
    assert devices.choose_precision("auto", on_cpu=False).chosen == chosen
    assert devices.choose_precision("fp16", on_cpu=False).chosen == "fp16"  # fp16 stays an explicit choice


def test_this_machines_cpu_is_one_of_the_two_kinds():
    """The real query (no fake): whatever CPU runs this, auto picks bf16 exactly where torch reports a native
    bf16 feature, and the capability named is torch's own."""
    capabilities = torch.cpu.get_capabilities()
    native = any(capabilities.get(k) for k in devices.NATIVE_BF16_FEATURES)
    choice = devices.choose_precision("auto", on_cpu=True)
    assert choice.chosen == ("bf16" if native else "no")
    assert (torch.backends.cpu.get_cpu_capability() in choice.reason) != native
