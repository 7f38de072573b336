"""Models: the offline zoo, `load_model`, tiny random models and HookedMamba."""

from mechcopy.models.loading import load_model
from mechcopy.models.zoo import DEFAULT_MODEL, ZOO, ZooError, fetch

__all__ = ["load_model", "DEFAULT_MODEL", "ZOO", "ZooError", "fetch"]
