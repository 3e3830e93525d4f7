"""Print a run's SFT learning curve (training/learning_curve.json) as a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
lc = json.loads((run / "training" / "learning_curve.json").read_text())
refs = lc["references"]
print(f"{run.name}: references prior {refs['ref_ntp_prior']:.3f} "
      f"history {refs['ref_ntp_history']:.3f}")
keys = ["step", "wall_s", "valid_prefix_ntp", "prefix_hit@10", "in_prefix_hit@10", "valid_hr10",
        "valid_hr10_JustForYou", "prefixes_in_top_lists", "valid_l_infonce", "valid_loss"]
print(" | ".join(keys))
for v in lc["validations"]:
    print(" | ".join(f"{v[k]:.3f}" if isinstance(v.get(k), float) else str(v.get(k, "-"))
                     for k in keys))
