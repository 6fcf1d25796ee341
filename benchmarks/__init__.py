"""Speed and memory benchmarks for sparse_sinkhorn (run from the repo root).

* ``python -m benchmarks.attention``  — the first benchmark: op-level fwd+bwd vs length.
* ``python -m benchmarks.sweep``      — the full sweep (op and layer level, all contenders).
* ``python -m benchmarks.throughput`` — matmul GFLOP/s vs the op's analytic FLOPs.
"""
