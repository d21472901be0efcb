"""Offline checks of infra/ (Bicep for azd): parse, checkov, and the project's own security assertions.

pycep-parser and checkov live in their own venv, `.venv-infra` (`make infra-venv`), and run here in
subprocesses; without that venv the tests that need them skip. The plain-text checks always run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from pipeline.autoscale import TEMPLATE_PATH, autoscale_formula, formula_template

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
INFRA_BIN = ROOT / ".venv-infra" / "bin"
INFRA_PYTHON = INFRA_BIN / "python"
CHECKOV = INFRA_BIN / "checkov"

needs_infra_venv = pytest.mark.skipif(
    not (INFRA_PYTHON.exists() and CHECKOV.exists()),
    reason="needs .venv-infra with pycep-parser and checkov (requirements-infra.txt): run `make infra-venv`",
)

ROLE = {
    "blob_contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "blob_reader": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",
    "blob_owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "queue_contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "table_contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "batch_job_submitter": "48e5e92e-a480-4e71-aa9c-2778f4c13781",
    "metrics_publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "acr_pull": "7f951dda-4ed3-4680-a7ca-43fe172d538d",
}
STORAGE = "Microsoft.Storage/storageAccounts"
CONTAINER = "Microsoft.Storage/storageAccounts/blobServices/containers"
DATA_CONTAINERS = {"input", "styles", "output", "work", "logs"}


# ---------------------------------------------------------------- tools in .venv-infra


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@cache
def _trees() -> dict:
    proc = _run([str(INFRA_PYTHON), str(INFRA / "check_bicep.py"), str(INFRA)], timeout=120)
    assert proc.returncode == 0, f"check_bicep.py failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)["files"]


@cache
def _checkov() -> dict:
    proc = _run([str(CHECKOV), "-d", "infra", "--framework", "bicep", "--skip-download", "-o", "json"], timeout=300)
    assert proc.returncode in (0, 1), f"checkov exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    bicep = [r for r in reports if r.get("check_type") == "bicep"]
    assert len(bicep) == 1, f"expected one bicep report, got {[r.get('check_type') for r in reports]}"
    return bicep[0]


def tree(name: str) -> dict:
    entry = _trees()[name]
    assert entry["ok"], f"{name} did not parse: {entry.get('error')}"
    return entry["tree"]


def body(resource: dict) -> dict:
    """A resource's config, looking through `if (...)` conditions."""
    config = resource["config"]
    return config["config"] if "condition" in config else config


def resources(name: str, rtype: str, *, existing: bool = False) -> dict[str, dict]:
    return {
        sym: r for sym, r in tree(name)["resources"].items() if r["type"] == rtype and bool(r["existing"]) == existing
    }


def one(name: str, rtype: str) -> dict:
    found = resources(name, rtype)
    assert len(found) == 1, f"{name}: expected one {rtype}, found {sorted(found)}"
    return body(next(iter(found.values())))


def accessor_chain(expr) -> list[str]:
    """`a::b::c` or `a.b.c` (pycep operator trees) or a bare symbol → ['a', 'b', 'c']."""
    if isinstance(expr, str):
        return [expr]
    op = expr["operator"]
    assert op["type"] in ("nested_resource_accessor", "property_accessor"), op["type"]
    return [op["operands"]["operand_1"], *accessor_chain(op["operands"]["operand_2"])]


def param_default(name: str, param: str):
    return tree(name)["parameters"][param]["default"]


def resolve_text(name: str, text: str) -> str:
    """Fill `${param}` interpolations from the file's parameter defaults."""
    params = tree(name)["parameters"]

    def sub(m: re.Match) -> str:
        default = params[m.group(1)]["default"]
        assert default is not None, f"{name}: parameter {m.group(1)} has no default"
        return str(default)

    return re.sub(r"\$\{(\w+)\}", sub, text)


# ---------------------------------------------------------------- plain-text checks (no venv needed)


