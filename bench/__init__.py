"""kubetune benchmarks: each stage against the "course template" it replaces, side by side.

Run from the repository root::

    python -m bench.run --quick        # a few minutes: make bench-quick
    python -m bench.run --full         # make bench
    python -m bench.run --quick --only prepare,evaluate

Results go to ``bench/results/latest.json`` (one named figure per line item plus the
machine) and a table on stdout; ``bench/RESULTS.md`` explains them. ``bench/gpu.sh``
is the separate script for a machine with an NVIDIA GPU.
"""
