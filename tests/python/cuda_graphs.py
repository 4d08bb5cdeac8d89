"""CUDA-graph capture for the GPU tests: torch's recipe in one place."""
from __future__ import annotations

from typing import Any, Callable, Tuple


def capture(torch: Any, fn: Callable[..., Any], *args: Any) -> Tuple[Any, Any]:
    """(graph, output) of ``fn(*args)`` captured in a CUDA graph, after one warm-up
    call on a side stream (as torch asks); the graph is not replayed yet."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out
