"""Device detection imports cleanly and falls back to CPU where Ascend and CUDA are absent."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def test_detection_falls_back_to_cpu_and_gloo_without_accelerators():
    from eplbd.device import detect

    if torch.cuda.is_available():
        pytest.skip("an accelerator is present")
    kind = detect("auto")
    assert (kind.name, kind.backend) == ("cpu", "gloo")
    assert str(kind.device(0)) == "cpu"


@pytest.mark.parametrize("name", ["cuda", "npu"])
def test_asking_for_an_absent_accelerator_is_a_clear_error(name):
    from eplbd.device import detect

    if torch.cuda.is_available():
        pytest.skip("an accelerator is present")
    with pytest.raises(ValueError, match=f"{name} requested but"):
        detect(name)


def test_probing_for_ascend_does_not_autoload_device_backends():
    code = "import os, eplbd.device; print(os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "0"
