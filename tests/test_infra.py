"""infra/: the cluster files are valid for the tools that read them, and agree with each other.

- every YAML parses; the AWS launcher config passes Ray's own validation (the schema
  `ray up` applies, after its defaults are filled in; no AWS call);
- the KubeRay objects carry what their ray.io/v1 CRDs and this project need: kind, Ray
  version = the image's, GPU limits, a memory-backed /dev/shm, GPU tolerations;
- the Serve config (and the RayService's copy of it) passes Serve's schema and its
  import_path builds the application from its args, without starting Serve;
- the Dockerfile installs the package from the pinned locks as a non-root user, and the
  locks satisfy pyproject.toml.
Docker, kubectl and a Kubernetes API are not needed (CI has none).
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKER = INFRA / "docker"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[str, dict]:
    """kind/name -> object, over every manifest in infra/k8s."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def lock_pins(variant: str) -> dict[str, str]:
    pins = {}
    for line in (DOCKER / f"requirements-{variant}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- YAML -----------------------------------------------------------------------------------
YAML_FILES = sorted(p.relative_to(REPO).as_posix() for p in INFRA.rglob("*.yaml"))


@pytest.mark.parametrize("path", YAML_FILES)
def test_yaml_parses(path):
    docs = load_all(REPO / path)
    assert docs and all(isinstance(d, dict) for d in docs), path


def test_every_infra_area_has_files():
    expected = {
        "infra/aws/cluster.yaml",
        "infra/k8s/raycluster.yaml",
        "infra/k8s/rayjob.yaml",
        "infra/k8s/rayservice.yaml",
        "infra/k8s/mlflow.yaml",
        "infra/runtime_env.yaml",
        "infra/serve/serve_config.yaml",
    }
    assert expected <= set(YAML_FILES)


# ---- AWS cluster launcher ---------------------------------------------------------------
def prepared_launcher_config(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)
    return prepared


def test_aws_launcher_config_passes_ray_validation():
    config = yaml.safe_load((INFRA / "aws/cluster.yaml").read_text())
    prepared = prepared_launcher_config(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) == 2  # on-demand and spot
    assert any(
        t["node_config"].get("InstanceMarketOptions") == {"MarketType": "spot"} for t in gpu_types
    )
    assert prepared["idle_timeout_minutes"] == 10
    docker = prepared["docker"]
    assert docker["head_image"].endswith("rwkv-ray:0.1.0-cpu")
    assert docker["worker_image"].endswith("rwkv-ray:0.1.0-gpu")
    for key in ("head_run_options", "worker_run_options"):
        assert any(o.startswith("--shm-size=") for o in docker[key]), key
    assert "--gpus all" in docker["worker_run_options"]
    assert sum(t["max_workers"] for t in gpu_types) == prepared["max_workers"]
    # Every `ray start` requires Ray's auth token, which file_mounts ships to each node.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in prepared[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "MLFLOW_TRACKING_URI=" in start, key
    assert "/home/ray/.ray/auth_token" in prepared["file_mounts"]


def test_ray_validation_rejects_a_misspelt_key():
    """The validator has teeth: the schema forbids unknown keys (so the test above means
    something)."""
    import jsonschema

    config = yaml.safe_load((INFRA / "aws/cluster.yaml").read_text())
    config["idle_timeout_minute"] = 10
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        prepared_launcher_config(config)


# ---- KubeRay --------------------------------------------------------------------------------
def ray_pods(obj: dict) -> tuple[dict, list[dict]]:
    """(head group, worker groups) of a RayCluster spec, wherever the object keeps it."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    return cluster, cluster["workerGroupSpecs"]


def container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def test_kuberay_clusters_match_the_crds_and_the_image():
    objects = k8s_objects()
    ray_version = lock_pins("gpu")["ray"]
    assert ray_version == lock_pins("cpu")["ray"]
    clusters = [o for o in objects.values() if o["kind"] in ("RayCluster", "RayService")]
    assert {o["kind"] for o in clusters} == {"RayCluster", "RayService"}
    for obj in clusters:
        assert obj["apiVersion"] == "ray.io/v1"
        cluster, workers = ray_pods(obj)
        assert cluster["rayVersion"] == ray_version, obj["metadata"]["name"]
        head = cluster["headGroupSpec"]
        assert "rayStartParams" in head and container(head)["image"].endswith("-cpu")
        assert workers, obj["metadata"]["name"]
        for group in workers:
            # Required by the CRD: groupName, template; rayStartParams (required before 1.1).
            assert group["groupName"] and "rayStartParams" in group
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            c = container(group)
            assert c["image"].endswith("-gpu")
            gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert gpus >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
            pod = group["template"]["spec"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                pod["tolerations"]
            )
            shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
            volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
            assert volume["emptyDir"]["medium"] == "Memory"


def test_raycluster_gives_one_worker_pod_a_whole_gpu_node():
    cluster = k8s_objects()["RayCluster/rwkv-ray"]
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert container(group)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert cluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 600


def test_rayjob_runs_finetune_on_the_raycluster():
    objects = k8s_objects()
    job = objects["RayJob/rwkv6-1b6-state"]
    assert job["apiVersion"] == "ray.io/v1"
    selector = job["spec"]["clusterSelector"]["ray.io/cluster"]
    assert f"RayCluster/{selector}" in objects
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "/home/ray/app/jobs/finetune.py"]
    config_path = entry[entry.index("--config") + 1]
    # The image copies jobs/ to /home/ray/app/jobs: the config must exist in the repo.
    assert (REPO / config_path.removeprefix("/home/ray/app/")).is_file()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["KERAS_BACKEND"] == "jax"
    # The job's settings load (overrides included) without Ray.
    from rwkv_ray.train.config import load_job_config

    overrides = [entry[i + 1] for i, a in enumerate(entry) if a == "--set"]
    config = load_job_config(REPO / config_path.removeprefix("/home/ray/app/"), overrides)
    assert config.checkpointing.storage_path.startswith("s3://")
    assert config.scaling.use_gpu and config.scaling.gpus_per_worker == 8


def test_rayservice_serves_the_serve_config():
    service = k8s_objects()["RayService/rwkv-serve"]
    serve_config = yaml.safe_load((INFRA / "serve/serve_config.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config


def test_mlflow_server_deployment_and_service():
    objects = k8s_objects()
    deployment, service = objects["Deployment/mlflow"], objects["Service/mlflow"]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["command"]
    assert args[:2] == ["mlflow", "server"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in args[2:] if "=" in a)
    assert flags["backend-store-uri"].startswith(("sqlite:////", "postgresql"))
    assert flags["artifacts-destination"].startswith("s3://")
    assert "--serve-artifacts" in args
    assert "mlflow:5000" in flags["allowed-hosts"].split(",")
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["port"] == int(flags["port"]) == 5000
    # The Ray pods point at this service.
    cluster = objects["RayCluster/rwkv-ray"]
    env = container(cluster["spec"]["headGroupSpec"])["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in env


def test_every_referenced_volume_and_account_exists():
    objects = k8s_objects()
    for obj in objects.values():
        text = yaml.safe_dump(obj)
        for claim in re.findall(r"claimName: ([\w-]+)", text):
            assert f"PersistentVolumeClaim/{claim}" in objects, claim
        for account in re.findall(r"serviceAccountName: ([\w-]+)", text):
            assert f"ServiceAccount/{account}" in objects, account


# ---- Serve ----------------------------------------------------------------------------------
def test_serve_config_builds_its_application():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from rwkv_ray.serve.app import app_builder

    config = yaml.safe_load((INFRA / "serve/serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Serve's own schema (what `serve deploy` checks)
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    import importlib

    builder = getattr(importlib.import_module(module), attr)
    assert builder is app_builder
    application = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    deployment = application._bound_deployment
    assert [d["name"] for d in app["deployments"]] == [deployment.name]
    options = deployment.ray_actor_options
    assert options["num_gpus"] == app["args"]["num_gpus"] == 1
    assert options["num_cpus"] == app["args"]["num_cpus"]


# ---- Docker -----------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pins_and_runs_as_non_root():
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    images = [a.split()[0] for k, a in steps if k == "FROM"]
    for image in images + [args["GPU_BASE"], args["CPU_BASE"]]:
        if not image.startswith(("${", "runtime-")):
            assert re.search(r":[\w.-]*\d", image), f"unpinned base image {image}"
    assert args["GPU_BASE"].startswith("nvidia/cuda:12.")
    assert args["VARIANT"] == "gpu" and args["PYTHON_VERSION"].count(".") == 2
    # The last USER is a non-root uid, and it comes after every RUN that needs root.
    users = [i for i, (k, _) in enumerate(steps) if k == "USER"]
    assert users and steps[users[-1]][1].split(":")[0] not in ("0", "root")
    runs = [i for i, (k, a) in enumerate(steps) if k == "RUN" and "apt-get" in a]
    assert runs and max(runs) < users[-1]
    # It installs the lock, then the package itself, and imports it in the final image.
    installs = [a for k, a in steps if k == "RUN" and "uv pip install" in a]
    assert any("requirements.txt" in a and "--no-deps" in a for a in installs)
    assert any(re.search(r"--no-deps /src(\s|$)", a) for a in installs)
    assert ("COPY", "rwkv_ray /src/rwkv_ray") in steps
    assert any(k == "RUN" and "import rwkv_ray" in a for k, a in steps[users[-1] :])


def test_docker_locks_satisfy_pyproject():
    project = pyproject()["project"]
    for variant in ("gpu", "cpu"):
        pins = lock_pins(variant)
        requirements = [Requirement(r) for r in project["dependencies"]]
        if variant == "gpu":
            requirements += [Requirement(r) for r in project["optional-dependencies"]["cuda"]]
        for req in requirements:
            name = re.sub(r"[-_.]+", "-", req.name.lower())
            assert name in pins, f"{variant}: {name} not locked"
            assert req.specifier.contains(pins[name]), f"{variant}: {name}=={pins[name]} vs {req}"
        # Head and workers must run the same Ray/JAX/Python packages: the locks differ only
        # by the CUDA plugin and NVIDIA's libraries.
    gpu, cpu = lock_pins("gpu"), lock_pins("cpu")
    shared = set(gpu) & set(cpu)
    assert {k: gpu[k] for k in shared} == {k: cpu[k] for k in shared}
    assert all(n.startswith(("nvidia-", "jax-cuda12-")) for n in set(gpu) - set(cpu))
    assert set(cpu) <= set(gpu)


def test_docker_locks_carry_the_tested_versions():
    tested = {}
    for line in (DOCKER / "tested-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            tested[re.sub(r"[-_.]+", "-", name.lower())] = version
    assert len(tested) == len(pyproject()["project"]["dependencies"])
    for variant in ("gpu", "cpu"):
        pins = lock_pins(variant)
        assert {k: pins.get(k) for k in tested} == tested, variant


def test_dockerignore_admits_what_the_dockerfile_copies():
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copies = [a.split() for k, a in dockerfile_instructions() if k == "COPY"]
    sources = [s for parts in copies if not parts[0].startswith("--from") for s in parts[:-1]]
    sources = [s for s in sources if not s.startswith("--")]
    for source in sources:
        source = source.replace("${VARIANT}", "*")
        assert source in admitted or any(source.startswith(a + "/") for a in admitted), source


# ---- runtime env --------------------------------------------------------------------------
def test_runtime_env_is_valid_for_ray_and_excludes_local_state():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own checks of every field
    assert env["working_dir"] == "."
    assert env["env_vars"]["KERAS_BACKEND"] == "jax"
    for heavy in (".venv/", ".git/", "mlflow.db", "mlartifacts/", "runs/", "out/"):
        assert heavy in env["excludes"], heavy
    # Secrets and per-cluster values come from the cluster's environment, never from here.
    assert not any(k.startswith(("AWS_", "MLFLOW_")) for k in env["env_vars"])
