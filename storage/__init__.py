"""Persistence: the only package that talks SQL (SQLAlchemy 2, SQLite)."""
from storage.api import Storage
from storage.errors import DiskError, StorageError
from storage.records import Baseline, Layer, Measurement, PaletteInfo, Search, StoredRecipe, Validation

__all__ = ["Storage", "StorageError", "DiskError", "Baseline", "Layer", "Measurement", "PaletteInfo", "Search", "StoredRecipe", "Validation"]
