"""The modules of bench/gpu_vs_torch.py (qmoe's CUDA backend against a bf16 PyTorch MoE); run that script.

common    optional imports (torch, qmoe: --fake-qmoe swaps common.qmoe), the models, acceptance targets, log
weights   the synthetic weight sets (random codes, bf16-exact scales; ORT layout), layer attributes, inputs
baseline  the PyTorch MoE (TorchMoE: grouped_mm or a per-expert loop), pick_grouped_mm, dequant_torch
timing    CUDA-event timing, CUDA graphs, the GPU's ceilings (copy bandwidth, matmul rate), summaries
runner    one model: weight sets, qmoe Layers and baselines, then each T timed on both sides
report    acceptance targets, the printed report, the JSON and the plot
selftest  --dry-run (CPU self-check, report on made-up timings) and --fake-qmoe (FakeQmoe)
"""
