"""The group-placement example (deploy/kubernetes/examples/ingress-nginx-group-placement.yaml), validated like
the other examples (tests/test_deploy.py): kubernetes-validate --strict and checkov, offline; and what makes it
work: the hash key is the variable the controller's map defines, a client without a group is spread (not all
hashed onto one pod), only the chat endpoint is placed, on the Service's named port, and the proxy outlasts the
ping interval of every overlay."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.test_deploy import CHECKOV_CONFIG, K8S, OVERLAYS, _overlay_config, _tool

PLACEMENT = K8S / "examples" / "ingress-nginx-group-placement.yaml"


def _docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(PLACEMENT.read_text()) if d}


def test_placement_example_passes_kubernetes_validate_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(PLACEMENT)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubernetes-validate --strict failed:\n{proc.stdout}\n{proc.stderr}"


def test_placement_example_passes_checkov() -> None:
    checkov = _tool("checkov")
    assert checkov is not None, "checkov is missing: pip install -e '.[test]'"
    proc = subprocess.run([checkov, "--config-file", str(CHECKOV_CONFIG), "-f", str(PLACEMENT), "-o", "json"],
                          capture_output=True, text=True, timeout=300, cwd=PLACEMENT.parent)
    report = json.loads(proc.stdout)
    failed = [f"{c['check_id']} {c['check_name']}" for c in report.get("results", {}).get("failed_checks", [])]
    assert failed == [] and proc.returncode == 0, failed
    assert report["summary"]["parsing_errors"] == 0


def test_the_hash_key_is_the_group_and_a_client_without_one_is_spread() -> None:
    docs = _docs()
    snippet = docs["ConfigMap"]["data"]["http-snippet"]
    ingress = docs["Ingress"]
    key = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
    mapped = re.search(r"map \$arg_group \$(\w+) \{(.*?)\}", snippet, re.DOTALL)
    assert mapped is not None and key == f"${mapped.group(1)}"
    cases = dict(re.findall(r"^\s*(\S+)\s+(\S+);$", mapped.group(2), re.MULTILINE))
    # no group: the request id (unique per request, so spread); else the group itself
    assert cases == {'""': "$request_id", "default": "$arg_group"}
    assert docs["ConfigMap"]["metadata"] == {"name": "ingress-nginx-controller", "namespace": "ingress-nginx"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_chat_endpoint_is_placed_and_the_proxy_outlasts_the_pings(overlay: str) -> None:
    ingress = _docs()["Ingress"]
    config = _overlay_config(overlay)
    chat = [e["path"] for e in config["endpoints"] if e.get("handler") == "chat"]
    [path] = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] in chat and path["pathType"] == "Exact"
    assert path["backend"]["service"] == {"name": "wirehub", "port": {"name": "http"}}
    annotations = ingress["metadata"]["annotations"]
    ping = float(config["server"]["ping_interval"])
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{key}"]) > 3 * ping
