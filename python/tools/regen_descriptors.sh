#!/bin/sh
# Regenerates python/tensorreg/_descriptors.bin, the serialized FileDescriptorSet the Python
# client builds its message classes from at run time (no protoc-generated code is shipped, so
# one client works with every protobuf-python runtime, 3.x through 7.x).
# Run from anywhere after editing a .proto under proto/; commit the result.
# With --check OUT: writes to OUT instead (ctest compares it with the committed file).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/python/tensorreg/_descriptors.bin"
[ "${1:-}" = "--check" ] && out=$2
protoc --include_imports \
  --descriptor_set_out="$out" \
  -I"$root/proto" \
  "$root/proto/tensorcast/common/v1/common.proto" \
  "$root/proto/tensorcast/daemon/v2/store_daemon.proto" \
  "$root/proto/tensorreg/wire/v1/frame.proto"
echo "wrote $out"
