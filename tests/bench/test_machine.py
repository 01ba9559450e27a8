"""The machine facts a bench records (tandem.bench.machine)."""

from __future__ import annotations

import torch

from tandem.bench import machine
from tandem.kernels.cpu import default_threads


def test_the_ram_reading_uses_every_cpu_and_puts_torchs_thread_count_back(monkeypatch):
    seen = []
    real_sum = torch.Tensor.sum

    def counting_sum(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_sum(self, *args, **kwargs)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as TANDEM_SHARE_TORCH_THREADS=1 would leave it
        monkeypatch.setattr(torch.Tensor, "sum", counting_sum)
        assert machine.ram_read_gbps(gib=0.01, repeats=2) > 0
        monkeypatch.undo()
        assert set(seen[:3]) == {default_threads()}  # the buffer's page-in and both repeats
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
