"""Deployment artifacts (deploy/, docs/DEPLOYMENT.md) against the code they deploy.

Static checks only, no docker and no cluster: the compose file and every Kubernetes manifest
parse; every LOOKSYNC_* variable they (or the Dockerfiles) name is a field of the settings
object; ports agree with the settings' defaults; images are pinned; Deployments carry probes
and resource requests; and the GPU-target Triton configs parse as Triton ModelConfigs with the
same model names, inputs and outputs as the CPU target. The health-check script runs against
an in-process gRPC health server on loopback.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import sys
import threading
import tomllib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import grpc
import pytest
import yaml
from google.protobuf import text_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tritonclient.grpc import model_config_pb2

from clients.cli import main as cli_main
from export.triton_config import ServingPlan, all_configs
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
GATEWAY_DOCKERFILE = DEPLOY / "Dockerfile"
TRITON_DOCKERFILE = DEPLOY / "triton" / "Dockerfile"
HEALTHCHECK = DEPLOY / "healthcheck.py"
DOC = ROOT / "docs" / "DEPLOYMENT.md"
TRITON_CODE = ROOT / "export" / "triton"

FIELDS = Settings.model_fields
KNOWN_ENV = {f"LOOKSYNC_{name.upper()}" for name in FIELDS}
ENV_NAME = re.compile(r"\bLOOKSYNC_[A-Z0-9_]*[A-Z0-9]")


def default(field: str):
    return FIELDS[field].default


GRPC_PORT = default("grpc_port")
METRICS_PORT = default("metrics_port")
WORKER_METRICS_PORT = default("worker_metrics_port")
TRITON_PORTS = {default("triton_http_port"), default("triton_grpc_port"), default("triton_metrics_port")}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))


def k8s_docs() -> list[dict]:
    docs = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def of_kind(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d.get("kind") == kind]


def named(kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instruction, _, args = current.partition(" ")
        out.append((instruction.upper(), args.strip()))
        current = ""
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1] :]


def from_images(instructions: list[tuple[str, str]]) -> list[str]:
    """Base images of every stage, with ARG defaults substituted; stage names skipped."""
    args = {}
    stages = set()
    images = []
    for ins, rest in instructions:
        if ins == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip().strip('"')
        if ins == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
            if image not in stages:
                images.append(image)
    return images


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(v, str) for v in parsed), value
    return parsed


def container_ports_from_compose(entries: list) -> set[int]:
    ports = set()
    for entry in entries:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
            continue
        container = str(entry).split("/")[0].rsplit(":", 1)[-1]
        if "-" in container:
            lo, hi = container.split("-")
            ports.update(range(int(lo), int(hi) + 1))
        else:
            ports.add(int(container))
    return ports


def assert_pinned(image: str, where: str) -> None:
    assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{where}: image {image!r} has no tag"
    if "@sha256:" not in image:
        tag = image.rsplit("/", 1)[-1].split(":", 1)[1]
        assert tag and tag != "latest", f"{where}: image {image!r} is not pinned"
    assert "${" not in image and "$(" not in image, f"{where}: image {image!r} is not a literal"


# ---------------------------------------------------------------------------------------------
# Parsing and settings names
# ---------------------------------------------------------------------------------------------


def test_every_manifest_parses():
    assert COMPOSE.is_file()
    assert isinstance(compose()["services"], dict)
    files = k8s_files()
    assert files, "no Kubernetes manifests under deploy/k8s"
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), f"{doc['__file__']}: not a Kubernetes object"
    kinds = {d["kind"] for d in k8s_docs()}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    } <= kinds


def test_every_looksync_variable_is_a_setting():
    sources = [COMPOSE, GATEWAY_DOCKERFILE, TRITON_DOCKERFILE, HEALTHCHECK, *k8s_files()]
    unknown = {}
    seen = set()
    for path in sources:
        names = set(ENV_NAME.findall(path.read_text()))
        seen |= names
        bad = sorted(names - KNOWN_ENV)
        if bad:
            unknown[str(path.relative_to(ROOT))] = bad
    assert not unknown, f"LOOKSYNC_* names that gateway/settings.py does not define: {unknown}"
    # The variables the deployment cannot work without are actually set somewhere.
    for required in (
        "LOOKSYNC_INDEX_BACKEND",
        "LOOKSYNC_ES_URL",
        "LOOKSYNC_TRITON_URL",
        "LOOKSYNC_REDIS_URL",
    ):
        assert required in seen


def test_env_values_are_valid_settings(monkeypatch):
    """The literal values in compose and the ConfigMap parse with the real settings object."""
    env = dict(compose()["services"]["gateway"]["environment"])
    env.update(named("ConfigMap", "looksync-config")["data"])
    values = {k: str(v) for k, v in env.items() if k.startswith("LOOKSYNC_") and "${" not in str(v)}
    assert values["LOOKSYNC_INDEX_BACKEND"] == "elasticsearch"
    assert values["LOOKSYNC_CACHE"] == "redis"
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOOKSYNC_ES_URL", "http://elastic:x@elasticsearch:9200")
    settings = Settings()
    assert settings.index_backend == "elasticsearch"
    assert settings.cache == "redis"


def test_configmap_values_are_strings():
    for doc in of_kind("ConfigMap"):
        for key, value in doc["data"].items():
            assert isinstance(value, str), f"ConfigMap {doc['metadata']['name']}: {key} must be a string"


def test_compose_gateway_and_worker_environment():
    services = compose()["services"]
    for name in ("gateway", "worker"):
        env = services[name]["environment"]
        assert env["LOOKSYNC_INDEX_BACKEND"] == "elasticsearch"
        assert env["LOOKSYNC_TRITON_URL"] == f"triton:{default('triton_grpc_port')}"
        assert env["LOOKSYNC_ES_URL"].startswith("http") and "@elasticsearch:9200" in env["LOOKSYNC_ES_URL"]
        assert env["LOOKSYNC_REDIS_URL"].startswith("redis://redis:6379")
        assert env["LOOKSYNC_CACHE"] == "redis"
        # Credentials come from the environment / .env, never literals in the file.
        assert "${ELASTIC_PASSWORD" in env["LOOKSYNC_ES_URL"]
        assert env["LOOKSYNC_ADMIN_TOKEN"].startswith("${")
    assert services["worker"]["command"] == ["ingest-worker"]
    assert services["gateway"].get("command", ["serve"]) == ["serve"]


def test_commands_exist_in_the_cli():
    """The container commands are real `looksync` subcommands."""
    services = compose()["services"]
    commands = {services["gateway"]["command"][0], services["worker"]["command"][0]}
    for dep in of_kind("Deployment"):
        for c in containers(dep):
            if "looksync" in c["image"] and "triton" not in c["image"]:
                commands.add(c.get("args", ["serve"])[0])
    for command in sorted(commands):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--help"])
        assert exit_info.value.code == 0, command


# ---------------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------------


def test_compose_ports_match_settings():
    services = compose()["services"]
    assert container_ports_from_compose(services["gateway"]["ports"]) == {GRPC_PORT, METRICS_PORT}
    assert container_ports_from_compose(services["triton"]["ports"]) == TRITON_PORTS
    env = services["gateway"]["environment"]
    assert int(env["LOOKSYNC_GRPC_PORT"]) == GRPC_PORT
    assert int(env["LOOKSYNC_METRICS_PORT"]) == METRICS_PORT
    assert int(env["LOOKSYNC_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT


def test_k8s_ports_match_settings():
    gateway = containers(named("Deployment", "gateway"))[0]
    assert {p["containerPort"] for p in gateway["ports"]} == {GRPC_PORT, METRICS_PORT}
    assert gateway["readinessProbe"]["grpc"]["port"] == GRPC_PORT
    annotations = named("Deployment", "gateway")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == METRICS_PORT
    assert {p["port"] for p in named("Service", "gateway")["spec"]["ports"]} == {GRPC_PORT, METRICS_PORT}

    triton = containers(named("Deployment", "triton"))[0]
    assert {p["containerPort"] for p in triton["ports"]} == TRITON_PORTS
    assert {p["port"] for p in named("Service", "triton")["spec"]["ports"]} == TRITON_PORTS

    worker = containers(named("Deployment", "worker"))[0]
    assert {p["containerPort"] for p in worker["ports"]} == {WORKER_METRICS_PORT}

    data = named("ConfigMap", "looksync-config")["data"]
    assert int(data["LOOKSYNC_GRPC_PORT"]) == GRPC_PORT
    assert int(data["LOOKSYNC_METRICS_PORT"]) == METRICS_PORT
    assert int(data["LOOKSYNC_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT
    assert data["LOOKSYNC_TRITON_URL"].endswith(f":{default('triton_grpc_port')}")
    assert data["LOOKSYNC_TRITON_URL"].split(".")[0] == "triton"  # the Service above


def test_dockerfile_ports_match_settings():
    exposed = {
        int(p) for ins, rest in dockerfile(GATEWAY_DOCKERFILE) if ins == "EXPOSE" for p in rest.split()
    }
    assert {GRPC_PORT, METRICS_PORT} <= exposed
    triton_exposed = {
        int(p) for ins, rest in dockerfile(TRITON_DOCKERFILE) if ins == "EXPOSE" for p in rest.split()
    }
    assert triton_exposed == TRITON_PORTS


def test_services_select_their_deployments():
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [
            d
            for d in of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matches, f"Service {service['metadata']['name']} selects no Deployment"
        ports = {p["name"] for d in matches for c in containers(d) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert isinstance(target, int) or target in ports, (service["metadata"]["name"], target)
    for dep in of_kind("Deployment"):
        assert (
            dep["spec"]["selector"]["matchLabels"].items()
            <= dep["spec"]["template"]["metadata"]["labels"].items()
        )


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def test_images_are_pinned():
    for name, service in compose()["services"].items():
        assert "image" in service, f"compose service {name} has no image"
        assert_pinned(service["image"], f"compose {name}")
    for dep in of_kind("Deployment"):
        for c in containers(dep):
            assert_pinned(c["image"], f"{dep['__file__']} {dep['metadata']['name']}/{c['name']}")
    for path in (GATEWAY_DOCKERFILE, TRITON_DOCKERFILE):
        images = from_images(dockerfile(path))
        assert images
        for image in images:
            assert_pinned(image, str(path.relative_to(ROOT)))


def test_gateway_dockerfile():
    instructions = dockerfile(GATEWAY_DOCKERFILE)
    images = from_images(instructions)
    assert all(i.startswith("python:3.11") and "slim" in i for i in images), images
    last = final_stage(instructions)
    assert exec_form(dict(last)["ENTRYPOINT"]) == ["looksync"]
    assert exec_form(dict(last)["CMD"]) == ["serve"]
    users = [rest for ins, rest in last if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must not run as root"
    healthcheck = dict(last)["HEALTHCHECK"]
    assert "healthcheck.py" in healthcheck
    assert any(ins == "COPY" and "deploy/healthcheck.py" in rest for ins, rest in last)
    installs = " ".join(rest for ins, rest in instructions if ins == "RUN" and "pip install" in rest)
    # Serving path only: the core with both index backends and the LLM client; no export or
    # triton-cpu extra, no torch.
    assert '".[lancedb,elasticsearch,llm]"' in installs
    assert "export" not in installs and "triton-cpu" not in installs and "torch" not in installs
    assert not re.search(r"numpy\s*[>=~]=?\s*2", installs)


def test_triton_dockerfile():
    instructions = dockerfile(TRITON_DOCKERFILE)
    assert from_images(instructions) == ["nvcr.io/nvidia/tritonserver:24.10-py3"]
    runs = " ".join(rest for ins, rest in instructions if ins == "RUN")
    assert re.search(r"numpy[^\"\s]*<2", runs)
    cmd = exec_form(dict(instructions)["CMD"])
    assert cmd[0] == "tritonserver"
    assert "--model-repository=/models" in cmd
    assert "--model-control-mode=explicit" in cmd
    assert "--strict-readiness=true" in cmd
    loads = [a for a in cmd if a.startswith("--load-model")]
    assert loads == ["--load-model=*"], "--load-model=* must be the only --load-model"
    users = [rest for ins, rest in instructions if ins == "USER"]
    assert users and users[-1] not in ("root", "0")


def _third_party_imports(path: Path) -> set[str]:
    local = {p.stem for p in TRITON_CODE.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local} - {
        "__future__",
        "triton_python_backend_utils",
    }


def test_triton_image_has_what_the_gpu_python_models_import():
    """The python-backend code the GPU target runs (wrappers + what they import) finds every
    third-party module in the Triton image. onnx_encoder.py runs on the CPU target only."""
    pip_name = {"PIL": "Pillow"}
    needed = set()
    for name in ("clip_image.py", "clip_text.py", "preprocess.py", "text_tokenizer.py"):
        needed |= _third_party_imports(TRITON_CODE / name)
    runs = " ".join(rest for ins, rest in dockerfile(TRITON_DOCKERFILE) if ins == "RUN").lower()
    missing = {m for m in needed if pip_name.get(m, m).lower() not in runs}
    assert not missing, f"deploy/triton/Dockerfile does not install {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# Deployments, probes, resources, secrets
# ---------------------------------------------------------------------------------------------


def test_deployments_have_probes_and_resource_requests():
    deployments = of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} >= {"triton", "gateway", "worker"}
    for dep in deployments:
        for c in dep["spec"]["template"]["spec"]["containers"]:
            where = f"{dep['metadata']['name']}/{c['name']}"
            assert c.get("readinessProbe"), f"{where}: no readinessProbe"
            assert c.get("livenessProbe"), f"{where}: no livenessProbe"
            requests = c.get("resources", {}).get("requests", {})
            assert requests.get("cpu") and requests.get("memory"), f"{where}: no cpu/memory requests"
            assert c.get("resources", {}).get("limits", {}).get("memory"), f"{where}: no memory limit"


def test_triton_deployment():
    dep = named("Deployment", "triton")
    (c,) = containers(dep)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    http_port = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert http_port.get(port, port) == default("triton_http_port")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert named("PersistentVolumeClaim", claim)


def test_gateway_deployment_and_autoscaler():
    dep = named("Deployment", "gateway")
    (c,) = containers(dep)
    assert c["readinessProbe"]["grpc"]["port"] == GRPC_PORT
    # Liveness must not follow Triton / index availability (that is readiness): see gateway.yaml.
    assert "grpc" in c["livenessProbe"] or "tcpSocket" in c["livenessProbe"]
    live_port = (c["livenessProbe"].get("grpc") or c["livenessProbe"]["tcpSocket"])["port"]
    assert live_port == GRPC_PORT
    hpa = named("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in dep["spec"], "the HPA owns the gateway's replica count"


def test_worker_deployment():
    dep = named("Deployment", "worker")
    (c,) = containers(dep)
    assert c["args"] == ["ingest-worker"]
    assert dep["spec"]["replicas"] >= 1


def test_secret_template_and_references():
    (secret,) = of_kind("Secret")
    assert secret["__file__"].endswith(".example.yaml")
    values = secret["stringData"]
    assert {"LOOKSYNC_ADMIN_TOKEN", "LOOKSYNC_LLM_API_KEY", "ES_PASSWORD"} <= set(values)
    for key, value in values.items():
        if key != "ES_USERNAME":
            assert "CHANGE-ME" in value, f"secret template {key} must hold a placeholder"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert secret["__file__"] not in kustomization["resources"]
    for path in kustomization["resources"]:
        assert (K8S / path).is_file()
    config_keys = set(named("ConfigMap", "looksync-config")["data"])
    for dep in of_kind("Deployment"):
        for c in containers(dep):
            defined = set()
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["name"] == secret["metadata"]["name"]
                    assert ref["secretKeyRef"]["key"] in values
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config_keys
                # $(VAR) only expands variables defined earlier in the list.
                for used in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                    assert used in defined, f"{dep['metadata']['name']}: $({used}) used before it is defined"
                defined.add(var["name"])
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] == "looksync-config"


def test_everything_is_in_the_namespace():
    (ns,) = of_kind("Namespace")
    for doc in k8s_docs():
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"].get("namespace") == ns["metadata"]["name"], doc["metadata"]["name"]


def test_compose_health_and_dependencies():
    services = compose()["services"]
    for name in ("triton", "elasticsearch", "redis", "gateway", "worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"compose {name}: no healthcheck"
    for name in ("gateway", "worker"):
        depends = services[name]["depends_on"]
        for dep in ("triton", "elasticsearch", "redis"):
            assert depends[dep]["condition"] == "service_healthy"
    triton = services["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "../model_repository:/models:ro" in triton["volumes"]
    es = services["elasticsearch"]
    assert es["image"].split(":")[-1].startswith("8.")
    assert es["environment"]["discovery.type"] == "single-node"
    assert "xpack.security.enabled" in es["environment"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert services["redis"]["image"].startswith("redis:7")


# ---------------------------------------------------------------------------------------------
# GPU-target Triton configs
# ---------------------------------------------------------------------------------------------


def _plan(target: str) -> ServingPlan:
    return ServingPlan(model="clip", target=target, image_size=224, context_length=77)


def _parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _io(config: model_config_pb2.ModelConfig) -> tuple:
    return (
        [(t.name, t.data_type) for t in config.input],
        [(t.name, t.data_type) for t in config.output],
    )


def test_gpu_configs_parse_and_match_the_cpu_target():
    gpu = {name: _parse(text) for name, text in all_configs(_plan("gpu")).items()}
    cpu = {name: _parse(text) for name, text in all_configs(_plan("cpu")).items()}
    assert set(gpu) == set(cpu) == {"clip_image_encoder", "clip_text_encoder", "clip_image", "clip_text"}
    for name, config in gpu.items():
        assert config.name == name
        assert _io(config) == _io(cpu[name]), name
        assert config.max_batch_size == cpu[name].max_batch_size
        assert config.HasField("dynamic_batching")
        if name.endswith("_encoder"):
            # The ONNX Runtime backend ships in NVIDIA's container (with the TensorRT accelerator).
            assert config.backend == "onnxruntime"
            assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
            (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
            assert accelerator.name == "tensorrt"
            assert accelerator.parameters["precision_mode"] in ("FP16", "FP32")
        else:
            assert config.backend == "python"
            assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    # TensorRT builds one profile for a fixed image size.
    (pixels,) = gpu["clip_image_encoder"].input
    assert list(pixels.dims) == [3, 224, 224]


def test_trt_engine_cache_is_on_a_mounted_volume():
    """The engines the ORT TensorRT accelerator caches land on a volume in compose and k8s,
    so a container restart reuses them instead of rebuilding."""
    gpu = {name: _parse(text) for name, text in all_configs(_plan("gpu")).items()}
    paths = set()
    for config in gpu.values():
        for acc in config.optimization.execution_accelerators.gpu_execution_accelerator:
            if acc.parameters.get("trt_engine_cache_enable") in ("1", "true"):
                paths.add(PurePosixPath(acc.parameters["trt_engine_cache_path"]))
    assert paths

    def covered(mounts: set[PurePosixPath]) -> bool:
        return all(any(m == p or m in p.parents for m in mounts) for p in paths)

    compose_mounts = {
        PurePosixPath(v.split(":")[1]) for v in compose()["services"]["triton"]["volumes"] if ":" in v
    }
    assert covered(compose_mounts), f"compose: {sorted(map(str, paths))} not under a volume"
    (c,) = containers(named("Deployment", "triton"))
    k8s_mounts = {PurePosixPath(m["mountPath"]) for m in c["volumeMounts"]}
    assert covered(k8s_mounts), f"k8s: {sorted(map(str, paths))} not under a volume"


# ---------------------------------------------------------------------------------------------
# The health-check script
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("looksync_deploy_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_GRPC_PORT == GRPC_PORT
    assert module.DEFAULT_WORKER_METRICS_PORT == WORKER_METRICS_PORT
    return module


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(0)


def test_healthcheck_grpc(healthcheck, health_server):
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["--port", str(port)]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["--port", str(port)]) == 1


def test_healthcheck_nothing_listening(healthcheck, monkeypatch):
    # A port nothing listens on any more: refused quickly, reported as unhealthy.
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        free = probe.server_address[1]
    monkeypatch.setenv("LOOKSYNC_GRPC_PORT", str(free))
    assert healthcheck.main(["--timeout", "1"]) == 1


def test_healthcheck_worker(healthcheck, monkeypatch):
    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = b"# HELP up\nup 1\n"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Metrics) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            monkeypatch.setenv("LOOKSYNC_WORKER_METRICS_PORT", str(server.server_address[1]))
            assert healthcheck.main(["--worker"]) == 0
        finally:
            server.shutdown()
    assert healthcheck.main(["--worker", "--timeout", "1"]) == 1


# ---------------------------------------------------------------------------------------------
# The guide
# ---------------------------------------------------------------------------------------------


def test_deployment_guide_covers_the_steps():
    text = DOC.read_text()
    for needle in (
        "python -m export clip --arch ViT-H-14",
        "--target gpu",
        "docker compose",
        "looksync index",
        "products-",
        "alias",
        "rollback",
        "12 M",
        "350 k",
        "2,390",
        "LOOKSYNC_ADMIN_TOKEN",
        "TLS",
    ):
        assert needle in text, f"docs/DEPLOYMENT.md does not mention {needle!r}"
    for name in set(ENV_NAME.findall(text)):
        assert name in KNOWN_ENV, f"docs/DEPLOYMENT.md names {name}, which gateway/settings.py lacks"


# ---------------------------------------------------------------------------------------------
# Dependencies: pyproject.toml's ranges, constraints.txt's versions, the same everywhere
# ---------------------------------------------------------------------------------------------

CONSTRAINTS = ROOT / "constraints.txt"
SETUP = ROOT / "scripts" / "setup.sh"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_groups() -> dict[str, list[Requirement]]:
    """{"core" | extra: requirements}, without the extras' references to looksync itself."""
    p = project()
    groups = {"core": p["dependencies"], **p["optional-dependencies"]}
    return {
        group: [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != "looksync"]
        for group, reqs in groups.items()
    }


