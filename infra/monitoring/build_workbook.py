"""Build the Azure Monitor workbook (stylize.workbook.json) from the .kql files next to this script.

The .kql files are the source: each runs as-is in Application Insights → Logs. For the workbook, the
job-id `let` and the 7-day time filter become the workbook's JobId and TimeRange parameters. After
editing a query, run

    .venv/bin/python infra/monitoring/build_workbook.py

and commit both; tests/test_telemetry.py fails while the JSON is stale. workbook.bicep deploys the JSON
with loadTextContent().
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "stylize.workbook.json"
COMPONENTS = "microsoft.insights/components"
_NAMESPACE = uuid.UUID("6f1c3a52-2b1e-4f0e-9d55-0a7d3c1e9b41")  # fixed: ids stay stable across builds

# (file, title, visualization, chart settings)
SECTIONS = [
    ("job-timeline.kql", "Job timeline (stages, activities and segments of one job)", "table", None),
    ("slowest-segments.kql", "Slowest segments", "table", None),
    ("fps-by-node-gpu.kql", "Throughput by node and GPU", "table", None),
    ("fps-by-node-gpu.kql", "Frames per second by node and GPU", "barchart",
     {"xAxis": "node", "yAxes": ["fps"], "group": "gpu", "createOtherGroup": 0}),
    ("failures-by-reason.kql", "Failures by reason", "table", None),
]

# The .kql text → the workbook's parameters.
SUBSTITUTIONS = {
    'let jobId = "";': 'let jobId = "{JobId}";',
    "timestamp > ago(7d)": "timestamp {TimeRange}",
}

INTRO = (
    "## Video stylize: where the time went\n"
    "Records from `pipeline/telemetry/` (custom events). Leave **Job id** empty for the most recent job. "
    "Queries: `infra/monitoring/*.kql`; how to read them: `docs/telemetry.md`."
)


def _id(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, name))


def workbook_query(kql: str) -> str:
    for source, target in SUBSTITUTIONS.items():
        kql = kql.replace(source, target)
    return kql.strip() + "\n"


def build(directory: Path = HERE) -> dict:
    parameters = {
        "type": 9,
        "name": "parameters",
        "content": {
            "version": "KqlParameterItem/1.0",
            "style": "pills",
            "queryType": 0,
            "resourceType": COMPONENTS,
            "parameters": [
                {
                    "id": _id("TimeRange"), "version": "KqlParameterItem/1.0", "name": "TimeRange",
                    "label": "Time range", "type": 4, "isRequired": True, "value": {"durationMs": 86400000},
                    "typeSettings": {
                        "allowCustom": True,
                        "selectableValues": [{"durationMs": ms} for ms in
                                             (3600000, 14400000, 43200000, 86400000, 259200000, 604800000)],
                    },
                },
                {
                    "id": _id("JobId"), "version": "KqlParameterItem/1.0", "name": "JobId", "label": "Job id",
                    "type": 1, "value": "", "description": "an orchestration instance id; empty = the latest job",
                },
            ],
        },
    }
    items: list[dict] = [{"type": 1, "name": "intro", "content": {"json": INTRO}}, parameters]
    for file, title, visualization, chart in SECTIONS:
        content = {
            "version": "KqlItem/1.0",
            "title": title,
            "query": workbook_query((directory / file).read_text(encoding="utf-8")),
            "size": 0,
            "queryType": 0,
            "resourceType": COMPONENTS,
            "timeContextFromParameter": "TimeRange",
            "visualization": visualization,
        }
        if chart:
            content["chartSettings"] = chart
        items.append({"type": 3, "name": f"{Path(file).stem}-{visualization}", "content": content})
    return {"version": "Notebook/1.0", "items": items, "isLocked": False}


def render(directory: Path = HERE) -> str:
    return json.dumps(build(directory), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.name} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
