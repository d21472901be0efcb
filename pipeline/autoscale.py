"""The Batch pool's autoscale formula, from the one template that infra/batch.bicep also uses.

infra/autoscale-formula.txt holds the formula with two placeholders, `{0}` (most nodes) and `{1}`
(1 for spot nodes, 0 for dedicated). Bicep fills it with `format(loadTextContent(...), maxNodes, 0)`:
the template's Batch-service account has dedicated nodes only (spot needs a user-subscription account,
docs/deploy.md); `autoscale_formula` fills it with `str.format`, so a pool the app creates or updates
and the pool `azd up` creates scale the same way. tests/test_infra.py checks that both agree.

What the formula does, evaluated every 5 minutes:
- it counts `$PendingTasks` (active + running tasks; not `$ActiveTasks`, which falls as soon as tasks
  start and would shrink the pool under running work): the last sample, or when at least 70 % of the
  last 5 minutes' samples exist, the larger of the last sample and their average;
- one task per node (`taskSlotsPerNode: 1`), so that count, capped at `max_nodes`, is the node target:
  an idle pool sits at 0 nodes and costs nothing;
- the target goes to `$TargetLowPriorityNodes` (spot) or to `$TargetDedicatedNodes`, the other is 0;
- `$NodeDeallocationOption = taskcompletion`: a node being removed finishes its task first.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "infra" / "autoscale-formula.txt"


def formula_template(path: Path = TEMPLATE_PATH) -> str:
    """The formula template text, exactly as Bicep's loadTextContent reads it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"autoscale formula template not found at {path}; it ships in infra/ and must be deployed with the app"
        ) from exc


def autoscale_formula(max_nodes: int, use_spot: bool) -> str:
    """The autoscale formula for a pool of at most `max_nodes` nodes, spot or dedicated."""
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int):
        raise TypeError(f"max_nodes must be an int, got {type(max_nodes).__name__}")
    if not 1 <= max_nodes <= 100:
        raise ValueError(f"max_nodes must be between 1 and 100 (the Bicep parameter's range), got {max_nodes}")
    return formula_template().format(max_nodes, 1 if use_spot else 0)
