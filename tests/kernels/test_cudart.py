"""The CUDA runtime called directly (kernels.cudart): its copies land the host's bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.kernels import cudart

pytestmark = pytest.mark.cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_copy_to_device_lands_the_host_bytes_at_an_offset():
    torch.zeros(1, device="cuda")  # torch loads the runtime
    runtime = cudart.runtime()
    assert runtime is not None, "libcudart not mapped into the process"
    host = torch.from_numpy(np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)).pin_memory()
    device = torch.zeros(3 << 20, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the zeros are written before the copy lands
    runtime.copy_to_device(device.data_ptr() + (1 << 20), host.data_ptr() + 4096, (1 << 20) - 4096,
                           stream.cuda_stream)
    stream.synchronize()
    landed = device.cpu()
    assert torch.equal(landed[(1 << 20):(2 << 20) - 4096], host[4096:])
    assert not landed[: 1 << 20].any() and not landed[(2 << 20) - 4096:].any()  # nothing else