def _infra_text_files() -> list[Path]:
    return [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_no_account_keys_or_sas_anywhere_in_infra():
    forbidden = re.compile(r"listKeys|listAccountSas|listServiceSas|AccountKey|SharedAccessSignature|sasToken", re.I)
    offenders = []
    for path in [*_infra_text_files(), ROOT / "azure.yaml"]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if forbidden.search(line) and path.name != Path(__file__).name:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "keys/SAS in infra:\n" + "\n".join(offenders)


def test_no_gpus_flag_in_container_run_options():
    # Batch exposes the GPUs to the container itself; `--gpus` makes the task fail (ContainerInvalidSettings).
    for path in _infra_text_files():
        assert "--gpus" not in path.read_text(encoding="utf-8"), path


def test_checkov_skips_are_inline_with_a_reason():
    skip = re.compile(r"checkov:skip=([A-Z0-9_]+)(.*)")
    found = 0
    for path in INFRA.rglob("*.bicep"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = skip.search(line)
            if not m:
                continue
            found += 1
            assert line.startswith("    //"), f"{path.name}:{n}: skip must sit inside a resource body"
            reason = m.group(2).lstrip(":").strip()
            assert len(reason) >= 20, f"{path.name}:{n}: skip {m.group(1)} needs a real reason"
    assert found, "expected the documented skips"
    for name in (".checkov.yaml", ".checkov.yml"):
        assert not (ROOT / name).exists() and not (INFRA / name).exists(), "no repo-wide checkov config"


HOOKS = {"posix": ("sh", "infra/hooks/postdeploy.sh"), "windows": ("pwsh", "infra/hooks/postdeploy.ps1")}


def _azure_yaml_hooks() -> dict[str, dict[str, dict[str, str]]]:
    """azure.yaml's `hooks:` block as {hook: {platform: {key: value}}} (the app's venv has no YAML parser)."""
    lines = (ROOT / "azure.yaml").read_text(encoding="utf-8").splitlines()
    start = lines.index("hooks:")
    hooks: dict[str, dict[str, dict[str, str]]] = {}
    hook = platform = None
    for line in lines[start + 1 :]:
        if line and not line.startswith(" ") and not line.startswith("#"):
            break  # the next top-level key
        if m := re.fullmatch(r"  (\w+):", line):
            hook, platform = m.group(1), None
            hooks[hook] = {}
        elif m := re.fullmatch(r"    (\w+):", line):
            platform = m.group(1)
            hooks[hook][platform] = {}
        elif m := re.fullmatch(r"      (\w+): (.+)", line):
            assert platform, f"azure.yaml: {line!r} outside a platform block"
            hooks[hook][platform][m.group(1)] = m.group(2).strip()
    return hooks


def _logical_lines(path: Path) -> list[str]:
    """The script's lines without comments, continuations (`\\` in sh, a backtick in PowerShell) joined."""
    cont = "\\" if path.suffix == ".sh" else "`"
    out, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line.endswith(cont):
            pending += line[: -len(cont)] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def test_postdeploy_hook_is_wired_for_posix_and_windows():
    azure_yaml = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    assert re.search(r"^infra:\n(  .*\n)*  path: infra\n", azure_yaml, re.M)
    assert re.search(r"^\s+host: function$", azure_yaml, re.M)
    assert re.search(r"^\s+language: python$", azure_yaml, re.M)
    # azd refuses a hook with no entry for the OS it runs on ("run is always required"): both must be there.
    hooks = _azure_yaml_hooks()
    assert set(hooks) == {"postdeploy"}
    assert set(hooks["postdeploy"]) == set(HOOKS)
    for platform, (shell, run) in HOOKS.items():
        entry = hooks["postdeploy"][platform]
        assert entry == {"shell": shell, "run": run, "interactive": "false", "continueOnError": "false"}, entry
        assert (ROOT / run).is_file(), run
        text = (ROOT / run).read_text(encoding="utf-8")
        assert "az functionapp keys list" in text and "systemKeys.blobs_extension" in text, run
        assert "eventgrid.bicep" in text and "eventgrid-input-blob-created" in text, run
        # the worker image exists before uploads can start jobs (nodes without it are unusable, and billed)
        assert text.index("az acr build") < text.index("eventgrid-input-blob-created"), run
        for name in ("POSTDEPLOY_KEY_ATTEMPTS", "POSTDEPLOY_KEY_DELAY_SECONDS", "AZURE_SUBSCRIPTION_ID"):
            assert name in text, f"{run} does not read {name}"
    sh = ROOT / HOOKS["posix"][1]
    assert os.access(sh, os.X_OK)
    assert subprocess.run(["sh", "-n", str(sh)], check=False).returncode == 0
    # The PowerShell twin: no sh-isms, balanced brackets, ASCII only (Windows PowerShell 5.1 reads a script
    # without a byte order mark as ANSI, so anything else would be garbled).
    ps1 = (ROOT / HOOKS["windows"][1]).read_text(encoding="utf-8")
    assert ps1.isascii()
    code = "\n".join(_logical_lines(ROOT / HOOKS["windows"][1]))
    for sh_ism in ("set -e", "$(cat", "mktemp", "2>/dev/null", "fi\n", "done\n", "${AZURE"):
        assert sh_ism not in code, f"postdeploy.ps1 has {sh_ism!r}"
    for left, right in ("{}", "()", "[]"):
        assert code.count(left) == code.count(right), f"postdeploy.ps1: unbalanced {left}{right}"
    assert "$LASTEXITCODE" in code and "finally" in code


def test_every_az_call_in_the_hooks_names_the_subscription():
    # az's default subscription may differ from azd's; without --subscription the key lookup fails for
    # every try and the hook ends up blaming function indexing.
    for _, run in HOOKS.values():
        calls = []
        for line in _logical_lines(ROOT / run):
            for m in re.finditer(r"(?<![\w.-])az\s+[a-z][a-z-]*\s", line):
                rest = line[m.start() :]
                nxt = re.search(r"(?<![\w.-])az\s+[a-z][a-z-]*\s", rest[2:])
                call = rest if nxt is None else rest[: nxt.start() + 2]
                calls.append(call)
                assert re.search(r"--subscription[ =]\S", call), f"{run}: az call without --subscription: {call}"
        assert len(calls) >= 3, f"{run}: expected the key lookup, the deployment and the hint, found {calls}"


def _fake_az(tmp_path: Path, *, key_after: int, fail_with: str = "", image: bool = True) -> tuple[Path, Path]:
    """An `az` on PATH that logs its arguments and hands out the key from the `key_after`-th lookup on; the
    registry has the worker image if ``image``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "az.log"
    az = bin_dir / "az"
    az.write_text(
        f"""#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
case "$*" in
  *"keys list"*)
    n=$(grep -c "keys list" "{log}")
    if [ -n "{fail_with}" ]; then echo "{fail_with}" >&2; exit 1; fi
    if [ "$n" -ge {key_after} ]; then echo "k3y-Value_=="; else echo ""; fi ;;
  *"deployment group create"*)
    for a in "$@"; do case "$a" in @*) cp "${{a#@}}" "{tmp_path}/params.json";; esac; done ;;
  *"acr repository show"*)
    if [ "{int(image)}" = 0 ]; then echo "ERROR: manifest unknown" >&2; exit 1; fi ;;
