# One-off: why do C++ exceptions from _C_cuda segfault on the GPU machine? (not committed)
set -x
/opt/gcc/bin/gcc --version | head -1; gcc --version | head -1; echo "CC=${CC:-} CXX=${CXX:-}"
so=$(python3 -c "import recsys_kernels._C_cuda as m; print(m.__file__)"); ldd "$so" | grep -E "stdc|gcc_s|torch"
readelf -p .comment "$so" | head -8
readelf -p .comment "$(dirname $(python3 -c 'import torch;print(torch.__file__)'))/lib/libtorch_cuda.so" | head -5
for s in cpu cuda_pre cuda_post; do timeout 60 python3 .gpudiag/diag.py $s; echo "rc=$?"; done
timeout 100 cuda-gdb -q -batch -ex "set pagination off" -ex "set auto-solib-add off" -ex run -ex "sharedlibrary _C_cuda" -ex "sharedlibrary libstdc" -ex "sharedlibrary libgcc_s" -ex "sharedlibrary libc10" -ex "bt 40" --args python3 .gpudiag/diag.py cuda_pre 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -80
