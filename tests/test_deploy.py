"""deploy/: the Dockerfile and the Kubernetes install (kustomize base + overlays: redis and nats with an
in-cluster broker; redis-cluster, redis-sentinel and nats-cluster pointing at an external one, configuration
only).

Every manifest that ``kubectl kustomize`` renders for each overlay passes ``kubernetes-validate --strict``
and ``checkov --framework kubernetes`` (skips only those listed with a reason in
deploy/kubernetes/checkov.yaml), and the Deployment keeps the operational contract: probes, preStop,
grace > preStop + drain, hardened security context, POD_NAME as the node id, spread across nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ("redis", "nats", "redis-cluster", "redis-sentinel", "nats-cluster")
EXAMPLE_INGRESS = K8S / "examples" / "ingress-nginx.yaml"
CHECKOV_CONFIG = K8S / "checkov.yaml"
APP_LABELS = {"app.kubernetes.io/name": "wirehub", "app.kubernetes.io/component": "server"}
#: overlays with an in-cluster broker: its StatefulSet/Service name and port
BROKER = {"redis": ("redis", 6379), "nats": ("nats", 4222)}
#: overlays pointing at an external broker: the ports wirehub pods may reach it on
EXTERNAL = {"redis-cluster": {6379}, "redis-sentinel": {6379, 26379}, "nats-cluster": {4222}}
#: what check-config needs from the environment (the Secret) for each overlay
CHECK_ENV = {"WIREHUB_REDIS_URL": "redis://127.0.0.1:6379/0", "WIREHUB_NATS_URL": "nats://127.0.0.1:4222",
             "WIREHUB_REDIS_NODE_1": "10.0.0.1:6379", "WIREHUB_REDIS_SENTINEL_1": "10.0.0.2:26379",
             "WIREHUB_REDIS_PASSWORD": "p" * 16,
             "WIREHUB_NATS_URL_1": "tls://10.0.0.1:4222", "WIREHUB_NATS_USER": "wirehub",
             "WIREHUB_NATS_PASSWORD": "p" * 16}
#: what kubectl 1.20's embedded kustomize (v2.0.3) understands and we use
KUSTOMIZE_V2_KEYS = {"apiVersion", "kind", "namespace", "bases", "resources", "configMapGenerator",
                     "secretGenerator", "images", "generatorOptions", "commonLabels", "commonAnnotations",
                     "patchesStrategicMerge", "namePrefix", "nameSuffix"}

Docs = list[dict[str, Any]]


def _tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    return str(candidate) if candidate.is_file() else shutil.which(name)


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: apt-get install kubernetes-client")
    return kubectl


def _one(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _by_prefix(docs: Docs, kind: str, prefix: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"expected one {kind}/{prefix}*, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def _overlay_config(overlay: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "overlays" / overlay / "wirehub.yaml").read_text())
    return data


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- rendering -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``overlay -> rendered multi-document YAML file``, from a copy of deploy/kubernetes whose overlays
    got their secrets.env from secrets.env.example (as an installer does; the repository has none)."""
    kubectl = _kubectl()
    work = tmp_path_factory.mktemp("k8s")
    tree = work / "kubernetes"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    out: dict[str, Path] = {}
    for overlay in OVERLAYS:
        folder = tree / "overlays" / overlay
        shutil.copy(folder / "secrets.env.example", folder / "secrets.env")
        proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        target = work / f"{overlay}.yaml"
        target.write_text(proc.stdout)
        out[overlay] = target
    return out


def _docs(path: Path) -> Docs:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def checkov_results(rendered: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """One checkov run per overlay (it is slow to start): the rendered install plus the example Ingress."""
    checkov = _tool("checkov")
    assert checkov is not None, "checkov is missing: pip install -e '.[test]'"
    results: dict[str, dict[str, Any]] = {}
    for overlay, path in rendered.items():
        proc = subprocess.run(
            [checkov, "--config-file", str(CHECKOV_CONFIG), "-f", str(path), "-f", str(EXAMPLE_INGRESS),
             "-o", "json"],
            capture_output=True, text=True, timeout=300, cwd=path.parent,
        )
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"checkov printed no JSON (exit {proc.returncode}):\n"
                        f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        report["returncode"] = proc.returncode
        results[overlay] = report
    return results


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_install(rendered: dict[str, Path], overlay: str) -> None:
    docs = _docs(rendered[overlay])
    kinds = sorted({d["kind"] for d in docs})
    for kind in ("Namespace", "ServiceAccount", "Deployment", "Service", "ConfigMap", "Secret",
                 "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"):
        assert kind in kinds, f"{overlay}: no {kind} in {kinds}"
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"wirehub"}
    if overlay in EXTERNAL:  # configuration only: no broker runs in the cluster
        assert "StatefulSet" not in kinds
        return
    broker, _ = BROKER[overlay]
    assert _one(docs, "StatefulSet", broker)["spec"]["replicas"] == 1
    _one(docs, "Service", broker)