def constraints() -> list[Requirement]:
    out = []
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(Requirement(line))
    return out


def pinned_here() -> dict[str, str]:
    """{name: version} of the constraints that apply to this Python (3.11, the project's)."""
    return {
        canonicalize_name(c.name): next(iter(c.specifier)).version
        for c in constraints()
        if c.marker is None or c.marker.evaluate()
    }


def test_constraints_are_exact_pins():
    seen = set()
    for c in constraints():
        specs = list(c.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt: {c} is not one == pin"
        assert not c.extras and not c.url, f"constraints.txt: {c}"
        key = (canonicalize_name(c.name), str(c.marker))
        assert key not in seen, f"constraints.txt pins {c.name} twice"
        seen.add(key)
    here = [canonicalize_name(c.name) for c in constraints() if c.marker is None or c.marker.evaluate()]
    assert len(here) == len(set(here)), "constraints.txt has two pins of one package for Python 3.11"
    assert "looksync" not in here
    assert "nvidia-pytriton" not in here, (
        "nvidia-pytriton is pinned in scripts/setup.sh (installed --no-deps)"
    )


def test_constraints_satisfy_pyproject():
    """Every pin of a package the project requires, for any Python, is inside the range that
    pyproject.toml gives it in every group that names it."""
    pins: dict[str, list[Requirement]] = {}
    for c in constraints():
        pins.setdefault(canonicalize_name(c.name), []).append(c)
    here = pinned_here()
    for group, requirements in requirement_groups().items():
        for r in requirements:
            name = canonicalize_name(r.name)
            assert name in here, f"constraints.txt does not pin {r.name} ({group})"
            for c in pins[name]:
                version = next(iter(c.specifier)).version
                assert r.specifier.contains(version, prereleases=True), (
                    f"constraints.txt pins {c} outside pyproject.toml's {group} range {r}"
                )


def _installed_closure() -> set[str]:
    """Distributions that looksync with every extra pulls in, from the installed metadata."""
    installed = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(r, "") for reqs in requirement_groups().values() for r in reqs]
    missing = set()
    while todo:
        r, extra = todo.pop()
        if r.marker is not None and not r.marker.evaluate({"extra": extra}):
            continue
        key = (canonicalize_name(r.name), tuple(sorted(r.extras)))
        if key in seen:
            continue
        seen.add(key)
        dist = installed.get(key[0])
        if dist is None:
            missing.add(r.name)
            continue
        for dep in map(Requirement, dist.requires or []):
            # A dependency behind an extra counts when the requirement asked for that extra.
            extras = [""] + list(r.extras)
            match = next((e for e in extras if dep.marker is None or dep.marker.evaluate({"extra": e})), None)
            if match is not None:
                todo.append((dep, match))
    assert not missing, f"not installed (scripts/setup.sh installs every extra): {sorted(missing)}"
    return {name for name, _ in seen}


