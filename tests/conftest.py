import os

# Triton kernels run on CPU tensors under the interpreter on machines without a GPU. Set before
# recsys_kernels is imported: the triton backend's device list is fixed at import.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import recsys_kernels


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    previous = recsys_kernels.set_backend(None)
    yield
    recsys_kernels.set_backend(previous)
