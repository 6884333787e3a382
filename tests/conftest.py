"""Session-wide test settings."""

import os

# CI has no GPU: the Triton kernels are checked in Triton's CPU interpreter. Triton reads
# this once, when it is first imported, so it is set before any test can import it.
os.environ.setdefault("TRITON_INTERPRET", "1")
