"""Each Triton matvec kernel compiles for an H100/H200 (sm_90) down to a cubin with Triton's own
ptxas, no GPU needed: catches what the interpreter cannot (it runs no PTX: kernel q8's dp4a),
on any machine with Triton. Skipped without it."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tandem.kernels import triton_matvec as tm  # noqa: E402

POINTERS = {"w": "*u8", "x": "*fp32", "y": "*fp32", "qx": "*i32", "dx": "*fp32", "qsum16": "*i32"}
CASES = [
    (tm._matvec_kernel, {"TYPE": 0, "BLOCK": 144, "R": 16, "M": 1}),
    (tm._matvec_kernel, {"TYPE": 1, "BLOCK": 210, "R": 16, "M": 8}),
    (tm._q8_activations_kernel, {"G": tm.Q8_GROUPS}),
    (tm._q4_k_q8_kernel, {"R": 32, "M": 1, "INTERPRET": False}),
    (tm._q6_k_q8_kernel, {"R": 64, "M": 8, "INTERPRET": False}),
]


@pytest.mark.parametrize("kernel, constants", CASES, ids=lambda c: getattr(c, "__name__", None) or
                         "-".join(f"{k}{v}" for k, v in c.items()))
def test_kernel_compiles_for_sm90(kernel, constants):
    signature = {name: "constexpr" if name in constants else POINTERS.get(name, "i32")
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 1000
    if constants.get("INTERPRET") is False:
        assert "dp4a.u32.s32" in compiled.asm["ptx"]
