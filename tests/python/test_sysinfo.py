"""The machine's measured ceilings: qmoe.measure_read_bandwidth,
qmoe.measure_peak_flops and qmoe.cpu_kernel_isa (what benchmarks report
their GB/s and GFLOP/s against)."""
import math
import re
import threading

import numpy as np

import pytest

import qmoe


def test_read_bandwidth_is_sane():
    bw = qmoe.measure_read_bandwidth(1, 64 << 20)  # small buffer: the test stays quick
    assert isinstance(bw, float)
    assert math.isfinite(bw) and bw > 0
    assert bw > 1e8            # 100 MB/s: any machine that runs the tests reads faster
    assert bw < 10e12          # 10 TB/s: no CPU reads faster


def test_read_bandwidth_default_buffer_and_two_threads():
    bw = qmoe.measure_read_bandwidth(2)  # 1 GiB, the default
    assert math.isfinite(bw) and 1e8 < bw < 10e12


def test_peak_flops_is_sane():
    f = qmoe.measure_peak_flops(1, seconds=0.05)
    assert isinstance(f, float)
    assert math.isfinite(f) and f > 0
    assert f > 1e8             # 0.1 GFLOP/s even for the portable kernels
    assert f < 1e13            # 10 TFLOP/s is beyond one CPU thread (or two)
    f2 = qmoe.measure_peak_flops(2, 0.05)
    assert math.isfinite(f2) and 1e8 < f2 < 2e13


def test_cpu_kernel_isa_is_the_one_layers_use():
    isa = qmoe.cpu_kernel_isa()
    assert isinstance(isa, str) and re.fullmatch(r"[a-z0-9_]+", isa), isa
    rng = np.random.default_rng(0)
    w1 = qmoe.quantize(rng.standard_normal((2, 32, 32), np.float32))
    w2 = qmoe.quantize(rng.standard_normal((2, 32, 32), np.float32))
    layer = qmoe.Layer(fc1_experts_weights=w1.weights, fc1_scales=w1.scales,
                       fc2_experts_weights=w2.weights, fc2_scales=w2.scales, threads=1)
    assert f"cpu/{isa} " in layer.kernel_name + " ", (isa, layer.kernel_name)


@pytest.mark.parametrize("threads", [0, -1])
def test_bad_threads_raise_value_error(threads):
    with pytest.raises(ValueError, match="threads"):
        qmoe.measure_read_bandwidth(threads, 1 << 20)
    with pytest.raises(ValueError, match="threads"):
        qmoe.measure_peak_flops(threads, 0.01)


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="nbytes"):
        qmoe.measure_read_bandwidth(1, 1000)
    for s in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="seconds"):
            qmoe.measure_peak_flops(1, s)
    with pytest.raises(TypeError):
        qmoe.measure_peak_flops(1, "fast")
    with pytest.raises(TypeError):
        qmoe.measure_read_bandwidth(1.5)


def test_measurements_release_the_gil():
    # A Python thread keeps counting while the measurement runs in C++.
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    th = threading.Thread(target=count)
    th.start()
    try:
        qmoe.measure_peak_flops(1, 0.2)
    finally:
        done.set()
        th.join()
    assert ticks[0] > 1000
