"""The PyTorch baseline: a bf16 (or f16) MoE on the dequantized weights, grouped by expert with
torch._grouped_mm when it works here, else a per-expert matmul loop."""
from __future__ import annotations

import math

import numpy as np

from .common import F, torch
from .weights import dims


def _unpack(q, bits, n):
    """Packed codes [..., ceil(n/pack)] -> [..., n] (the even element in the low nibble at 4 bits)."""
    if bits == 8:
        return q[..., :n]
    return torch.stack((q & 15, q >> 4), dim=-1).reshape(*q.shape[:-1], -1)[..., :n]


def dequant_torch(q, s, bits, block, K, dtype, dev, zp=None):
    """One expert's codes [N, K/pack] (numpy), scales and zero points (ONNX Runtime's packing, or None:
    2^(bits-1)) -> [N, K] in dtype, on dev."""
    q = torch.from_numpy(np.ascontiguousarray(q)).to(dev)
    N, bl = q.shape[0], block or K
    v = _unpack(q, bits, K).to(torch.float32).reshape(N, K // bl, bl)
    if zp is None:
        v = v - float(1 << (bits - 1))
    else:
        z = _unpack(torch.from_numpy(np.ascontiguousarray(zp)).to(dev), bits, N if not block else K // bl)
        v = v - z.to(torch.float32).reshape(N, K // bl if block else 1, 1)
    s = torch.from_numpy(np.ascontiguousarray(s, np.float32)).to(dev).reshape(-1, K // bl, 1)
    return (v * s).reshape(-1, K).to(dtype)


class TorchMoE:
    """bf16 (or f16) PyTorch MoE on dequantized weights: FC1 as [E, 2I, H] with the gate rows first (the
    layer's interleaved fusion-1 rows, or FC1 and FC3 of fusion 0, reordered once here), FC2 [E, H, I]."""

    def __init__(self, W, cfg, bits, block, fusion, dtype, dev, gmm):
        E, H, I = cfg["E"], cfg["H"], cfg["I"]
        d = dims(cfg, fusion)
        self.cfg, self.gmm, self.k, self.E, self.I = cfg, gmm, cfg["k"], E, I
        self.w1 = torch.empty((E, 2 * I, H), dtype=dtype, device=dev)
        self.w2 = torch.empty((E, H, I), dtype=dtype, device=dev)
        bias = cfg["bias"]
        self.b1 = torch.empty((E, 2 * I), dtype=dtype, device=dev) if bias else None
        self.b2 = torch.empty((E, H), dtype=dtype, device=dev) if bias else None

        def deq(pre, e, K):
            zp = W.get(f"{pre}_zero_points")
            return dequant_torch(W[f"{pre}_experts_weights"][e], W[f"{pre}_scales"][e], bits, block, K, dtype, dev,
                                 None if zp is None else zp[e])

        def bias_of(pre, e):
            return torch.from_numpy(W[f"{pre}_experts_bias"][e]).to(dev).to(dtype)

        for e in range(E):
            if fusion == 1:  # rows 2i (gate) and 2i+1 (linear) -> [gate; linear]
                w = deq("fc1", e, H)
                self.w1[e, :I], self.w1[e, I:] = w[0::2], w[1::2]
                if bias:
                    b = bias_of("fc1", e)
                    self.b1[e, :I], self.b1[e, I:] = b[0::2], b[1::2]
            elif fusion == 2:  # already [gate; linear]
                self.w1[e] = deq("fc1", e, H)
                if bias:
                    self.b1[e] = bias_of("fc1", e)
            else:  # FC1 = gate, FC3 = linear
                self.w1[e, :I], self.w1[e, I:] = deq("fc1", e, H), deq("fc3", e, H)
                if bias:
                    self.b1[e, :I], self.b1[e, I:] = bias_of("fc1", e), bias_of("fc3", e)
            self.w2[e] = deq("fc2", e, d["I"])
            if bias:
                self.b2[e] = bias_of("fc2", e)
        # grouped_mm's B operand: [E, K, N] as a transposed view (column-major per expert, cuBLAS's "TN").
        self.w1t, self.w2t = self.w1.transpose(1, 2), self.w2.transpose(1, 2)
        self.arange = torch.arange(E, device=dev)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (self.w1, self.w2, self.b1, self.b2)
                                if t is not None)

    def _act(self, h):
        c, I = self.cfg, self.I
        g, u = h[:, :I], h[:, I:]
        if c["alpha"] == 1.0 and c["beta"] == 0.0 and not math.isfinite(c["limit"]):
            return F.silu(g) * u
        if math.isfinite(c["limit"]):
            g, u = g.clamp(max=c["limit"]), u.clamp(-c["limit"], c["limit"])
        return g * torch.sigmoid(g * c["alpha"]) * (u + c["beta"])

    @staticmethod
    def _loop_mm(a, w, counts):
        """Per-expert matmuls over the rows grouped by expert (needs the counts on the host)."""
        out = a.new_empty((a.shape[0], w.shape[1]))
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(a[start:start + c], w[e].t(), out=out[start:start + c])
                start += c
        return out

    def __call__(self, x, logits):
        T, k = x.shape[0], self.k
        p = torch.softmax(logits.float(), dim=-1)
        wts, idx = torch.topk(p, k, dim=-1)
        wts = wts / wts.sum(dim=-1, keepdim=True)  # normalize_routing_weights = 1
        flat = idx.reshape(-1)
        se, order = torch.sort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tok = torch.div(order, k, rounding_mode="floor")
        xs = x.index_select(0, tok)
        if self.gmm is not None:  # no host synchronisation: graph-capturable
            offs = torch.searchsorted(se, self.arange, right=True).to(torch.int32)
            h = self.gmm(xs, self.w1t, offs)
        else:
            counts = torch.bincount(flat, minlength=self.E).tolist()
            h = self._loop_mm(xs, self.w1, counts)
        if self.b1 is not None:
            h = h + self.b1.index_select(0, se)
        a = self._act(h)
        y = self.gmm(a, self.w2t, offs) if self.gmm is not None else self._loop_mm(a, self.w2, counts)
        if self.b2 is not None:
            y = y + self.b2.index_select(0, se)
        # The weighted sum in float32 (bf16 x float32 promotes); index_add_ scatters back to the tokens.
        yw = y * wts.reshape(-1).index_select(0, order).unsqueeze(1)
        out = torch.zeros((T, yw.shape[1]), dtype=torch.float32, device=yw.device).index_add_(0, tok, yw)
        return out.to(x.dtype)


def pick_grouped_mm(dtype, dev):
    """(function or None, description): torch._grouped_mm when its schema has `offs` and it matches a
    per-expert loop on a small problem with an empty group; else None (the loop baseline)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return None, "torch._grouped_mm is not in this torch"
    try:
        schema = str(torch.ops.aten._grouped_mm.default._schema)
    except Exception:  # noqa: BLE001 - the schema is informative only
        schema = "(schema not readable)"
    if "offs" not in schema and "(schema" not in schema:
        return None, f"torch._grouped_mm has no offs argument: {schema}"

    def gmm(a, bt, offs):
        return fn(a, bt, offs=offs)

    try:
        g = torch.Generator(device=dev).manual_seed(0)
        counts = [3, 0, 5, 1]
        a = torch.randn(sum(counts), 64, generator=g, device=dev).to(dtype)
        w = torch.randn(len(counts), 48, 64, generator=g, device=dev).to(dtype)
        offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=dev)
        got = gmm(a, w.transpose(1, 2), offs).float()
        ref = TorchMoE._loop_mm(a.float(), w.float(), counts)
        err = float((got - ref).norm() / ref.norm())
        if not err < 2e-2:
            return None, f"torch._grouped_mm disagreed with the loop (rel. L2 {err:.1e})"
    except Exception as e:  # noqa: BLE001
        return None, f"torch._grouped_mm raised: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return gmm, f"torch._grouped_mm {schema}"
