import builtins


def get_ipython():
    """The worker's shell (magics, `!` commands), as IPython's get_ipython() returns the kernel's."""
    shell = getattr(builtins, "get_ipython", None)
    return shell() if shell is not None else None
