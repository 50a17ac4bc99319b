"""Generated blocks in the docs: the lines between a BEGIN marker line and an END marker,
rewritten by the benchmark that owns them (bench/aot_table.py, bench/input.py)."""


def rewrite(path: str, begin: str, end: str, body: str) -> None:
  """Replaces the lines after the line holding `begin`, up to `end`, by `body`."""
  with open(path) as f:
    text = f.read()
  a, b = text.find(begin), text.find(end)
  if a < 0 or b < a:
    raise SystemExit(f"{path}: no {begin} ... {end} block to rewrite")
  head = text.index("\n", a) + 1
  with open(path, "w") as f:
    f.write(text[:head] + body + "\n" + text[b:])
