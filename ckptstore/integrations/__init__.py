"""Integrations of ckptstore into training frameworks' own loops (docs/integrations.md).

Each integration is imported lazily, never by ``import ckptstore``: a user imports the one it needs
(``from ckptstore.integrations.keras import CkptStoreCallback``), which imports its framework.
"""
