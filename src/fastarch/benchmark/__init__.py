"""Benchmark report: ``fastarch bench`` (see :mod:`fastarch.benchmark.cli`).

* :mod:`fastarch.benchmark.suite`: the microbenchmarks (``--ops``), which run the cases of a
  source checkout's ``bench/`` scripts and draw them.
* :mod:`fastarch.benchmark.e2e`: eager vs ``torch.compile`` with Inductor vs with the
  ``"fastarch"`` backend on small random-weight models (``--models``); needs no checkout.
* :mod:`fastarch.benchmark.report`: the header (machine, ISA, versions, command), markdown and
  PNG plots.
"""
