"""yProv4ML's module path of its Lightning logger; the logger lives in integrations/lightning.py
(importing this module imports lightning)."""

from ..integrations.lightning import ProvMLLogger

__all__ = ["ProvMLLogger"]
