"""Packaging beyond pyproject.toml: the one mapping it cannot express.

The experiment files (experiments/*.py) ship inside the wheel as efficient_attn/_experiments/,
where the experiment runner (efficient_attn/experiment.py) loads them by path; no top-level
`experiments` package is installed, so a user's own `experiments` is never shadowed.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["efficient_attn", "efficient_attn.*"]), "efficient_attn._experiments"],
      package_dir={"efficient_attn._experiments": "experiments"})
