"""One style: every Python file of the project indents its blocks by 2 spaces (ruff's E111
cannot check a width other than 4; ruff.toml holds the rest, run by .ci/run)."""
import glob
import io
import os
import tokenize

from tests.conftest import REPO

DIRS = ("bepa_jax", "launch", "bench", "configs", "tests")


def _files():
  out = [os.path.join(REPO, "setup.py")]
  for d in DIRS:
    out += glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True)
  return sorted(out)


def test_blocks_are_indented_by_two_spaces():
  bad = []
  for path in _files():
    with open(path, encoding="utf-8") as f:
      src = f.read()
    depth = [0]
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
      if tok.type == tokenize.INDENT:
        width = len(tok.string.expandtabs(8))
        if "\t" in tok.string or width - depth[-1] != 2:
          bad.append(f"{os.path.relpath(path, REPO)}:{tok.start[0]}")
        depth.append(width)
      elif tok.type == tokenize.DEDENT:
        depth.pop()
  assert not bad, f"{len(bad)} blocks not indented by 2 spaces, first: {bad[:5]}"
