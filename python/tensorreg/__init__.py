"""tensorreg: content-addressed registration of PyTorch state dicts through tensorregd.

    import tensorreg
    with tensorreg.Store() as store:
        art = store.put(model.state_dict())
        print(art.artifact_id)                 # mi2:<index multihash>:<data multihash>
        tensors = store.get(art.artifact_id)   # zero-copy CPU views of the daemon's copy
        views = store.open(art.artifact_id)    # zero-copy CUDA views of its GPU copy

The client speaks docs/wire-format.md over the daemon's Unix socket: pure Python, no C
extension; the protobuf message classes are built at run time from a descriptor set, so it
works with protobuf-python 3.21 through 7.x. Importing the package needs only protobuf; the
tensor calls import torch (1.13 or 2.x) when first used, and the CUDA ones load the driver
(libcuda.so.1, through ctypes) then.
"""

from . import errors as _errors
from ._layout import canonical_json
from ._registrar import Registrar
from ._wire import default_socket_path
from .errors import *  # noqa: F401,F403 - Error and one subclass per status code
from .store import AssemblyStatus, Lease, LocalStableTier, Narrow, RegisteredArtifact, Store, Transpose, ViewRegistration
from .weight_sync import Version, WeightPublisher, WeightSubscriber

__version__ = "0.1.0"

__all__ = [
    "Store",
    "RegisteredArtifact",
    "Lease",
    "LocalStableTier",
    "Registrar",
    "ViewRegistration",
    "AssemblyStatus",
    "Narrow",
    "Transpose",
    "WeightPublisher",
    "WeightSubscriber",
    "Version",
    "default_socket_path",
    "canonical_json",
]
__all__ += [name for name in _errors.__all__ if name != "error_for_code"]
