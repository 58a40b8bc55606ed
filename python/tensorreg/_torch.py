"""torch, imported on first use (importing tensorreg needs only protobuf), and the parsing of
the `device` argument of get() and open().

Thread-safety: pure functions.
"""

from __future__ import annotations

from .errors import InvalidArgument, Unimplemented


def module():
    """The torch module. Errors: Unimplemented when torch is not importable."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise Unimplemented(f"cannot use tensors: torch is not importable ({e})") from None
    return torch


def device(torch, device, what: str):
    """torch.device(device). Errors: InvalidArgument naming the bad device."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgument(f"cannot {what}: bad device {device!r}: {e}") from None
