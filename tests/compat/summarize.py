"""Per-method agreement with mergekit 0.1.5, from a compat run's report, as a markdown table.

    DISTMERGE_COMPAT_REPORT=compat.json pytest -m mergekit
    python -m tests.compat.summarize compat.json

Each row: the cases of that method that ran to a comparison (and how many passed), the smallest share of
bit-identical elements, the largest elementwise difference in ulps of the output dtype, the
largest difference in ulps of a tensor's largest magnitude, and how many cases were passed
only because their differing elements sit on a magnitude tie (docs/methods.md, difference 1).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def summarize(report: dict[str, dict]) -> str:
    by_method: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for case_id, row in report.items():
        by_method[row["method"], row.get("compute_dtype", "")].append({**row, "id": case_id})
    lines = ["| method | compute | cases (passed) | bit-identical share (lowest) | max ulp | max ulp of tensor max "
             "| passed on ties |", "|---|---|---:|---:|---:|---:|---:|"]
    for method, dtype in sorted(by_method):
        rows = by_method[method, dtype]
        passed = sum(bool(r.get("passed")) for r in rows)
        if any(r.get("kind") == "random" for r in rows):
            lines.append(f"| `{method}` | {dtype} | {len(rows)} ({passed}) | other random draws: structure, kept "
                         "share and L1 of the change compared | | | |")
            continue
        lines.append(f"| `{method}` | {dtype} | {len(rows)} ({passed}) | {min(r['identical_share'] for r in rows):.2%} | "
                     f"{max(r['max_ulp'] for r in rows)} | {max(r['max_tensor_ulp'] for r in rows):.2f} | "
                     f"{sum(bool(r.get('tie_excused')) for r in rows)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(json.loads(Path(sys.argv[1]).read_text())))
