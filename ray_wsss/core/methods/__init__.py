"""Classification methods, one registry entry each: model, losses, class maps, defaults (see registry.py)."""
from __future__ import annotations

from ray_wsss.core.methods import acr, mct  # noqa: F401 - importing them registers the built-in methods
from ray_wsss.core.methods.registry import MapOptions, Method, get_method, list_methods, register_method

__all__ = ["MapOptions", "Method", "get_method", "list_methods", "register_method"]
