"""Package discovery only; everything else is declared in pyproject.toml.

The experiment configs live at the top level of the repository (configs/) and ship inside the package as
`nemojax.configs` (pyproject.toml maps the folder with `package-dir`). setuptools' `packages.find` in pyproject.toml
only finds packages under their own folders, so the list is built here: every package under nemojax/ and
pallas_kernels/, plus the mapped `nemojax.configs`.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["nemojax", "nemojax.*", "pallas_kernels", "pallas_kernels.*"])
      + ["nemojax.configs"])
