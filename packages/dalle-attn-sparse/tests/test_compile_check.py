"""The kernels compile to cubins for the H100 (sm_90) without a GPU, as launched by the
package's own launchers (Triton's PTX lowering and the ptxas its wheel ships)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_each_kernel_compiles_for_hopper_within_its_shared_memory():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "dalle_attn_sparse.compile_check", "--quick", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 of 4 variants compiled within the limits" in run.stdout
    for kernel in ("attention_forward_kernel", "attention_backward_dkdv_kernel",
                   "attention_backward_dq_kernel", "decode_kernel"):
        assert kernel in run.stdout
