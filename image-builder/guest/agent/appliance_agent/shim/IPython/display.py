"""IPython.display as notebook code imports it (the stand-in: see IPython/__init__.py)."""

from IPython.core.display import *  # noqa: F403
from IPython.core.display import __all__  # noqa: F401
