"""Output layouts, one module each behind :class:`~raysft.layouts.base.Layout`, registered here.

Adding a layout is one module and one line in ``REGISTRY``."""

from __future__ import annotations

from .base import IGNORE, Layout, Placement
from .bridge import Bridge, BridgeNpy
from .llamafactory import LlamaFactory
from .mindspeed import MindSpeed
from .native import Native
from .pai import Pai
from .xtuner import XTuner

REGISTRY: dict[str, Layout] = {cls.name: cls() for cls in (Native, Pai, MindSpeed, XTuner, Bridge, BridgeNpy,
                                                             LlamaFactory)}
LAYOUTS = tuple(REGISTRY)
PAIR_LAYOUTS = tuple(name for name, layout in REGISTRY.items() if layout.pairs)


def get_layout(name: str) -> Layout:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None


def layout_of(stats: dict) -> Layout:
    """The layout an output folder was written in (its stats.json): a preference-pair build's
    is the layout's pair form."""
    return get_layout(stats.get("layout", "native")).form(bool(stats.get("pairs")), bool(stats.get("packed", True)))


__all__ = ["IGNORE", "LAYOUTS", "PAIR_LAYOUTS", "REGISTRY", "Layout", "Placement", "get_layout", "layout_of"]
