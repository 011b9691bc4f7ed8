"""The prefixes that wrappers of a torch module add to every key of its state dict: ``_orig_mod.``
(``torch.compile``) and ``module.`` (DDP, ``DataParallel``), in any nesting. Without torch: the export to
model hubs strips them too (``ckptstore.export``)."""

from __future__ import annotations

from typing import Any

WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def wrapper_prefix(keys: list[Any]) -> str:
    """The longest chain of wrapper prefixes (``module._orig_mod.``) that every key starts with (and goes on
    after); "" for none, or for no keys."""
    if not keys or not all(type(k) is str for k in keys):
        return ""
    prefix = ""
    while True:
        for p in WRAPPER_PREFIXES:
            longer = prefix + p
            if all(k.startswith(longer) and len(k) > len(longer) for k in keys):
                prefix = longer
                break
        else:
            return prefix
