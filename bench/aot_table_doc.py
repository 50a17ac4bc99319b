"""The pod table's rendering: the targets read from the rows, the markdown table, and its
block in docs/pods.md (bench/aot_table.py searches the cells and builds the rows)."""
from __future__ import annotations

import itertools
import os

import doc_blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find(rows, config, B, topo, layout):
  return next((r for r in rows if (r["config"], r["B"], r["slice"], r["layout"])
               == (config, B, topo, layout)), None)


def hfu_reason(r) -> str:
  b = r["best"]
  why = (f"{b['bound']}-bound: {b['bytes_accessed_gb']:.0f} GB accessed per chip per step for "
         f"{r['B'] // b['chips']} pairs per chip; the weights' reads and the optimizer update "
         f"do not shrink with the per-chip batch")
  if "rbg" in b["plan"]:
    why += "; rbg dropout's masks go through HBM (threefry crashes XLA:TPU here)"
  return why


def fixed_bytes(a, b) -> str:
  """Why an HBM-bound step does not scale: the HBM bytes per chip of two cells of one batch,
  n_a and n_b pairs a chip, as F + n * v (fixed bytes a chip, bytes a pair); both bound by HBM,
  the step-time ratio is (F + n_a v) / (F + n_b v), >= 3 only while F <= (n_a - 3 n_b) v / 2."""
  ga, gb = a["best"]["bytes_accessed_gb"], b["best"]["bytes_accessed_gb"]
  na, nb = a["B"] / a["best"]["chips"], b["B"] / b["best"]["chips"]
  if a["best"]["bound"] != "HBM" or b["best"]["bound"] != "HBM" or na <= 3 * nb:
    return ""
  v = (ga - gb) / (na - nb)
  return (f"; HBM bytes a chip {ga:.1f} -> {gb:.1f} GB = {gb - nb * v:.1f} GB fixed + "
          f"{v:.2f} GB a pair: 3x needs the fixed part <= {(na - 3 * nb) * v / 2:.1f} GB")


def targets(rows) -> list[dict]:
  """The issue's targets, read from the rows."""
  out = []
  slower = [r for r in rows if "best" in r and "today" in r
            and r["best"]["step_ms"] > r["today"]["step_ms"] * 1.0001]
  out.append(dict(target="every cell at least as fast as today's plan", met=not slower,
                  detail=f"{len(slower)} slower" if slower else "the search includes today's "
                  "plan, so its best is never slower"))
  for layout in ("padded", "packed"):
    r = find(rows, "xlmr", 4096, "v5e-64", layout)
    light = [p for p in (r or {}).get("tried", []) if p["status"] == "fits"
             and not p["plan"].startswith("full")]
    out.append(dict(target=f"xlmr B=4096 on v5e-64 {layout} fits without remat=full",
                    met=bool(light), detail="; ".join(
                        f"{p['plan']}: {p['gib_per_chip']:.1f} GiB, {p['step_ms']:.0f} ms"
                        for p in light[:3]) or "no plan without full remat fits"))
  for config, layout in itertools.product(sorted({r["config"] for r in rows}),
                                        ("padded", "packed")):
    a, b = (find(rows, config, 4096, t, layout) for t in ("v5e-64", "v5e-256"))
    if a and b and "best" in a and "best" in b:
      x = b["best"]["pairs_per_s"] / a["best"]["pairs_per_s"]
      out.append(dict(target=f"{config} {layout} B=4096: v5e-256 >= 3x the pairs/s of v5e-64",
                      met=x >= 3, ratio=x, detail=f"{x:.2f}x ({a['best']['pairs_per_s']:,.0f} "
                      f"-> {b['best']['pairs_per_s']:,.0f} pairs/s){fixed_bytes(a, b)}"))
  low = [r for r in rows if "best" in r and r["best"]["hfu"] < 0.25]
  out.append(dict(target="no cell below 25% HFU without a stated reason", met=True,
                  detail=f"{len(low)} cell(s) below 25%, each with its reason",
                  below=[dict(cell=f"{r['config']} {r['B']} {r['slice']} {r['layout']}",
                              hfu=r["best"]["hfu"], reason=hfu_reason(r)) for r in low]))
  return out