esac
""",
        encoding="utf-8",
    )
    az.chmod(0o755)
    return bin_dir, log


def _run_posix_hook(tmp_path: Path, bin_dir: Path, attempts: int = 5) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "AZURE_SUBSCRIPTION_ID": "00000000-1111-2222-3333-444444444444",
        "AZURE_RESOURCE_GROUP": "rg-test",
        "AZURE_FUNCTION_APP_NAME": "func-test",
        "AZURE_FUNCTION_APP_HOSTNAME": "func-test.azurewebsites.net",
        "EVENTGRID_SYSTEM_TOPIC_NAME": "evgt-test",
        "AZURE_CONTAINER_REGISTRY_NAME": "crtest",
        "BATCH_WORKER_IMAGE": "crtest.azurecr.io/stylize-worker:latest",
        "POSTDEPLOY_KEY_ATTEMPTS": str(attempts),
        "POSTDEPLOY_KEY_DELAY_SECONDS": "0",
    }
    return subprocess.run(
        ["sh", str(ROOT / HOOKS["posix"][1])], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_posix_hook_waits_for_the_key_then_deploys_with_azds_subscription(tmp_path):
    bin_dir, log = _fake_az(tmp_path, key_after=3)
    proc = _run_posix_hook(tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    assert [c.split(" --")[0] for c in calls] == ["functionapp keys list"] * 3 + [
        "acr repository show", "deployment group create"]  # the registry has the image: nothing to build
    assert all("--subscription 00000000-1111-2222-3333-444444444444" in c for c in calls), calls
    assert "k3y" not in "".join(calls), "the key must not be on a command line"
    params = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))["parameters"]
    assert params == {
        "systemTopicName": {"value": "evgt-test"},
        "functionAppHostName": {"value": "func-test.azurewebsites.net"},
        "blobsExtensionKey": {"value": "k3y-Value_=="},
    }


def test_posix_hook_builds_the_worker_image_before_uploads_can_start_jobs(tmp_path):
    bin_dir, log = _fake_az(tmp_path, key_after=1, image=False)
    proc = _run_posix_hook(tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    assert [c.split(" --")[0] for c in calls] == ["functionapp keys list", "acr repository show", "acr build",
                                                  "deployment group create"]
    build = calls[2].split()
    assert build[build.index("--registry") + 1] == "crtest" and build[build.index("--image") + 1] == \
        "stylize-worker:latest"
    assert build[-1] == str(ROOT / "infra" / ".." / "gpu_worker")


def test_posix_hook_shows_the_az_error_instead_of_blaming_indexing(tmp_path):
    bin_dir, _ = _fake_az(tmp_path, key_after=1, fail_with="ERROR: (ResourceNotFound) The Resource was not found")
    proc = _run_posix_hook(tmp_path, bin_dir, attempts=2)
    assert proc.returncode == 1
    assert "ResourceNotFound" in proc.stderr and "indexed" not in proc.stderr, proc.stderr
    assert "--subscription 00000000-1111-2222-3333-444444444444" in proc.stderr


def test_posix_hook_refuses_to_run_without_azds_subscription(tmp_path):
    bin_dir, log = _fake_az(tmp_path, key_after=1)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["sh", str(ROOT / HOOKS["posix"][1])], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0 and "AZURE_SUBSCRIPTION_ID" in proc.stderr
    assert not log.exists()


def test_durable_queue_polling_interval_is_at_most_10_seconds():
    # Microsoft's guidance for Durable Functions on Flex Consumption (with the always-ready instance below).
    durable = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))["extensions"]["durableTask"]
    value = durable["storageProvider"]["maxQueuePollingInterval"]
    m = re.fullmatch(r"(\d\d):(\d\d):(\d\d)", value)
    assert m, f"maxQueuePollingInterval {value!r} is not hh:mm:ss"
    hours, minutes, seconds = map(int, m.groups())
    assert 0 < hours * 3600 + minutes * 60 + seconds <= 10


FUNCIGNORE_MUST_LIST = {
    ".git*",
    ".venv*",
    ".ci",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "node_modules",
    "package*.json",
    ".azure",
    "__azurite_db*",
    "__blobstorage__",
    "__queuestorage__",
    "AzuriteConfig",
    "local.settings*.json",
    "tests",
    "benchmarks",
    "docs",
    "local",
    "out",
    "Makefile",
    "requirements-dev.txt",
    "requirements-infra.txt",
    "gpu_worker/Dockerfile",
    "infra/*",
    "!infra/autoscale-formula.txt",
}


def test_funcignore_keeps_local_state_out_of_the_package_and_gitignore_keeps_azd_envs_out_of_git():
    entries = [
        line.strip()
        for line in (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    missing = FUNCIGNORE_MUST_LIST - set(entries)
    assert not missing, missing
    # what the app imports at run time is not ignored
    for needed in (
        "function_app.py",
        "host.json",
        "requirements.txt",
        "pipeline",
        "orchestrators",
        "activities",
        "gpu_worker",
        "*.py",
    ):
        assert needed not in entries, needed
    # the un-ignore comes after the folder rule, or it has no effect
    assert entries.index("!infra/autoscale-formula.txt") > entries.index("infra/*")
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".azure/" in gitignore or ".azure" in gitignore


def test_main_parameters_match_main_bicep():
    params = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    declared = set(re.findall(r"^param (\w+) ", (INFRA / "main.bicep").read_text(encoding="utf-8"), re.M))
    assert set(params) <= declared
    assert {"environmentName", "location", "principalId"} <= set(params)


# ---------------------------------------------------------------- parse + checkov


@needs_infra_venv
def test_every_bicep_file_parses_with_pycep():
    files = _trees()
    on_disk = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.bicep")}
    assert set(files) == on_disk
    broken = {name: f["error"] for name, f in files.items() if not f["ok"]}
    assert not broken, broken
    assert {"main.bicep", "eventgrid.bicep", "roles.bicep", "batch.bicep", "functions.bicep"} <= on_disk


@needs_infra_venv
def test_checkov_reports_no_failures_and_no_parsing_errors():
    report = _checkov()
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert summary["parsing_errors"] == 0, report["results"].get("parsing_errors")
    assert summary["failed"] == 0, "\n".join(failed)
    assert summary["passed"] > 0 and summary["resource_count"] > 0


@needs_infra_venv
def test_every_inline_skip_is_used_by_checkov():
    report = _checkov()
    used = {(Path(c["file_path"]).name, c["check_id"]) for c in report["results"]["skipped_checks"]}
    written = set()
    for path in INFRA.rglob("*.bicep"):
        for check_id in re.findall(r"checkov:skip=([A-Z0-9_]+)", path.read_text(encoding="utf-8")):
            written.add((path.name, check_id))
    assert written == used, f"stale skips: {written - used}; unexplained: {used - written}"
    assert report["summary"]["skipped"] == sum(
        len(re.findall(r"checkov:skip=", p.read_text(encoding="utf-8"))) for p in INFRA.rglob("*.bicep")
    )


# ---------------------------------------------------------------- project assertions


@needs_infra_venv
def test_storage_accounts_are_keyless_and_private():
    accounts = {}
    for name in _trees():
        for sym, res in resources(name, STORAGE).items():
            accounts[f"{name}:{sym}"] = body(res)["properties"]
    assert len(accounts) == 2, sorted(accounts)
    for key, props in accounts.items():
        assert props["allowSharedKeyAccess"] is False, key
        assert props["allowBlobPublicAccess"] is False, key
        assert props["supportsHttpsTrafficOnly"] is True, key
        assert props["minimumTlsVersion"] == "TLS1_2", key
        assert props["defaultToOAuthAuthentication"] is True, key


@needs_infra_venv
def test_data_account_containers_soft_delete_and_work_lifecycle():
    containers = resources("storage.bicep", CONTAINER)
    by_parent = {}
    for res in containers.values():
        config = body(res)
        by_parent.setdefault(config["parent"], set()).add(resolve_text("storage.bicep", "${" + config["name"] + "}"))
        assert config["properties"]["publicAccess"] == "None"
    assert by_parent["dataBlobService"] == DATA_CONTAINERS
    assert by_parent["runtimeBlobService"] == {"deploymentpackage"}

    blob_service = body(resources("storage.bicep", "Microsoft.Storage/storageAccounts/blobServices")["dataBlobService"])
    assert blob_service["parent"] == "dataAccount"
    assert blob_service["properties"]["deleteRetentionPolicy"]["enabled"] is True
    assert blob_service["properties"]["deleteRetentionPolicy"]["days"] >= 1

    policy = one("storage.bicep", "Microsoft.Storage/storageAccounts/managementPolicies")
    assert policy["parent"] == "dataAccount"
    rules = policy["properties"]["policy"]["rules"]
    work_rules = [
        r
        for r in rules
        if [resolve_text("storage.bicep", p) for p in r["definition"]["filters"]["prefixMatch"]] == ["work/"]
    ]
    assert len(work_rules) == 1 and work_rules[0]["enabled"] is True
    assert work_rules[0]["definition"]["actions"]["baseBlob"]["delete"] == {"daysAfterModificationGreaterThan": 1}
    log_rules = [
        r
        for r in rules
        if [resolve_text("storage.bicep", p) for p in r["definition"]["filters"]["prefixMatch"]] == ["logs/"]
    ]
    assert len(log_rules) == 1  # task logs are kept for diagnosis, but not forever
    assert log_rules[0]["definition"]["actions"]["baseBlob"]["delete"] == {"daysAfterModificationGreaterThan": 30}

    # main.bicep passes the same literal names the app settings and roles.bicep use.
    storage_params = tree("main.bicep")["modules"]["storage"]["config"]["params"]
    for c in DATA_CONTAINERS:
        assert storage_params[f"{c}ContainerName"] == c


def _role_assignments() -> dict[str, set[tuple[str, str]]]:
    roles_tree = tree("roles.bicep")
    role_ids = roles_tree["variables"]["roleIds"]["value"]
    declared = roles_tree["resources"]
    grants: dict[str, set[tuple[str, str]]] = {}
    for name in _trees():
        if name != "roles.bicep":
            assert not resources(name, "Microsoft.Authorization/roleAssignments"), f"role assignment in {name}"
    for sym, res in resources("roles.bicep", "Microsoft.Authorization/roleAssignments").items():
        config = body(res)
        props = config["properties"]
        fn = props["roleDefinitionId"]["function"]
        assert fn["type"] == "subscription_resource_id", sym
        assert fn["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions", sym
        chain = accessor_chain(fn["parameters"]["resource_name_1"])
        assert chain[0] == "roleIds" and len(chain) == 2, sym
        role_id = role_ids[chain[1]]
        scope = declared["__".join(accessor_chain(config["scope"]))]
        assert scope["existing"], f"{sym}: scope must be an existing resource"
        scope_key = f"{scope['type']}:{body(scope)['name']}"
        principal = props["principalId"]
        # the assignment's name is derived from its scope, principal and role (stable, unique)
        name_fn = config["name"]["function"]
        assert name_fn["type"] == "guid", sym
        grants.setdefault(principal, set()).add((role_id, scope_key))
        if principal in ("appPrincipalId", "poolPrincipalId", "eventGridPrincipalId"):
            assert props["principalType"] == "ServicePrincipal", sym
    return grants


@needs_infra_venv
def test_each_identity_has_exactly_its_roles():
    data = f"{STORAGE}:dataAccountName"
    runtime = f"{STORAGE}:runtimeAccountName"
    expected = {
        "appPrincipalId": {
            (ROLE["blob_contributor"], data),
            (ROLE["queue_contributor"], data),  # the blob trigger's poison queue is on the trigger's account
            (ROLE["blob_owner"], runtime),
            (ROLE["queue_contributor"], runtime),
            (ROLE["table_contributor"], runtime),
            (ROLE["batch_job_submitter"], "Microsoft.Batch/batchAccounts:batchAccountName"),
            (ROLE["metrics_publisher"], "Microsoft.Insights/components:appInsightsName"),
        },
        "poolPrincipalId": {
            (ROLE["blob_reader"], f"{CONTAINER}:input"),
            (ROLE["blob_reader"], f"{CONTAINER}:styles"),
            (ROLE["blob_contributor"], f"{CONTAINER}:work"),
            (ROLE["blob_contributor"], f"{CONTAINER}:logs"),  # no output: the app publishes results
            (ROLE["acr_pull"], "Microsoft.ContainerRegistry/registries:registryName"),
        },
        # the Event Grid system topic writes the upload events it could not deliver there (dead letters)
        "eventGridPrincipalId": {(ROLE["blob_contributor"], f"{CONTAINER}:logs")},
        # optional: the person running azd, to upload videos/styles, read results, and list/delete Batch
        # jobs by hand (jobs are data-plane objects: Owner or Contributor on the account do not reach them)
        "userPrincipalId": {
            (ROLE["blob_contributor"], f"{CONTAINER}:input"),
            (ROLE["blob_contributor"], f"{CONTAINER}:styles"),
            (ROLE["blob_reader"], f"{CONTAINER}:output"),
            (ROLE["blob_reader"], f"{CONTAINER}:logs"),  # the task logs docs/batch.md sends them to
            (ROLE["batch_job_submitter"], "Microsoft.Batch/batchAccounts:batchAccountName"),
        },
    }
    assert _role_assignments() == expected

    # the container scopes hang off the data account
    declared = tree("roles.bicep")["resources"]
    for c in DATA_CONTAINERS:
        assert declared[f"{c}Container"]["config"] == {"parent": "dataBlobService", "name": c}
    assert declared["dataBlobService"]["config"] == {"parent": "dataAccount", "name": "default"}
    assert declared["dataAccount"]["config"]["name"] == "dataAccountName"

    # main.bicep wires each principal param to the right identity
    params = tree("main.bicep")["modules"]["roles"]["config"]["params"]
    assert accessor_chain(params["appPrincipalId"]) == ["identity", "outputs", "appIdentityPrincipalId"]
    assert accessor_chain(params["poolPrincipalId"]) == ["identity", "outputs", "poolIdentityPrincipalId"]
    assert accessor_chain(params["eventGridPrincipalId"]) == ["eventgridTopic", "outputs", "systemTopicPrincipalId"]
    assert params["userPrincipalId"] == "principalId"
    # every grant to the deploying user is optional: nothing is assigned when azd does not know who runs it
    for sym, res in resources("roles.bicep", "Microsoft.Authorization/roleAssignments").items():
        if body(res)["properties"]["principalId"] == "userPrincipalId":
            assert "condition" in res["config"], f"{sym}: the user's grant must be conditional"
    assert accessor_chain(params["dataAccountName"]) == ["storage", "outputs", "dataAccountName"]
    assert accessor_chain(params["runtimeAccountName"]) == ["storage", "outputs", "runtimeAccountName"]


@needs_infra_venv
def test_event_grid_subscription_sends_input_blob_created_to_the_blob_trigger():
    sub = one("eventgrid.bicep", "Microsoft.EventGrid/systemTopics/eventSubscriptions")
    assert sub["parent"] == "systemTopic"
    props = sub["properties"]
    assert props["filter"]["includedEventTypes"] == ["Microsoft.Storage.BlobCreated"]
    assert props["filter"]["subjectBeginsWith"] == "/blobServices/default/containers/input/"
    dest = props["destination"]
    assert dest["endpointType"] == "WebHook"
    url = dest["properties"]["endpointUrl"]
    webhook = "https://${functionAppHostName}/runtime/webhooks/blobs?functionName=Host.Functions.${functionName}&code="
    assert url.startswith(webhook)
    assert url[len(webhook) :] == "${uriComponent(blobsExtensionKey)}"
    assert param_default("eventgrid.bicep", "functionName") == "on_video_uploaded"
    # an event not delivered within its day is kept, in the logs container, written by the topic's own identity
    dead = props["deadLetterWithResourceIdentity"]
    assert dead["identity"] == {"type": "SystemAssigned"}
    destination = dead["deadLetterDestination"]
    assert destination["endpointType"] == "StorageBlob"
    assert accessor_chain(destination["properties"]["resourceId"]) == ["systemTopic", "properties", "source"]
    assert param_default("eventgrid.bicep", destination["properties"]["blobContainerName"]) == "logs"
    decorators = {d["type"] for d in tree("eventgrid.bicep")["parameters"]["blobsExtensionKey"]["decorators"]}
    assert "secure" in decorators

    topic = one("eventgrid-topic.bicep", "Microsoft.EventGrid/systemTopics")
    assert topic["identity"] == {"type": "SystemAssigned"}
    assert topic["properties"]["topicType"] == "Microsoft.Storage.StorageAccounts"
    assert accessor_chain(topic["properties"]["source"]) == ["dataAccount", "id"]
    params = tree("main.bicep")["modules"]["eventgridTopic"]["config"]["params"]
    assert accessor_chain(params["dataAccountName"]) == ["storage", "outputs", "dataAccountName"]
    # the subscription is not in the provisioning template (the hook deploys it after the code)
    for name in _trees():
        if name != "eventgrid.bicep":
            assert not resources(name, "Microsoft.EventGrid/systemTopics/eventSubscriptions"), name


@needs_infra_venv
def test_batch_account_allows_entra_id_only():
    account = one("batch.bicep", "Microsoft.Batch/batchAccounts")["properties"]
    assert account["allowedAuthenticationModes"] == ["AAD"]
    assert account["poolAllocationMode"] == "BatchService"


@needs_infra_venv
def test_batch_gpu_pool():
    pool = one("batch.bicep", "Microsoft.Batch/batchAccounts/pools")
    assert pool["parent"] == "batchAccount"
    assert pool["identity"]["type"] == "UserAssigned"
    assert list(pool["identity"]["userAssignedIdentities"]) == ["'${poolIdentityId}'"]
    props = pool["properties"]
    assert props["taskSlotsPerNode"] == 1
    vm = props["deploymentConfiguration"]["virtualMachineConfiguration"]
    image = vm["imageReference"]
    assert (image["publisher"], image["offer"], image["sku"]) == ("microsoft-dsvm", "ubuntu-hpc", "2404")
    # pinned, and a release whose NVIDIA driver (580.173.02) runs the worker image's CUDA 13.0 build of torch
    assert param_default("batch.bicep", image["version"]) == "24.04.2026072901"
    assert vm["nodeAgentSkuId"] == "batch.node.ubuntu 24.04"
    # Docker's data root is on the OS disk on this image: room for the worker image's several GB
    assert vm["osDisk"] == {"diskSizeGB": "osDiskSizeGB"} and param_default("batch.bicep", "osDiskSizeGB") >= 128
    containers = vm["containerConfiguration"]
    assert containers["type"] == "DockerCompatible"
    assert containers["containerImageNames"] == ["workerImage"]
    assert containers["containerRegistries"] == [
        {"registryServer": "registryLoginServer", "identityReference": {"resourceId": "poolIdentityId"}}
    ]
    autoscale = props["scaleSettings"]["autoScale"]
    assert autoscale == {"formula": "autoscaleFormula", "evaluationInterval": "PT5M"}
    assert param_default("batch.bicep", "vmSize").startswith("Standard_N")

    # main.bicep: the pool uses the pool identity, the registry, and the worker image default
    params = tree("main.bicep")["modules"]["batch"]["config"]["params"]
    assert accessor_chain(params["poolIdentityId"]) == ["identity", "outputs", "poolIdentityId"]
    assert accessor_chain(params["registryLoginServer"]) == ["registry", "outputs", "loginServer"]
    image_var = tree("main.bicep")["variables"]["batchWorkerImage"]["value"]["operator"]["operands"]
    assert image_var["true_value"] == "${registry.outputs.loginServer}/stylize-worker:latest"


@needs_infra_venv
def test_autoscale_formula_bicep_and_python_agree():
    batch = tree("batch.bicep")
    fn = batch["variables"]["autoscaleFormula"]["value"]["function"]
    assert fn["type"] == "format"
    load = fn["parameters"]["format_string"]["function"]
    assert load["type"] == "load_text_content"
    assert (INFRA / load["parameters"]["file_path"]).resolve() == TEMPLATE_PATH.resolve()
    assert fn["parameters"]["arg_1"] == "maxNodes"
    assert fn["parameters"]["arg_2"] == 0  # dedicated nodes only: see test_no_low_priority_nodes_...
    assert set(fn["parameters"]) == {"format_string", "arg_1", "arg_2"}

    # Bicep's format() is .NET String.Format: only {0} and {1} may be braces in the template,
    # then .NET and Python fill it identically.
    template = (INFRA / load["parameters"]["file_path"]).read_text(encoding="utf-8")
    assert template == formula_template()
    assert sorted(re.findall(r"[{}]", template.replace("{0}", "").replace("{1}", ""))) == []

    def dotnet_format(text: str, *args) -> str:
        return re.sub(r"\{(\d+)\}", lambda m: str(args[int(m.group(1))]), text)

    decorators = {d["type"]: d.get("argument") for d in batch["parameters"]["maxNodes"]["decorators"]}
    low, high = decorators["min_value"], decorators["max_value"]
    for max_nodes in (low, param_default("batch.bicep", "maxNodes"), high):
        for use_spot in (False, True):
            assert autoscale_formula(max_nodes, use_spot) == dotnet_format(template, max_nodes, 1 if use_spot else 0)
    with pytest.raises(ValueError):
        autoscale_formula(high + 1, False)
    with pytest.raises(ValueError):
        autoscale_formula(low - 1, False)

    assert "$PendingTasks" in template and "$ActiveTasks" not in template
    assert "$NodeDeallocationOption = taskcompletion;" in template
    assert "$TargetLowPriorityNodes" in template


@needs_infra_venv
def test_registry_and_app_insights_are_keyless():
    registry = one("registry.bicep", "Microsoft.ContainerRegistry/registries")["properties"]
    assert registry["adminUserEnabled"] is False
    assert registry["anonymousPullEnabled"] is False

    insights = one("monitoring.bicep", "Microsoft.Insights/components")["properties"]
    assert insights["DisableLocalAuth"] is True
    assert accessor_chain(insights["WorkspaceResourceId"]) == ["logAnalytics", "id"]


REQUIRED_SETTINGS = {
    "AzureWebJobsStorage__blobServiceUri": "runtimeBlobEndpoint",
    "AzureWebJobsStorage__queueServiceUri": "runtimeQueueEndpoint",
    "AzureWebJobsStorage__tableServiceUri": "runtimeTableEndpoint",
    "AzureWebJobsStorage__credential": "managedidentity",
    "AzureWebJobsStorage__clientId": "appIdentityClientId",
    "DataStorage__blobServiceUri": "dataBlobEndpoint",
    "DataStorage__queueServiceUri": "dataQueueEndpoint",
    "DataStorage__credential": "managedidentity",
    "DataStorage__clientId": "appIdentityClientId",
    "STYLIZE_STORAGE": "blob",
    "DATA_STORAGE_ACCOUNT_URL": "dataBlobEndpoint",
    "INPUT_CONTAINER": "inputContainerName",
    "STYLES_CONTAINER": "stylesContainerName",
    "OUTPUT_CONTAINER": "outputContainerName",
    "WORK_CONTAINER": "workContainerName",
    "LOGS_CONTAINER": "logsContainerName",
    "STYLIZE_COMPUTE": "batch",
    "BATCH_ACCOUNT_URL": "batchAccountUrl",
    "BATCH_POOL_ID": "batchPoolId",
    "BATCH_WORKER_IMAGE": "batchWorkerImage",
    "BATCH_POOL_IDENTITY_RESOURCE_ID": "poolIdentityId",
    "BATCH_POOL_IDENTITY_CLIENT_ID": "poolIdentityClientId",
    "AZURE_CLIENT_ID": "appIdentityClientId",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "appInsightsConnectionString",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "ClientId=${appIdentityClientId};Authorization=AAD",
}


@needs_infra_venv
def test_function_app_flex_consumption_identity_based_settings():
    plan = one("functions.bicep", "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True

    site = one("functions.bicep", "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    assert list(site["identity"]["userAssignedIdentities"]) == ["'${appIdentityId}'"]
    props = site["properties"]
    assert props["httpsOnly"] is True
    config = props["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": FUNCTION_APP_PYTHON}
    assert config["deployment"]["storage"]["authentication"] == {
        "type": "UserAssignedIdentity",
        "userAssignedIdentityResourceId": "appIdentityId",
    }

    settings = {s["name"]: s["value"] for s in props["siteConfig"]["appSettings"]}
    assert len(settings) == len(props["siteConfig"]["appSettings"]), "duplicate app setting"
    assert settings == REQUIRED_SETTINGS
    for banned in ("AzureWebJobsStorage", "FUNCTIONS_WORKER_RUNTIME", "WEBSITE_RUN_FROM_PACKAGE"):
        assert banned not in settings

    # main.bicep feeds the Batch URL with its scheme and the real endpoints
    batch_url = tree("batch.bicep")["outputs"]["accountUrl"]["value"]
    assert batch_url == "https://${batchAccount.properties.accountEndpoint}"
    params = tree("main.bicep")["modules"]["functions"]["config"]["params"]
    assert accessor_chain(params["batchAccountUrl"]) == ["batch", "outputs", "accountUrl"]
    assert accessor_chain(params["appIdentityClientId"]) == ["identity", "outputs", "appIdentityClientId"]
    assert accessor_chain(params["dataBlobEndpoint"]) == ["storage", "outputs", "dataBlobEndpoint"]
    assert accessor_chain(params["runtimeBlobEndpoint"]) == ["storage", "outputs", "runtimeBlobEndpoint"]
    assert params["batchWorkerImage"] == "batchWorkerImage"
    assert params["serviceName"] == "stylize"


@needs_infra_venv
def test_main_outputs_what_the_app_and_azd_need():
    outputs = tree("main.bicep")["outputs"]
    needed = {
        "AZURE_RESOURCE_GROUP",
        "AZURE_FUNCTION_APP_NAME",
        "AZURE_FUNCTION_APP_HOSTNAME",
        "AZURE_FUNCTION_APP_URL",
        "DATA_STORAGE_ACCOUNT_NAME",
        "DATA_STORAGE_ACCOUNT_URL",
        "INPUT_CONTAINER",
        "STYLES_CONTAINER",
        "OUTPUT_CONTAINER",
        "WORK_CONTAINER",
        "LOGS_CONTAINER",
        "BATCH_ACCOUNT_URL",
        "BATCH_POOL_ID",
        "BATCH_WORKER_IMAGE",
        "BATCH_POOL_IDENTITY_RESOURCE_ID",
        "BATCH_POOL_IDENTITY_CLIENT_ID",
        "AZURE_CONTAINER_REGISTRY_NAME",
        "AZURE_CONTAINER_REGISTRY_ENDPOINT",
        "EVENTGRID_SYSTEM_TOPIC_NAME",
    }
    assert needed <= set(outputs)
    assert accessor_chain(outputs["BATCH_ACCOUNT_URL"]["value"]) == ["batch", "outputs", "accountUrl"]
    # the names the postdeploy hooks read are outputs (azd exports outputs to hooks), the subscription included:
    # main.bicep outputs the one it deployed to, so the hooks' az calls go where the resources are
    sub = outputs["AZURE_SUBSCRIPTION_ID"]["value"]["function"]
    assert (sub["type"], sub["parameters"], sub["property_name"]) == (
        "subscription",
        {"subscription_id": None},
        "subscriptionId",
    )
    tunables = {"POSTDEPLOY_KEY_ATTEMPTS", "POSTDEPLOY_KEY_DELAY_SECONDS", "POSTDEPLOY_BUILD_IMAGE"}
    sh = (INFRA / "hooks" / "postdeploy.sh").read_text(encoding="utf-8")
    ps1 = (INFRA / "hooks" / "postdeploy.ps1").read_text(encoding="utf-8")
    read_sh = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", sh)) - tunables
    read_ps1 = set(re.findall(r"Get-AzdValue '([A-Z][A-Z0-9_]+)'", ps1))
    read_ps1 |= set(re.findall(r"\$env:([A-Z][A-Z0-9_]+)", ps1))
    read_ps1 -= tunables
    assert read_sh and read_sh == read_ps1, (read_sh, read_ps1)
    assert "AZURE_SUBSCRIPTION_ID" in read_sh
    assert read_sh <= set(outputs), read_sh - set(outputs)


FUNCTION_APP_PYTHON = "3.12"  # Flex Consumption GA and every pin in requirements.txt (azure-functions 1.26.0: < 3.13)


def _deploy_section_of_readme() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Deploy to Azure")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


@needs_infra_venv
def test_function_app_python_is_the_documented_one():
    runtime = one("functions.bicep", "Microsoft.Web/sites")["properties"]["functionAppConfig"]["runtime"]
    assert runtime == {"name": "python", "version": FUNCTION_APP_PYTHON}
    deploy_md = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    stated = set(re.findall(r"Flex Consumption \(FC1\), Python (3\.\d+)", deploy_md))
    assert stated == {FUNCTION_APP_PYTHON}, f"docs/deploy.md states the app's Python as {stated}"
    readme_versions = set(re.findall(r"Python (3\.\d+)", _deploy_section_of_readme()))
    assert readme_versions == {FUNCTION_APP_PYTHON}, f"README's Deploy to Azure section says Python {readme_versions}"
    # the pin that caps it: move both together
    pin = re.search(r"^azure-functions==([\d.]+)$", (ROOT / "requirements.txt").read_text(encoding="utf-8"), re.M)
    assert pin, "requirements.txt pins azure-functions"


@needs_infra_venv
def test_durable_group_has_an_always_ready_instance():
    scale = one("functions.bicep", "Microsoft.Web/sites")["properties"]["functionAppConfig"]["scaleAndConcurrency"]
    ready = {entry["name"]: entry["instanceCount"] for entry in scale["alwaysReady"]}
    assert set(ready) == {"durable"}, ready  # http and blob groups scale from zero
    count = ready["durable"]
    if isinstance(count, str):  # a parameter: its default, and what main.bicep and azd pass
        assert param_default("functions.bicep", count) >= 1
        params = tree("main.bicep")["modules"]["functions"]["config"]["params"]
        main_param = params["durableAlwaysReadyInstanceCount"]
        assert param_default("main.bicep", main_param) >= 1
        azd = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
        m = re.fullmatch(r"\$\{DURABLE_ALWAYS_READY_INSTANCES=(\d+)\}", azd[main_param]["value"])
        assert m and int(m.group(1)) >= 1, azd[main_param]
    else:
        assert count >= 1


@needs_infra_venv
def test_no_low_priority_nodes_in_a_batch_service_account():
    # Low-priority nodes of Batch-service-mode accounts were retired on 30 Sep 2025 and Spot needs a
    # user-subscription account: a Batch-service account must never ask for low-priority nodes.
    account = one("batch.bicep", "Microsoft.Batch/batchAccounts")["properties"]
    assert account["poolAllocationMode"] == "BatchService"
    pool = one("batch.bicep", "Microsoft.Batch/batchAccounts/pools")["properties"]
    assert "fixedScale" not in pool["scaleSettings"]
    fn = tree("batch.bicep")["variables"]["autoscaleFormula"]["value"]["function"]
    assert fn["parameters"]["arg_2"] == 0  # the template's {1}: $TargetLowPriorityNodes is always 0
    for name in ("batch.bicep", "main.bicep"):
        text = (INFRA / name).read_text(encoding="utf-8")
        assert not re.search(r"targetLowPriorityNodes|useSpot|UseSpot", text), name
    assert "BATCH_USE_SPOT" not in (INFRA / "main.parameters.json").read_text(encoding="utf-8")
    for doc in ("docs/deploy.md", "docs/batch.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert "BATCH_USE_SPOT" not in text, f"{doc} still offers BATCH_USE_SPOT"


@needs_infra_venv
def test_pool_image_version_is_the_documented_one():
    version = param_default("batch.bicep", "imageVersion")
    assert param_default("main.bicep", "batchImageVersion") == version
    azd = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert azd["batchImageVersion"]["value"] == "${BATCH_IMAGE_VERSION=" + version + "}"
    for doc in ("docs/deploy.md", "docs/batch.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert version in text, f"{doc} does not state the pool image version {version}"
        assert not re.search(r"ubuntu-hpc[:/]2204|22\.04\.\d{10}", text), f"{doc} still names the 22.04 image"
    # the pairing docs/batch.md states: this node image's driver for the worker image's CUDA build of torch
    batch_md = (ROOT / "docs" / "batch.md").read_text(encoding="utf-8")
    torch_pin = re.search(
        r"^torch==([\d.]+)", (ROOT / "gpu_worker" / "requirements.txt").read_text(encoding="utf-8"), re.M
    )
    if torch_pin:
        assert f"torch {torch_pin.group(1)}" in batch_md, "docs/batch.md names another torch than the worker image's"
    assert "CUDA 13.0" in batch_md and "580" in batch_md


def test_alert_email_is_set_through_the_azd_environment_as_documented():
    """The failed-jobs alert's address comes from ALERT_EMAIL in the azd environment, with nothing to map by
    hand, and the telemetry docs say so."""
    params = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert params["alertEmail"]["value"] == "${ALERT_EMAIL}"
    docs = (ROOT / "docs" / "telemetry.md").read_text(encoding="utf-8")
    assert "azd env set ALERT_EMAIL" in docs and "map it" not in docs
