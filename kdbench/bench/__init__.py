"""Side-by-side speed measurements of kdbench's ops against what users would otherwise run.

* :mod:`kdbench.bench.cases`     what is measured: op, direction, shape, dtype, bytes moved;
  the headline shapes per device and the small ones of the pytest benchmarks.
* :mod:`kdbench.bench.providers` who is measured: kdbench (triton, torch), naive PyTorch
  eager, ``torch.compile`` of it, Liger-Kernel, torchmetrics; each output is checked
  against a float64 oracle before anything is timed.
* :mod:`kdbench.bench.measure`   timing (synchronised), copy bandwidth, peak extra memory.
* :mod:`kdbench.bench.report`    targets, Markdown and JSON, written atomically.
* :mod:`kdbench.bench.cli`       ``kdbench bench`` and ``kdbench bench --check``.

Nothing here queries a device or imports triton at import time.
"""