def test_base_is_namespace_agnostic() -> None:
    for path in (K8S / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert "namespace" not in (doc.get("metadata") or {}), f"{path.name} names a namespace"
            assert "namespace" not in doc, f"{path.name} sets a namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_pass_kubernetes_validate_strict(rendered: dict[str, Path], overlay: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(rendered[overlay]),
         str(EXAMPLE_INGRESS)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"kubernetes-validate --strict failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_reports_no_failures(checkov_results: dict[str, dict[str, Any]], overlay: str) -> None:
    report = checkov_results[overlay]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})"
              for c in report.get("results", {}).get("failed_checks", [])]
    assert failed == [], f"checkov failures for {overlay}:\n" + "\n".join(failed)
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    # it did look at the Deployment, the broker (when it runs in the cluster), the policies...
    in_cluster = overlay in BROKER
    assert summary["passed"] > (100 if in_cluster else 80), summary
    assert summary["resource_count"] >= (14 if in_cluster else 10), summary
    assert report["returncode"] == 0


def test_every_skipped_checkov_check_has_a_reason() -> None:
    text = CHECKOV_CONFIG.read_text()
    config = yaml.safe_load(text)
    assert config["framework"] == ["kubernetes"]
    assert config["skip-download"] is True  # runs offline
    for check in config.get("skip-check", []):
        reason = re.search(rf"^\s*# {re.escape(check)} (.+)$", text, re.MULTILINE)
        assert reason is not None and len(reason.group(1)) > 40, f"{check} is skipped without a reason"
    assert "soft-fail" not in config and "soft-fail-on" not in config


# -- the kustomizations stay renderable by kubectl 1.20 (kustomize v2.0.3) --------------------------------------


def _kustomizations() -> Iterator[Path]:
    yield K8S / "base" / "kustomization.yaml"
    for overlay in OVERLAYS:
        yield K8S / "overlays" / overlay / "kustomization.yaml"


