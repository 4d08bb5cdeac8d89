"""The host->device copy ceiling a CUDA layer load is measured against: 1 GiB
copied from pinned and from pageable host memory to the GPU with torch, best
of 5 each (`python bench/h2d_probe.py`, on the GPU host)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu.timing import copy_gb_s  # noqa: E402

n = 1 << 30
for pinned in (True, False):
    h = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
    h.fill_(1)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    print(f"host->device copy of 1 GiB, {'pinned' if pinned else 'pageable'} host memory: best of 5 "
          f"{copy_gb_s(d, h):.1f} GB/s")
