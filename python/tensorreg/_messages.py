"""The wire message classes, built at run time from a serialized FileDescriptorSet.

`_descriptors.bin` is what `protoc --include_imports --descriptor_set_out` writes for the three
.proto files under proto/ (python/tools/regen_descriptors.sh). Building the classes from it,
rather than shipping protoc-generated `_pb2` modules, keeps one client working with every
protobuf-python runtime: generated code is tied to the protoc that made it, while a
descriptor set is plain data every runtime reads.

The files go into a private DescriptorPool, so they never clash with another copy of the same
.proto files (or of google/protobuf/timestamp.proto) in the process's default pool.

Thread-safety: everything is built once, on first use, under a lock; the classes are then
shared read-only.
"""

from __future__ import annotations

import os
import threading

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

WIRE = "tensorreg.wire.v1"
DAEMON = "tensorcast.daemon.v2"
COMMON = "tensorcast.common.v1"

_lock = threading.Lock()
_pool = None
_classes: dict = {}


def _load_pool():
    global _pool
    if _pool is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_descriptors.bin")
        with open(path, "rb") as f:
            files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
        pool = descriptor_pool.DescriptorPool()
        # protoc writes dependencies before the files that import them.
        for fdp in files.file:
            pool.AddSerializedFile(fdp.SerializeToString())
        _pool = pool
    return _pool


def _class_of(descriptor):
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:  # protobuf >= 4.21
        return get(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def message(full_name: str):
    """The message class of `full_name` ("tensorreg.wire.v1.Request")."""
    cls = _classes.get(full_name)
    if cls is not None:
        return cls
    with _lock:
        cls = _classes.get(full_name)
        if cls is None:
            cls = _class_of(_load_pool().FindMessageTypeByName(full_name))
            _classes[full_name] = cls
    return cls


_enum_values: dict = {}


def enum_value(full_enum_name: str, value_name: str) -> int:
    """The number of `value_name` in the enum `full_enum_name` (cached: registration asks for the
    same few once per region)."""
    key = (full_enum_name, value_name)
    number = _enum_values.get(key)
    if number is None:
        with _lock:
            pool = _load_pool()
        number = _enum_values[key] = pool.FindEnumTypeByName(full_enum_name).values_by_name[value_name].number
    return number


def enum_name(full_enum_name: str, number: int) -> str:
    """The name of `number` in the enum `full_enum_name`, or str(number) if it has none."""
    with _lock:
        pool = _load_pool()
    value = pool.FindEnumTypeByName(full_enum_name).values_by_number.get(number)
    return value.name if value is not None else str(number)


def Request():
    return message(WIRE + ".Request")()


def Response():
    return message(WIRE + ".Response")()


def FeedRequest():
    return message(DAEMON + ".FeedRegisterArtifactStreamRequest")()
