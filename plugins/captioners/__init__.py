"""Built-in captioners (dataset prep): registered through ``adapterhub_captioners``."""
from adapterhub.hookspecs import hookimpl


@hookimpl
def adapterhub_captioners():
    return []
