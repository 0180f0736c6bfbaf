"""Test configuration. Triton kernels run through its interpreter on CPU: the variable must be
set before triton is first imported, so it is set here, at collection time."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
