"""Triton kernels for the GPU experts backend (checked under TRITON_INTERPRET=1 in CI)."""
