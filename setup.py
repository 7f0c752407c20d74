"""Package discovery pyproject.toml cannot express: ``plugins/<name>/`` installs as ``compress.plugins.<name>``.

Everything else (metadata, dependencies, scripts, package data) is in pyproject.toml. ``find_packages`` names
packages after their folders, so the plugins folder's packages are renamed here: a new method needs a
``plugins/<name>/`` folder and nothing in this file.
"""

from setuptools import find_namespace_packages, find_packages, setup

PACKAGES = [
    # namespace search: compress/_data holds package data and no __init__.py
    *find_namespace_packages(include=["compress", "compress.*"], exclude=["*.__pycache__"]),
    "compress.plugins",
    *(f"compress.plugins.{name}" for name in find_packages("plugins")),
]

setup(packages=PACKAGES, package_dir={"compress": "compress", "compress.plugins": "plugins"})