@pytest.mark.parametrize("path", list(_kustomizations()), ids=lambda p: p.parent.name)
def test_kustomizations_use_only_what_old_kustomize_renders(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert set(data) <= KUSTOMIZE_V2_KEYS, f"unsupported by kubectl 1.20: {set(data) - KUSTOMIZE_V2_KEYS}"
    for resource in data.get("resources", []):
        assert (path.parent / resource).is_file(), f"resources: {resource} must be a file (directories go in bases:)"
    for base in data.get("bases", []):
        assert (path.parent / base / "kustomization.yaml").is_file()
    for generator in data.get("configMapGenerator", []) + data.get("secretGenerator", []):
        assert "envs" not in generator, "kustomize v2 only knows `env:`"
        for name in [*generator.get("files", []), *([generator["env"]] if "env" in generator else [])]:
            assert "/" not in name and ".." not in name, f"{name}: generators read files in their own folder"
    for overlay in OVERLAYS:
        example = K8S / "overlays" / overlay / "secrets.env.example"
        assert example.is_file()
    assert "overlays/*/secrets.env" in (K8S / ".gitignore").read_text()


# -- the Deployment's operational contract ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_grace(rendered: dict[str, Path], overlay: str) -> None:
    docs = _docs(rendered[overlay])
    deployment = _one(docs, "Deployment", "wirehub")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = _overlay_config(overlay)
    port = config["server"]["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", port)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = float(config["drain"]["grace"])
    assert pre_stop >= 3, "endpoints need a few seconds to drop the pod before SIGTERM"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace + 5, "no room for the drain to finish"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_is_hardened_and_named_by_pod(rendered: dict[str, Path], overlay: str) -> None:
    docs = _docs(rendered[overlay])
    pod = _one(docs, "Deployment", "wirehub")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert _overlay_config(overlay)["server"]["node_id"] == "$env:POD_NAME"
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    for constraint in pod["topologySpreadConstraints"]:
        assert _matches(constraint["labelSelector"]["matchLabels"], pod.get("labels", APP_LABELS))
    # The image's user (deploy/Dockerfile) is the one the pod runs as.
    assert f"USER {sc['runAsUser']}:" in (DEPLOY / "Dockerfile").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secret_are_wired(rendered: dict[str, Path], overlay: str) -> None:
    docs = _docs(rendered[overlay])
    pod = _one(docs, "Deployment", "wirehub")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap = _by_prefix(docs, "ConfigMap", "wirehub-config")
    secret = _by_prefix(docs, "Secret", "wirehub-secrets")
    # The generated (hash-suffixed) names are the ones the pod references: a change rolls the pods.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == [secret["metadata"]["name"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WIREHUB_CONFIG"] == mounts["config"] + "/wirehub.yaml"
    assert configmap["data"]["wirehub.yaml"] == (K8S / "overlays" / overlay / "wirehub.yaml").read_text()
    config = yaml.safe_load(configmap["data"]["wirehub.yaml"])
    assert config["bus"]["plugin"] == overlay.split("-")[0]
    assert config["auth"]["plugin"] == "jwt"
    assert config["auth"]["jwt"]["secret"] == "$env:WIREHUB_JWT_SECRET"
    assert config["api"]["keys"] == ["$env:WIREHUB_API_KEY"]
    assert config["logging"]["format"] == "json"
    # Every $env: reference is satisfied by the Secret or the pod's env.
    refs = set(re.findall(r"\$env:([A-Z_][A-Z0-9_]*)", configmap["data"]["wirehub.yaml"]))
    assert refs <= set(secret["data"]) | set(env), refs - set(secret["data"]) - set(env)
    # Never a real secret in git: the example holds placeholders (and the in-cluster broker address).
    example = (K8S / "overlays" / overlay / "secrets.env.example").read_text()
    assert re.search(r"^WIREHUB_JWT_SECRET=CHANGE-ME$", example, re.MULTILINE)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_hpa_and_policies_select_the_pods(rendered: dict[str, Path], overlay: str) -> None:
    docs = _docs(rendered[overlay])
    deployment = _one(docs, "Deployment", "wirehub")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)
    service = _one(docs, "Service", "wirehub")
    assert _matches(service["spec"]["selector"], labels)
    assert "sessionAffinity" not in service["spec"] or service["spec"]["sessionAffinity"] == "None"
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    pdb = _one(docs, "PodDisruptionBudget", "wirehub")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels) and pdb["spec"]["maxUnavailable"] == 1
    hpa = _one(docs, "HorizontalPodAutoscaler", "wirehub")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "wirehub"}
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # wirehub accepts its port; it may reach DNS and the broker, nothing else.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and _matches(d["spec"]["podSelector"]["matchLabels"], labels)]
    ingress_ports = {p["port"] for pol in policies for rule in pol["spec"].get("ingress", []) for p in rule["ports"]}
    assert ingress_ports == {_overlay_config(overlay)["server"]["port"]}
    egress_ports = {p["port"] for pol in policies for rule in pol["spec"].get("egress", []) for p in rule["ports"]}
    if overlay in EXTERNAL:
        assert egress_ports == {53, *EXTERNAL[overlay]}
        return
    broker, broker_port = BROKER[overlay]
    assert egress_ports == {53, broker_port}
    broker_policy = _one(docs, "NetworkPolicy", broker)
    allowed_from = [peer["podSelector"]["matchLabels"] for rule in broker_policy["spec"]["ingress"]
                    for peer in rule.get("from", [])]
    assert allowed_from == [APP_LABELS]


def test_example_ingress_outlasts_the_ping_interval() -> None:
    ingress = yaml.safe_load(EXAMPLE_INGRESS.read_text())
    annotations = ingress["metadata"]["annotations"]
    for overlay in OVERLAYS:
        ping = float(_overlay_config(overlay)["server"]["ping_interval"])
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            assert float(annotations[f"nginx.ingress.kubernetes.io/{key}"]) > 3 * ping
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "wirehub", "port": {"name": "http"}}


