"""Which device this worker trains and samples on, and the synthesizer arguments that select it.

Read by :mod:`.engine` (building and loading models) and :mod:`.training` (resuming a checkpoint on
another worker); it imports neither, so they need not import each other for it.
"""

from __future__ import annotations

import logging
from typing import Any

from synthfactory import kinds

log = logging.getLogger(__name__)

__all__ = ["detect_device", "device_params"]


def detect_device(log_warning: bool = True, kind: str = "") -> str:
    """``cuda`` when torch sees a CUDA device, else ``cpu`` (with a warning: neural training belongs on GPU workers)."""
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a dependency of sdv
        cuda = False
    if not cuda and log_warning:
        log.warning("%sno CUDA device found; training on CPU (route neural synthesizers to the gpu queue)",
                    f"{kind}: " if kind else "")
    return "cuda" if cuda else "cpu"


def device_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Set the device argument of a GPU-capable kind from what this worker has (its registry entry's
    ``device_param``: ``enable_gpu`` for CTGAN/TVAE/CopulaGAN, ``cuda`` for PAR). An explicit value in the
    spec's params wins."""
    entry = kinds.get(kind)
    name = entry.device_param if entry is not None else None
    if name is None or name in params:
        return params
    return {**params, name: detect_device(kind=kind) == "cuda"}
