"""adapterhub's built-in plugins, installed as ``adapterhub_plugins``.

Each sub-package is registered through the entry-point group ``adapterhub`` in ``pyproject.toml``,
exactly as a third-party plugin would be.
"""