def test_constraints_pin_what_the_extras_install():
    """constraints.txt covers every distribution the extras pull in, at the version installed
    here (scripts/setup.sh installs with it, so a stale pin or a missing one shows)."""
    here = pinned_here()
    closure = _installed_closure()
    unpinned = sorted(closure - set(here))
    assert not unpinned, f"constraints.txt does not pin {unpinned}"
    extra = sorted(set(here) - closure)
    assert not extra, f"constraints.txt pins what no extra installs: {extra}"
    differ = {}
    for name in closure:
        version = importlib.metadata.version(name)
        if version != here[name]:
            differ[name] = (version, here[name])
    assert not differ, f"installed vs constraints.txt: {differ}"


def _quoted_requirements(text: str) -> dict[str, Requirement]:
    found = {}
    for quoted in re.findall(r'"([A-Za-z][A-Za-z0-9_.-]*(?:\[[a-z,-]+\])?[<>=!~][^"]*)"', text):
        r = Requirement(quoted)
        found[canonicalize_name(r.name)] = r
    return found


def test_shared_dependencies_have_one_pin_everywhere():
    """A range named in an image is the one pyproject.toml gives: the Triton image installs the
    `triton-cpu` extra's packages it needs by name; the gateway image installs the project's
    extras, so names no range of its own."""
    groups = requirement_groups()
    triton_cpu = {canonicalize_name(r.name): r for r in groups["triton-cpu"]}
    image = _quoted_requirements(TRITON_DOCKERFILE.read_text())
    assert image, TRITON_DOCKERFILE
    for name, r in image.items():
        assert name in triton_cpu, f"deploy/triton/Dockerfile installs {r}, which the triton-cpu extra lacks"
        assert r.specifier == triton_cpu[name].specifier, (
            f"deploy/triton/Dockerfile pins {r}, pyproject.toml's triton-cpu {triton_cpu[name]}"
        )
    assert not _quoted_requirements(GATEWAY_DOCKERFILE.read_text()), (
        "deploy/Dockerfile names ranges of its own"
    )


