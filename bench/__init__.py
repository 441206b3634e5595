"""Benchmarks of blpa against plain autodiff and recompute_grad.

See README.md in this folder.
"""
