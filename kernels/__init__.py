"""Triton kernels (@triton.jit functions and their launch helpers only; the torch.library
registration lives in recsys_kernels/ops/). Installed as recsys_kernels._triton."""