@pytest.mark.parametrize("path", [GATEWAY_DOCKERFILE, TRITON_DOCKERFILE], ids=["gateway", "triton"])
def test_images_install_with_the_constraints_file(path):
    instructions = dockerfile(path)
    copied = {}
    for ins, rest in instructions:
        if ins == "COPY" and "--from" not in rest:
            *sources, dest = rest.split()
            for source in sources:
                copied[source] = dest
    assert "constraints.txt" in copied, f"{path.relative_to(ROOT)} does not COPY constraints.txt"
    dest = copied["constraints.txt"]
    target = dest if not dest.endswith("/") else dest + "constraints.txt"
    if dest == "./":
        target = "constraints.txt"
    installs = [rest for ins, rest in instructions if ins == "RUN" and "pip install" in rest]
    assert installs
    for run in installs:
        for command in re.split(r"&&|;", run):
            if "pip install" in command and "--upgrade pip" not in command:
                assert re.search(rf"(-c|--constraint)\s+{re.escape(target)}(\s|$)", command), (
                    f"{path.relative_to(ROOT)}: `{command.strip()}` does not use -c {target}"
                )


def test_compose_builds_images_from_the_repository_root():
    """Both Dockerfiles COPY constraints.txt, which only a build from the repository root sees."""
    for service, dockerfile_path in (("triton", TRITON_DOCKERFILE), ("gateway", GATEWAY_DOCKERFILE)):
        build = compose()["services"][service]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, f"compose {service} build context"
        assert (ROOT / build["dockerfile"]).resolve() == dockerfile_path


def test_setup_installs_every_extra_with_the_constraints():
    text = SETUP.read_text()
    stamp = next(line for line in text.splitlines() if line.startswith("stamp="))
    for name in ("pyproject.toml", "constraints.txt", "scripts/setup.sh"):
        assert name in stamp, f"the setup stamp does not hash {name}"
    install = re.search(r'pip install[^\n]*-c constraints\.txt\s*\\?\s*-e "\.\[([a-z,-]+)\]"', text)
    assert install, "scripts/setup.sh does not install the project with -c constraints.txt"
    assert set(install.group(1).split(",")) == set(project()["optional-dependencies"]), (
        "scripts/setup.sh must install every extra (the tests need them all)"
    )
    assert re.search(r'--no-deps "nvidia-pytriton==[0-9.]+"', text)