def test_example_service_monitor_scrapes_the_named_port() -> None:
    monitor = yaml.safe_load((K8S / "examples" / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == APP_LABELS
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# -- the overlay configs are valid wirehub configs --------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_config_passes_check_config(overlay: str, tmp_path: Path) -> None:
    env = {**os.environ, "POD_NAME": "wirehub-0", "WIREHUB_JWT_SECRET": "x" * 32, "WIREHUB_API_KEY": "k" * 32,
           **CHECK_ENV}
    env.pop("WIREHUB_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "wirehub.cli", "check-config", str(K8S / "overlays" / overlay / "wirehub.yaml")],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"bus {overlay.split('-')[0]}" in proc.stdout and "auth jwt" in proc.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_verbatim_copy_of_the_example_secrets_cannot_start(overlay: str, tmp_path: Path) -> None:
    """The placeholders of secrets.env.example are refused (too short for HS256): nobody goes live with
    a JWT key that is in git."""
    example = (K8S / "overlays" / overlay / "secrets.env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    env = {**os.environ, "POD_NAME": "wirehub-0", **values}
    env.pop("WIREHUB_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "wirehub.cli", "check-config", str(K8S / "overlays" / overlay / "wirehub.yaml")],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "auth.jwt.secret" in proc.stderr


# -- the Dockerfile ---------------------------------------------------------------------------------------------


def _stages() -> list[list[str]]:
    lines: list[str] = []
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + line
        else:
            lines.append(line)
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None and "-slim" in base.group(1) and "python:3.11" in base.group(1)
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    final_text = "\n".join(final)
    assert re.search(r"COPY --from=build /opt/wirehub /opt/wirehub", final_text)
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "make "):
        assert tool not in final_text, f"the final image must not get {tool!r}"
    user = [line for line in final if line.upper().startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["wirehub"]' in final and 'CMD ["serve"]' in final
    # The build stage removes pip from the virtualenv that is copied.
    assert "pip uninstall -y pip" in "\n".join(stages[0])


def test_docker_build_context_holds_what_the_build_copies(tmp_path: Path) -> None:
    """Copy only what the build stage COPYs (and the .dockerignore lets through), then build a wheel of it."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources: list[str] = []
    for line in _stages()[0]:
        if line.upper().startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    final_copies = [line.split()[1] for line in _stages()[-1]
                    if line.upper().startswith("COPY ") and "--from" not in line]
    for src in sources + final_copies:
        assert (ROOT / src).exists(), f"COPY {src}: missing from the repository"
        assert src.split("/")[0] in allowed, f"COPY {src}: excluded by Dockerfile.dockerignore"
    for src in sources:
        target = tmp_path / src
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / src, target)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("wirehub-*.whl"))
    assert len(wheels) == 1
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "wirehub/cli.py" in names and "wirehub/builtins/handlers/echo.py" in names
    # no config file in the package: the built-in defaults are in the code (config/wirehub.yaml lists them)
    assert not [name for name in names if name.endswith(".yaml")]


def test_the_deployed_service_listens_on_every_interface() -> None:
    """The built-in default host is 127.0.0.1; the image and the overlays say 0.0.0.0 explicitly."""
    final = "\n".join(_stages()[-1])
    assert re.search(r"^ENV .*\bWIREHUB_HOST=0\.0\.0\.0\b", final, re.MULTILINE)
    for overlay in OVERLAYS:
        config = yaml.safe_load((K8S / "overlays" / overlay / "wirehub.yaml").read_text())
        assert config["server"]["host"] == "0.0.0.0", overlay


def test_multi_process_example_patches_an_overlay_into_a_valid_two_worker_install(tmp_path: Path) -> None:
    """examples/multi-process.yaml on the redis overlay: it renders, passes kubernetes-validate --strict, keeps
    the Deployment's other environment, asks for 2 CPUs, and the overlay's config passes check-config with
    the 2 workers it sets."""
    kubectl = _kubectl()
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    folder = tree / "overlays" / "redis"
    shutil.copy(folder / "secrets.env.example", folder / "secrets.env")
    shutil.copy(K8S / "examples" / "multi-process.yaml", folder / "multi-process.yaml")
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    kustomization["patchesStrategicMerge"] = [*kustomization.get("patchesStrategicMerge", []), "multi-process.yaml"]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "multi.yaml"
    target.write_text(proc.stdout)
    valid = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(target)],
                           capture_output=True, text=True, timeout=120)
    assert valid.returncode == 0, f"{valid.stdout}\n{valid.stderr}"
    container = _one(_docs(target), "Deployment", "wirehub")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WIREHUB_PROCESSES"] == "2" and {"WIREHUB_CONFIG", "POD_NAME"} <= set(env)
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"] == "2"
    check_env = {**os.environ, "POD_NAME": "wirehub-0", "WIREHUB_JWT_SECRET": "x" * 32, "WIREHUB_API_KEY": "k" * 32,
                 **CHECK_ENV, "WIREHUB_PROCESSES": "2"}
    check_env.pop("WIREHUB_CONFIG", None)
    check = subprocess.run([sys.executable, "-m", "wirehub.cli", "check-config", str(folder / "wirehub.yaml")],
                           capture_output=True, text=True, timeout=60, env=check_env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
