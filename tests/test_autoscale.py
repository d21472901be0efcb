"""pipeline/autoscale.py: the Batch pool's autoscale formula, filled from infra/autoscale-formula.txt."""

from __future__ import annotations

import re

import pytest

from pipeline.autoscale import TEMPLATE_PATH, autoscale_formula, formula_template


def statements(formula: str) -> dict[str, str]:
    """`$name = expression;` statements → {name: expression}; every statement must have that shape."""
    parts = [p.strip() for p in formula.split(";") if p.strip()]
    out = {}
    for part in parts:
        m = re.fullmatch(r"\$(\w+)\s*=\s*(.+)", part, re.S)
        assert m, f"not an assignment: {part!r}"
        assert m.group(1) not in out, f"assigned twice: {m.group(1)}"
        out[m.group(1)] = m.group(2).strip()
    return out


def test_template_is_the_file_in_infra():
    assert TEMPLATE_PATH.parent.name == "infra"
    assert TEMPLATE_PATH.name == "autoscale-formula.txt"
    text = formula_template()
    assert "{0}" in text and "{1}" in text


@pytest.mark.parametrize("max_nodes", [1, 4, 100])
def test_dedicated_nodes_capped_at_max(max_nodes):
    formula = autoscale_formula(max_nodes, use_spot=False)
    assert "{" not in formula and "}" not in formula
    s = statements(formula)
    assert s["nodes"] == f"min({max_nodes}, $pending)"
    assert s["spot"] == "0"
    assert s["TargetDedicatedNodes"] == "$spot == 1 ? 0 : $nodes"
    assert s["TargetLowPriorityNodes"] == "$spot == 1 ? $nodes : 0"


def test_spot_nodes_when_asked():
    s = statements(autoscale_formula(8, use_spot=True))
    assert s["spot"] == "1"
    assert s["nodes"] == "min(8, $pending)"


def test_spot_and_dedicated_differ_only_in_the_flag():
    on = autoscale_formula(5, use_spot=True).splitlines()
    off = autoscale_formula(5, use_spot=False).splitlines()
    diff = [(a, b) for a, b in zip(on, off, strict=True) if a != b]
    assert diff == [("$spot = 1;", "$spot = 0;")]


def test_driven_by_pending_tasks_from_zero_and_drains_with_taskcompletion():
    s = statements(autoscale_formula(3, use_spot=False))
    # $PendingTasks = active + running: the pool does not shrink under running tasks
    assert "$ActiveTasks" not in autoscale_formula(3, use_spot=False)
    assert s["lastPending"] == "max(0, $PendingTasks.GetSample(1))"
    assert "$PendingTasks" in s["samplePercent"] and "$PendingTasks" in s["pending"]
    # no floor: with nothing pending the target is min(N, 0) = 0 nodes
    assert not re.search(r"max\(\s*[1-9]", s["nodes"])
    assert s["NodeDeallocationOption"] == "taskcompletion"
    assert list(s)[-1] == "NodeDeallocationOption"


def test_formula_fits_batch_limits():
    formula = autoscale_formula(100, use_spot=True)
    assert len(formula.encode()) < 8 * 1024
    assert len(statements(formula)) <= 100


@pytest.mark.parametrize("bad", [0, -1, 101])
def test_max_nodes_out_of_range(bad):
    with pytest.raises(ValueError):
        autoscale_formula(bad, use_spot=False)


@pytest.mark.parametrize("bad", [True, 2.0, "4", None])
def test_max_nodes_must_be_an_int(bad):
    with pytest.raises(TypeError):
        autoscale_formula(bad, use_spot=False)


def test_missing_template_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="autoscale formula template"):
        formula_template(tmp_path / "nope.txt")
