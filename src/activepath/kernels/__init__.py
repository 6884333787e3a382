"""Kernels: tensors in, tensors out. cpu/ (C++ built on first use), triton/ (GPU). Nothing here imports moe/."""
