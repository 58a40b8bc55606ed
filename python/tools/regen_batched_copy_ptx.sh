#!/bin/sh
# Regenerates python/tensorreg/_batched_copy.ptx from python/kernels/batched_copy.cu: the PTX the
# Python client hands the CUDA driver to JIT-compile (it ships no GPU binary and needs no
# compiler). compute_75 is the oldest architecture CUDA 13 targets. Commit the result.
# With --check OUT: writes to OUT instead (ctest compares it with the committed file).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/python/tensorreg/_batched_copy.ptx"
[ "${1:-}" = "--check" ] && out=$2
nvcc=${NVCC:-nvcc}
command -v "$nvcc" >/dev/null 2>&1 || nvcc=/usr/local/cuda/bin/nvcc
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$nvcc" -ptx -arch=compute_75 -O3 -o "$tmp" "$root/python/kernels/batched_copy.cu"
# nvcc's header comments name its build: dropped, so that the check compares code only.
grep -v '^//' "$tmp" >"$out"
echo "wrote $out"
