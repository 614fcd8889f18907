"""A stand-in for IPython in a guest that has no IPython: what notebook code imports from it to show rich output.

The worker puts this directory last on sys.path, so a real IPython that the image or %pip installs wins.
"""

from IPython.core.display import display
from IPython.core.getipython import get_ipython

__all__ = ["display", "get_ipython"]
version_info = (0, 0, 0, "appliance")
