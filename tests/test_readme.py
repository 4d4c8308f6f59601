"""The README's Python examples run as written, and its first two commands are the documented ones."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TEXT = open(README, encoding="utf-8").read()
# A block starting "# FILE.py" is a file for the command line (tests/test_plugins.py runs it there).
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", TEXT, re.S) if not re.match(r"# \w+\.py\n", b)]


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_python_example_runs(i):
  exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {})


def test_first_two_commands_are_main_job_then_tests():
  first = re.search(r"```bash\n(.*?)```", TEXT, re.S).group(1)
  commands = [line for line in first.splitlines() if line and not line.startswith("#")]
  assert "efficient-attn experiment quickstart" in commands[0] and "pip install -e ." in commands[0]
  assert commands[1].endswith("python -m pytest -q tests") and 'pip install -e ".[test]"' in commands[1]
  ci = open(os.path.join(os.path.dirname(README), ".ci", "run"), encoding="utf-8").read()
  assert "python -m pytest -q tests" in ci
