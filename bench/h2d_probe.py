"""The host->device copy ceiling a CUDA layer load is measured against: 1 GiB
copied from pinned and from pageable host memory to the GPU with torch, best
of 5 each (`python bench/h2d_probe.py`, on the GPU host)."""
import time
import torch
n = 1 << 30
for pinned in (True, False):
    h = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
    h.fill_(1)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    best = 0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        d.copy_(h, non_blocking=pinned)
        torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t) / 1e9)
    print(f"host->device copy of 1 GiB, {'pinned' if pinned else 'pageable'} host memory: best of 5 {best:.1f} GB/s")