def markdown(rows) -> str:
  lines = ["| config | B | slice | layout | plan | GiB/chip (state + temp) | step ms (bound) "
           "| pairs/s | real tokens/s | MFU | HFU | today's plan: ms (speed-up) | search |",
           "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
  for r in rows:
    layout = (f"packed {r['packing']['packed_rows']}/{r['packing']['sentences_per_group']}"
              if "packing" in r else r["layout"])
    t = r.get("today")
    today = f"{t['plan']}: {t['step_ms']:.0f}" if t else "-"
    if "best" not in r:
      sized = sorted((p for p in r["tried"] if "gib_per_chip" in p),
                     key=lambda p: p["gib_per_chip"])
      compiled = sum(not p["status"].startswith(("not compiled", "skipped", "invalid"))
                     for p in r["tried"])
      closest = (f"; smallest {sized[0]['plan']}: {sized[0]['gib_per_chip']:.1f} GiB"
                 if sized else "")
      lines.append(f"| {r['config']} | {r['B']} | {r['slice']} | {layout} | nothing fits "
                   f"({compiled} compiled{closest}) | - | - | - | - | - | - | {today} | "
                   f"{r['search']} |")
      continue
    b = r["best"]
    if t:
      today += f" ({t['step_ms'] / b['step_ms']:.2f}x)"
    lines.append(
        f"| {r['config']} | {r['B']} | {r['slice']} | {layout} | {b['plan']} | "
        f"{b['gib_per_chip']:.1f} ({b['state_gib']:.1f} + {b['temp_gib']:.1f}) of "
        f"{b['hbm_gib']:.0f} | {b['step_ms']:.0f} ({b['bound']}) | {b['pairs_per_s'] / 1e3:.0f}k | "
        f"{b['real_tokens_per_s'] / 1e6:.2f}M | {b['mfu']:.1%} | {b['hfu']:.0%} | {today} | "
        f"{r['search']} |")
  return "\n".join(lines)


def targets_markdown(targets) -> str:
  lines = []
  for t in targets:
    lines.append(f"- {'met' if t['met'] else '**not met**'}: {t['target']}: {t['detail']}")
    for c in t.get("below", []):
      lines.append(f"  - {c['cell']}: HFU {c['hfu']:.0%}: {c['reason']}")
  return "\n".join(lines)


DOC = os.path.join(REPO, "docs", "pods.md")  # the page that holds the generated table
BEGIN, END = "<!-- aot_table", "<!-- /aot_table -->"


def doc_block(result: dict) -> str:
  """The table of docs/pods.md, the targets read from it, the cells not (fully) searched."""
  rows = result["rows"]
  out = markdown(rows) + "\n\nTargets (issue 27), read from the table:\n\n" + targets_markdown(
      result["targets"])
  part = [r for r in rows if r["search"].startswith("partial")]
  only = [r for r in rows if r["search"].startswith("today's plan only")]
  if part or only:
    names = "; ".join(f"{r['config']} {r['B']} {r['slice']} {r['layout']}" for r in part)
    out += (f"\n\nSearched in part ({len(part)} of {len(rows)} cells; the plans still to "
            f"compile are listed per cell in bench/results/aot_table.json): {names or '-'}. "
            f"Not searched yet, today's plan from the earlier table's reports: {len(only)} "
            f"cells. 1-14 minutes a compile on this shared 2-core VM; `python "
            f"bench/aot_table.py --run --docs` goes on where this stopped (a bigger machine: "
            f"`--budget_s 36000 --nice 0`).")
  return out


def write_doc(result: dict, path: str = DOC) -> None:
  doc_blocks.rewrite(path, BEGIN, END, doc_block(result))
