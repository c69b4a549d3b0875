"""The PyPI model zoo under its earlier name: ``from kvzip_cache.models import load_pypi_model`` keeps working.

The code lives in `kvzip_cache.zoo` (tooling, apart from the core); this module only re-exports it.
"""

from .zoo.models import *  # noqa: F401,F403
from .zoo.models import __all__  # noqa: F401
