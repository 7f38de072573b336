"""mechcopy: find and prune the neurons behind copy bias in in-context learning."""

from mechcopy.models import DEFAULT_MODEL, load_model

__version__ = "0.1.0"
__all__ = ["load_model", "DEFAULT_MODEL", "__version__"]
