"""Shared set-up of the Triton kernel tests; import it before anything that imports triton.

Without a GPU the kernels run under the CPU interpreter: ``TRITON_INTERPRET=1`` is set here (unless already
set) before triton is imported, since triton reads it when it decorates its own library functions. Skips the
importing test module when triton is not installed, or when ``TRITON_INTERPRET`` was set to something else on a
machine without a GPU. ``DEVICE`` is where the tests put their tensors.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install 'plstm-graph[triton]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("TRITON_INTERPRET was set to something else than 1 before this module", allow_module_level=True)
