"""Only the package layout lives here: `plugins/` is installed as `adapterhub_plugins`."""
from setuptools import find_packages, setup

core = find_packages(include=["adapterhub", "adapterhub.*"])
plugins = ["adapterhub_plugins"] + [f"adapterhub_plugins.{p}" for p in find_packages("plugins")]
setup(packages=core + plugins, package_dir={"adapterhub_plugins": "plugins"})
