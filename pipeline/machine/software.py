"""Whether a Python module is installed on this machine, without importing it.

The backends (is LightX2V importable, is sageattention there) and the setup doctor ask the same
question; it lives here, with the other readings of the machine, so neither imports the other."""

from __future__ import annotations

from importlib.util import find_spec


def module_present(name: str) -> bool:
    """Whether `name` can be imported (find_spec: nothing is imported). A dotted name whose parent
    package is missing, or a module without a spec, counts as absent."""
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False
