"""Output layouts, one module each behind :class:`~raysft.layouts.base.Layout`, registered here.

Adding a layout is one module and one line in ``REGISTRY``."""

from __future__ import annotations

from .base import IGNORE, Layout, Placement
from .bridge import Bridge, BridgeNpy
from .mindspeed import MindSpeed
from .native import Native
from .pai import Pai
from .xtuner import XTuner

REGISTRY: dict[str, Layout] = {cls.name: cls() for cls in (Native, Pai, MindSpeed, XTuner, Bridge, BridgeNpy)}
LAYOUTS = tuple(REGISTRY)


def get_layout(name: str) -> Layout:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None


__all__ = ["IGNORE", "LAYOUTS", "REGISTRY", "Layout", "Placement", "get_layout"]
