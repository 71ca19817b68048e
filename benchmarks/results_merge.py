"""Results JSON files gather runs from several sessions: ``runs/`` (the checkpoints) is lost with
each machine, so a ``collect`` that rebuilt a results file from ``runs/`` alone would drop the
rows measured earlier. ``with_earlier_rows`` keeps them, each stamped with its machine."""
from __future__ import annotations

import json
from pathlib import Path

from g2quant.targets.cpu.isa import cpu_model


def with_earlier_rows(rows: list[dict], dest: Path, keep=lambda r: True) -> list[dict]:
    """``rows`` (stamped with this machine) plus the rows of ``dest`` (if it exists) whose
    ``model`` is not among them and that ``keep`` accepts (stamped with the machine they recorded)."""
    machine = cpu_model()
    for r in rows:
        r.setdefault("machine", machine)
    old = json.loads(Path(dest).read_text()) if Path(dest).exists() else {}
    new = {r.get("model") for r in rows}
    for r in old.get("models", []):
        if r.get("model") not in new and keep(r):
            r.setdefault("machine", old.get("machine"))
            rows.append(r)
    return rows
