"""Benchmark scripts (run them as files: ``python benchmarks/protocol_p.py``); a package so that
the tests import the plain reference procedure as ``benchmarks.reference_sparsegpt``."""
