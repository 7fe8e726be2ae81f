"""Triton implementation of the rlhfv operators (torch.ops.rlhfv_triton.*): CUDA tensors, or CPU tensors when
TRITON_INTERPRET=1 was set before this package was imported. Importing it registers the operators."""
from . import ops  # noqa: F401
