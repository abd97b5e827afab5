"""Compression passes: one module per pass family, registered by name (see base.py for the contract)."""

from .base import (
    ENTRY_POINT_GROUP,
    Context,
    Pass,
    PassConfig,
    PassReport,
    PassResult,
    available_passes,
    get_pass,
    register_pass,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Context",
    "Pass",
    "PassConfig",
    "PassReport",
    "PassResult",
    "available_passes",
    "get_pass",
    "register_pass",
]
