"""Kernel tests run compiled on a CUDA device, or in Triton's interpreter on CPU tensors.

Interpreter mode is decided when triton is imported (its own library functions are
decorated then), so it is switched on here, before any test module imports triton. It is
set through triton's knob for this process only: the TRITON_INTERPRET variable is put back
as it was, so processes that other tests start do not inherit it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

KERNEL_DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _enter_interpreter_mode() -> None:
    already_imported = "triton" in sys.modules
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton

        if already_imported and not triton.knobs.runtime.interpret:
            raise pytest.UsageError(
                "triton was imported before tests/attention/conftest.py could switch on its "
                "interpreter; run `pytest tests/attention` in a process of its own, or set TRITON_INTERPRET=1"
            )
        triton.knobs.runtime.interpret = True
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


if KERNEL_DEVICE.type == "cpu":
    _enter_interpreter_mode()


@pytest.fixture
def device() -> torch.device:
    return KERNEL_DEVICE


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
