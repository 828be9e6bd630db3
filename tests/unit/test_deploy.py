"""The production deployment files, checked offline against the code they start.

- ``deploy/kubernetes``: ``kubectl kustomize`` renders the base and every overlay; every
  object validates strictly (an unknown field fails) against the schemas of a pinned
  Kubernetes release; the settings file of each loads as tuneloop's settings and agrees
  with the objects around it (replicas, Services, mounts, vLLM's command line); every
  pod that opens the store takes store.url from the Secret tuneloop-store, which the
  production overlay requires. The production overlay keeps adapters, runs and datasets
  in the object store (store.artifacts, store.snapshots): its vLLM replicas run the
  image of ``deploy/vllm/Dockerfile`` (vLLM with tuneloop's plugin), fetch adapters into
  a cache of their own with the store's endpoint, region and credentials, and mount
  only the base model from the home.
- ``prefect.yaml``: parsed as ``prefect deploy`` parses it, and the same deployments as
  ``tuneloop worker`` serves (tuneloop/flows/serve.py), on the two pools.
- ``deploy/prefect/gpu-pool.base-job-template.json``: Prefect's Kubernetes template with a
  GPU, the GPU nodes and their taint, rendering to a valid Job that mounts what the
  manifests create.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kubernetes_validate
import prefect
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.events import DeploymentTriggerTypes
from prefect.utilities.templating import apply_values
from pydantic import TypeAdapter

from tuneloop.runtime.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
PREFECT_YAML = ROOT / "prefect.yaml"
GPU_TEMPLATE = ROOT / "deploy" / "prefect" / "gpu-pool.base-job-template.json"
VLLM_DOCKERFILE = ROOT / "deploy" / "vllm" / "Dockerfile"
# The Kubernetes release the manifests are written for (kubernetes-validate bundles its
# schemas); a new release is a deliberate change here.
KUBERNETES_VERSION = "1.34.0"
TARGETS = ["base", *sorted(f"overlays/{p.name}" for p in (KUBERNETES / "overlays").iterdir()
                           if (p / "kustomization.yaml").is_file())]
CONTROL_POOL = "tuneloop-control"
GPU = "nvidia.com/gpu"
HOME_CLAIM = "tuneloop-home"
# Names of environment variables that hold a secret: they must come from a Secret.
SECRET_NAME = re.compile(r"(KEY|PASSWORD|TOKEN|CONNECTION_URL)$")
# Where every pod that opens the store takes store.url from (the Postgres store).
STORE_URL = "TUNELOOP_STORE__URL"
STORE_SECRET = {"name": "tuneloop-store", "key": "url"}
# Where the object store's credentials come from, as tuneloop's settings and as the AWS_*
# variables boto3 reads in the vLLM replicas.
OBJECT_STORE_SECRET = "tuneloop-object-store"
OBJECT_STORE_KEYS = {
    "TUNELOOP_OBJECT_STORE__ACCESS_KEY_ID": "access-key-id",
    "TUNELOOP_OBJECT_STORE__SECRET_ACCESS_KEY": "secret-access-key",
}
AWS_KEYS = {"AWS_ACCESS_KEY_ID": "access-key-id", "AWS_SECRET_ACCESS_KEY": "secret-access-key"}
# The overlay that runs the store in Postgres, the Secret required.
PRODUCTION = "overlays/production"
TRIGGERS: TypeAdapter[DeploymentTriggerTypes] = TypeAdapter(DeploymentTriggerTypes)

Doc = dict[str, Any]


@functools.cache
def render(target: str) -> tuple[Doc, ...]:
    """The objects ``kubectl kustomize deploy/kubernetes/<target>`` renders."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH; it renders the kustomizations (kubectl kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(KUBERNETES / target)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {target} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, rendered {len(matches)}"
    return matches[0]


def pod_spec(workload: Doc) -> Doc:
    return dict(workload["spec"]["template"]["spec"])


def workloads(docs: tuple[Doc, ...]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def only_container(workload: Doc) -> Doc:
    (container,) = pod_spec(workload)["containers"]
    return dict(container)


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_of(pod: Doc, container: Doc, workload: Doc | None = None
              ) -> dict[str, tuple[Doc, str]]:
    """Mount path -> (the volume, its subPath or ""); a StatefulSet's claim templates
    count as volumes of its pods."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for claim in (workload or {}).get("spec", {}).get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"volumeClaimTemplate": claim}
    return {m["mountPath"]: (volumes[m["name"]], m.get("subPath", ""))
            for m in container.get("volumeMounts", [])}


def uses_tuneloop_image(container: Doc) -> bool:
    return str(container["image"]).split("/")[-1].startswith("tuneloop")


@functools.cache
def settings_of(target: str) -> Settings:
    """The rendered ConfigMap's tuneloop.toml, loaded as every tuneloop pod loads it
    (TUNELOOP_CONFIG), with no TUNELOOP_ variable of this process in the way."""
    return settings_with(target, {})


def settings_with(target: str, env: dict[str, str]) -> Settings:
    """:func:`settings_of` with the variables ``env`` set, as a pod's env sets them."""
    config = find(render(target), "ConfigMap", "tuneloop-config")
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        path = Path(tmp) / "tuneloop.toml"
        path.write_text(config["data"]["tuneloop.toml"])
        for name in [n for n in os.environ if n.startswith("TUNELOOP_")]:
            patch.delenv(name)
        patch.setenv("TUNELOOP_CONFIG", str(path))
        for name, value in env.items():
            patch.setenv(name, value)
        return load_settings()


def secret_variables() -> set[str]:
    """The TUNELOOP_ variables that set a secret setting (``store.url``:
    ``TUNELOOP_STORE__URL``)."""
    from tuneloop.flows.common import secret_settings

    return {"TUNELOOP_" + s.upper().replace(".", "__") for s in secret_settings()}


@functools.cache
def prefect_yaml() -> Doc:
    return dict(yaml.safe_load(PREFECT_YAML.read_text()))


def flow_of(entrypoint: str) -> Flow[Any, Any]:
    """The flow object an entrypoint (``path/to/module.py:name``) names in the package."""
    path, _, name = entrypoint.partition(":")
    assert path.startswith("tuneloop/") and (ROOT / path).is_file(), entrypoint
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow), f"{entrypoint} is a {type(flow).__name__}, not a flow"
    return flow


def test_the_pinned_kubernetes_release_has_bundled_schemas() -> None:
    # kubernetes-validate falls back to an older release's schemas without saying so.
    assert KUBERNETES_VERSION in all_versions()


def test_there_is_an_overlay_beside_the_base() -> None:
    assert "overlays/production" in TARGETS and len(TARGETS) >= 2


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_validates_strictly(target: str) -> None:
    docs = render(target)
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "StatefulSet",
            "Service", "HorizontalPodAutoscaler", "Role", "RoleBinding"} <= {d["kind"] for d in docs}
    for doc in docs:
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tuneloop", where


@pytest.mark.parametrize("target", TARGETS)
def test_vllm_replicas_hold_a_gpu_each_on_gpu_nodes_and_nothing_else_does(target: str) -> None:
    docs = render(target)
    vllm = find(docs, "StatefulSet", "vllm")
    pod, container = pod_spec(vllm), only_container(vllm)
    assert int(container["resources"]["limits"][GPU]) == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Training takes its GPUs through the pool's Jobs, not through a standing workload.
    for workload in workloads(docs):
        if workload is not vllm:
            for c in pod_spec(workload)["containers"]:
                assert GPU not in c.get("resources", {}).get("limits", {}), workload["metadata"]


@pytest.mark.parametrize("target", TARGETS)
def test_vllm_runs_the_command_line_tuneloop_gives_its_replicas(target: str) -> None:
    from tuneloop.serving.vllm_process import vllm_argv, vllm_env

    settings, docs = settings_of(target), render(target)
    vllm = find(docs, "StatefulSet", "vllm")
    container = only_container(vllm)
    model = settings.training.base_model
    # A local model directory is served under its folder's name (cli/serving.served_model).
    expected = vllm_argv(Path("python3"), model, Path(model).name, 8000, settings.serving)
    expected[expected.index("--host") + 1] = "0.0.0.0"  # the pod's address, not loopback
    assert [*container["command"], *container["args"]] == expected
    env = env_of(container)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == \
        vllm_env(settings.serving)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "tuneloop-keys", "key": "vllm-api-key"}
    mounts = mounts_of(pod_spec(vllm), container, vllm)
    if settings.store.artifacts:
        # The gateway names object-stored versions; tuneloop's plugin fetches each into
        # the replica's own cache. The home gives the base model only, read-only.
        cache, _ = mounts[env["TUNELOOP_ADAPTER_CACHE"]["value"]]
        assert "emptyDir" in cache
        models, sub_path = mounts[str(settings.models_dir)]
        assert sub_path == "models"
        assert models["persistentVolumeClaim"] == {"claimName": HOME_CLAIM, "readOnly": True}
        assert Path(model).is_relative_to(settings.models_dir)
        assert not [p for p in mounts if settings.adapters_dir.is_relative_to(p)]
    else:
        # The adapter cache: the registry's directories, read-only, at the paths the
        # gateway names in its load calls; the base model under the same mount.
        home, _ = mounts[str(settings.home)]
        assert home["persistentVolumeClaim"] == {"claimName": HOME_CLAIM, "readOnly": True}
        assert Path(model).is_relative_to(settings.home)
        assert settings.adapters_dir.is_relative_to(settings.home)


@pytest.mark.parametrize("target", TARGETS)
def test_vllm_reaches_the_object_store_tuneloop_keeps_adapters_in(target: str) -> None:
    from tuneloop.runtime.s3 import s3_env

    settings, docs = settings_of(target), render(target)
    container = only_container(find(docs, "StatefulSet", "vllm"))
    env = env_of(container)
    if not settings.store.artifacts:
        assert not [name for name in env if name.startswith(("AWS_", "TUNELOOP_ADAPTER"))]
        return
    # The endpoint and region tuneloop gives the replicas it starts itself (s3_env), as
    # the settings file says; boto3 reads the region from AWS_DEFAULT_REGION.
    expected = s3_env(settings.object_store)
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        assert env[name]["value"] == expected[name], name
    assert "AWS_SKIP_SIGNATURE" not in env  # an external store wants signed requests
    for name, key in AWS_KEYS.items():
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": OBJECT_STORE_SECRET,
                                                          "key": key}, name
    assert int(env["TUNELOOP_ADAPTER_CACHE_KEEP"]["value"]) >= 1
    # The image carries the plugin: built from the Dockerfile on the base's vLLM image.
    base_image = only_container(find(render("base"), "StatefulSet", "vllm"))["image"]
    assert container["image"] != base_image
    dockerfile = VLLM_DOCKERFILE.read_text()
    assert re.search(rf"^FROM {re.escape(base_image)}$", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY vllm-plugin ", dockerfile, re.MULTILINE)


def test_production_keeps_artifacts_and_datasets_in_an_external_object_store() -> None:
    settings = settings_of(PRODUCTION)
    assert settings.store.artifacts and settings.store.snapshots
    assert settings.store.url is None  # from the Secret, as every pod takes it
    assert settings.object_store.embedded is False
    # The credentials come from the Secret, never from the file.
    assert settings.object_store.access_key_id is None
    with_keys = settings_with(PRODUCTION, dict.fromkeys(OBJECT_STORE_KEYS, "k")).object_store
    assert with_keys.access_key_id is not None and with_keys.secret_access_key is not None
    assert set(OBJECT_STORE_KEYS) <= secret_variables()
    # The pods that write or read objects take them: the control worker (curation's
    # snapshots, the offline gate, collection after each promotion) required, the
    # training Jobs optionally (one template for every overlay).
    control = env_of(only_container(find(render(PRODUCTION), "Deployment",
                                         "prefect-worker-control")))
    pod = gpu_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (job,) = pod["containers"]
    for name, key in OBJECT_STORE_KEYS.items():
        ref = control[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": OBJECT_STORE_SECRET, "key": key}, name
        assert env_of(job)[name]["valueFrom"]["secretKeyRef"] == {
            "name": OBJECT_STORE_SECRET, "key": key, "optional": True}, name


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_lists_every_vllm_replica(target: str) -> None:
    settings, docs = settings_of(target), render(target)
    vllm, service = find(docs, "StatefulSet", "vllm"), find(docs, "Service", "vllm")
    assert service["spec"]["clusterIP"] == "None" and vllm["spec"]["serviceName"] == "vllm"
    (port,) = service["spec"]["ports"]
    assert settings.serving.replica_urls == [
        f"http://vllm-{i}.vllm:{port['port']}" for i in range(vllm["spec"]["replicas"])]
    policy = find(docs, "NetworkPolicy", "vllm")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "tuneloop-gateway"}}}]


@pytest.mark.parametrize("target", TARGETS)
def test_ingest_runs_at_most_one_replica_per_partition(target: str) -> None:
    settings, docs = settings_of(target), render(target)
    ingest = find(docs, "Deployment", "tuneloop-ingest")
    assert 1 <= ingest["spec"]["replicas"] <= settings.kafka.partitions
    assert settings.kafka.embedded is False


def test_production_runs_several_ingest_replicas_within_the_partitions() -> None:
    # With the store in Postgres the replicas write beside one another: each one up to
    # the partition count adds write throughput.
    settings, docs = settings_of(PRODUCTION), render(PRODUCTION)
    ingest = find(docs, "Deployment", "tuneloop-ingest")
    assert 1 < ingest["spec"]["replicas"] <= settings.kafka.partitions


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_that_opens_the_store_takes_its_url_from_the_secret(target: str) -> None:
    docs = render(target)
    assert STORE_URL in secret_variables()
    opened = set()
    for workload in workloads(docs):
        for container in pod_spec(workload)["containers"]:
            env = env_of(container)
            if "TUNELOOP_CONFIG" not in env:
                continue
            # Every tuneloop process opens the store: ingest writes it, the gateway reads
            # the registry, the control worker's flows run on it.
            where = f"{target}: {workload['metadata']['name']}"
            ref = env[STORE_URL]["valueFrom"]["secretKeyRef"]
            assert {"name": ref["name"], "key": ref["key"]} == STORE_SECRET, where
            # Required in production (a pod never starts on a DuckDB file of its own
            # there); optional elsewhere, so that a cluster without the Secret keeps the
            # DuckDB file on the shared home.
            assert ref.get("optional", False) is (target != PRODUCTION), where
            opened.add(workload["metadata"]["name"])
    assert opened == {"tuneloop-ingest", "tuneloop-gateway", "prefect-worker-control"}
    # The variable sets store.url over the settings file, which names no database.
    assert settings_of(target).store.url is None
    url = "postgresql://tuneloop:pw@tuneloop-db-rw:5432/tuneloop"
    store = settings_with(target, {STORE_URL: url}).store
    assert store.url is not None and store.url.get_secret_value() == url


def test_the_training_jobs_take_the_store_url_from_the_secret() -> None:
    # train-adapter reads its dataset from the store and publishes the adapter to the
    # registry in it. One template serves every overlay: the Secret is optional there,
    # and present wherever the overlay's own pods require it.
    pod = gpu_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert "TUNELOOP_CONFIG" in env
    assert env[STORE_URL]["valueFrom"]["secretKeyRef"] == {**STORE_SECRET, "optional": True}


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_has_a_service_the_loop_reaches_and_scales_on_cpu(target: str) -> None:
    settings, docs = settings_of(target), render(target)
    gateway = find(docs, "StatefulSet", "tuneloop-gateway")
    # The loop reaches the gateway at serving.host:gateway_port: the Service's name.
    service = find(docs, "Service", settings.serving.host)
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"][
        "labels"].items()
    assert [p["port"] for p in service["spec"]["ports"]] == [settings.serving.gateway_port]
    container = only_container(gateway)
    assert env_of(container)["TUNELOOP_SERVING__HOST"]["value"] == "0.0.0.0"
    assert container["resources"]["requests"]["cpu"]  # what a CPU utilisation target needs
    hpa = find(docs, "HorizontalPodAutoscaler", "tuneloop-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "tuneloop-gateway"}
    assert 1 <= hpa["spec"]["minReplicas"] <= gateway["spec"]["replicas"] \
        <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_shared_home_is_mounted_at_the_same_paths_in_every_pod(target: str) -> None:
    settings, docs = settings_of(target), render(target)
    claimed: dict[str, set[str]] = {}
    for workload in workloads(docs):
        pod = pod_spec(workload)
        for container in pod["containers"]:
            for path, (volume, sub_path) in mounts_of(pod, container, workload).items():
                if volume.get("persistentVolumeClaim", {}).get("claimName") == HOME_CLAIM:
                    # A part of the home mounts where it lies in the home, so an adapter's
                    # path is the same for the flow that wrote it, the gateway and vLLM.
                    assert Path(path) == settings.home / sub_path, (workload["metadata"], path)
                    claimed.setdefault(workload["metadata"]["name"], set()).add(sub_path)
    assert claimed["tuneloop-ingest"] == claimed["prefect-worker-control"] == {""}
    # The gateway's own SQLite files stay on its own volume; the store, the registry, the
    # loop's figures and the base model come from the shared one. With store.artifacts
    # the registry is in the object store: the gateway reads no adapter files, and vLLM
    # takes the base model alone from the home.
    registry = set() if settings.store.artifacts else {"adapters"}
    assert claimed["tuneloop-gateway"] == {"store", "run", "models"} | registry
    assert claimed["vllm"] == ({"models"} if settings.store.artifacts else {""})
    assert settings.db_path.parent == settings.home / "store"
    assert settings.training.models_dir == settings.home / "models"


@pytest.mark.parametrize("target", TARGETS)
def test_tuneloop_containers_run_real_commands_with_the_settings_file(target: str) -> None:
    from typer.main import get_command

    from tuneloop.cli.main import app

    commands = get_command(app).commands
    docs, ran = render(target), set()
    for workload in workloads(docs):
        pod = pod_spec(workload)
        for container in pod["containers"]:
            if not uses_tuneloop_image(container):
                continue
            config = env_of(container)["TUNELOOP_CONFIG"]["value"]
            volume, _ = mounts_of(pod, container, workload)[str(Path(config).parent)]
            assert volume["configMap"]["name"] == "tuneloop-config"
            program, *argv = container["command"]
            if program == "tuneloop":
                name, *flags = argv
                assert name in commands, f"`tuneloop {name}` is no command"
                options = {opt for param in commands[name].params for opt in param.opts}
                assert set(flags) <= options, f"`tuneloop {name}` takes none of {flags}"
                ran.add(name)
    assert ran == {"ingest", "gateway"}


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_is_written_in_the_manifests(target: str) -> None:
    from tuneloop.flows.common import secret_settings

    docs = render(target)
    assert not [d for d in docs if d["kind"] == "Secret"]
    secrets = secret_variables()
    containers = [c for w in workloads(docs) for c in pod_spec(w)["containers"]]
    template = gpu_template()["job_configuration"]["job_manifest"]
    containers += template["spec"]["template"]["spec"]["containers"]
    for container in containers:
        for name, env in env_of(container).items():
            if SECRET_NAME.search(name) or name in secrets:
                assert "value" not in env, name
                assert env["valueFrom"]["secretKeyRef"]["name"] in {
                    "tuneloop-keys", "prefect-database", "tuneloop-store",
                    OBJECT_STORE_SECRET}, name
    gateway = env_of(only_container(find(docs, "StatefulSet", "tuneloop-gateway")))
    serving_secrets = {"TUNELOOP_" + s.upper().replace(".", "__")
                       for s in secret_settings() if s.startswith("serving.")}
    assert serving_secrets <= secrets
    assert serving_secrets <= set(gateway)
    server = env_of(only_container(find(docs, "Deployment", "prefect-server")))
    assert server["PREFECT_SERVER_DATABASE_CONNECTION_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "prefect-database", "key": "connection-url"}


def test_prefect_yaml_parses_as_prefect_deploy_parses_it() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_yaml())
    assert model.prefect_version == version("prefect") == prefect.__version__
    assert len(model.deployments) == 6
    for deployment in model.deployments:
        for trigger in deployment.triggers or []:
            TRIGGERS.validate_python(trigger)


def test_every_entrypoint_is_a_flow_of_the_package() -> None:
    names = {flow_of(d["entrypoint"]).name for d in prefect_yaml()["deployments"]}
    assert names == {"detect_drift", "retrain", "canary", "curate", "check-production",
                     "train-adapter"}


def _limit(declared: Doc) -> tuple[int | None, str | None]:
    limit = declared.get("concurrency_limit")
    if isinstance(limit, dict):
        return limit["limit"], limit.get("collision_strategy")
    return limit, None


def _schedule(schedule: Any) -> tuple[str, Any]:
    if isinstance(schedule, IntervalSchedule):
        return "interval", schedule.interval.total_seconds()
    assert isinstance(schedule, CronSchedule), schedule
    return "cron", schedule.cron


@pytest.mark.parametrize("target", TARGETS)
def test_prefect_yaml_declares_what_tuneloop_worker_serves(target: str) -> None:
    from tuneloop.flows.serve import deployments, training_deployment

    settings = settings_of(target)
    training = training_deployment(settings)
    assert training is not None, "the cluster trains on a work pool (loop.train_work_pool)"
    served = [*deployments(settings), training]
    declared = {(flow_of(d["entrypoint"]).name, d["name"]): d for d in prefect_yaml()["deployments"]}
    assert set(declared) == {(s.flow_name, s.name) for s in served}
    for s in served:
        d = declared[(s.flow_name, s.name)]
        where = f"{s.flow_name}/{s.name}"
        if ":" in str(s.entrypoint):
            path, _, name = str(s.entrypoint).partition(":")
            path = str(Path(path).resolve().relative_to(ROOT))
        else:  # by module path (train-adapter: the pool's machine imports it from its install)
            module, _, name = str(s.entrypoint).rpartition(".")
            path = module.replace(".", "/") + ".py"
        assert d["entrypoint"] == f"{path}:{name}", where
        assert d.get("tags") == s.tags, where
        assert (d.get("work_pool") or {}).get("job_variables", {}) == (s.job_variables or {}), \
            where
        assert d.get("description") == s.description, where
        assert d.get("parameters", {}) == s.parameters, where
        strategy = s.concurrency_options.collision_strategy if s.concurrency_options else None
        assert _limit(d) == (s.concurrency_limit, strategy and strategy.value), where
        assert [(k, v) for item in d.get("schedules", []) for k, v in item.items()] == \
            [_schedule(item.schedule) for item in s.schedules], where
        assert [TRIGGERS.validate_python(t).model_dump() for t in d.get("triggers", [])] == \
            [t.model_dump() for t in s.triggers], where


@pytest.mark.parametrize("target", TARGETS)
def test_each_pool_has_its_worker(target: str) -> None:
    settings, docs = settings_of(target), render(target)
    pools = {(flow_of(d["entrypoint"]).name, d["name"]): d["work_pool"]["name"]
             for d in prefect_yaml()["deployments"]}
    train_pool = settings.loop.train_work_pool
    # The retrain flow runs `train-adapter/<loop.train_work_pool>` (flows/retrain.py).
    assert train_pool and pools.pop(("train-adapter", train_pool)) == train_pool
    assert set(pools.values()) == {CONTROL_POOL}

    def pool_and_type(name: str) -> tuple[str, str]:
        argv = only_container(find(docs, "Deployment", name))["command"]
        assert argv[:3] == ["prefect", "worker", "start"], argv
        return argv[argv.index("--pool") + 1], argv[argv.index("--type") + 1]

    assert pool_and_type("prefect-worker-control") == (CONTROL_POOL, "process")
    assert pool_and_type("prefect-worker-gpu") == (train_pool, "kubernetes")
    # Flow runs of the process pool start where the deployments' pull step says.
    (pull,) = prefect_yaml()["pull"]
    control = only_container(find(docs, "Deployment", "prefect-worker-control"))
    assert control["workingDir"] == \
        pull["prefect.deployments.steps.set_working_directory"]["directory"]
    # The GPU worker's account may create and watch the training Jobs.
    gpu = find(docs, "Deployment", "prefect-worker-gpu")
    account = pod_spec(gpu)["serviceAccountName"]
    binding = find(docs, "RoleBinding", account)
    assert {"kind": "ServiceAccount", "name": account, "namespace": "tuneloop"} in \
        binding["subjects"]
    role = find(docs, "Role", binding["roleRef"]["name"])
    jobs = [r for r in role["rules"] if r["apiGroups"] == ["batch"] and "jobs" in r["resources"]]
    assert jobs and {"create", "get", "list", "watch", "delete"} <= set(jobs[0]["verbs"])


@functools.cache
def gpu_template() -> Doc:
    return dict(json.loads(GPU_TEMPLATE.read_text()))


def prefect_kubernetes_template() -> Doc:
    """The Kubernetes worker's default base job template, as Prefect ships it (what
    `prefect work-pool get-default-base-job-template --type kubernetes` prints)."""
    path = (Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
            / "aggregate-worker-metadata.json")
    return dict(json.loads(path.read_text())["prefect-kubernetes"]["kubernetes"][
        "default_base_job_configuration"])


def test_the_gpu_template_keeps_prefects_kubernetes_template_shape() -> None:
    ours, default = gpu_template(), prefect_kubernetes_template()
    assert set(ours["job_configuration"]) == set(default["job_configuration"])
    # Every job variable a deployment may set still exists.
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])


def test_the_gpu_template_asks_for_a_gpu_on_the_gpu_nodes() -> None:
    pod = gpu_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"][GPU]) == 1
    # The same nodes and taint as the vLLM replicas.
    vllm = pod_spec(find(render("base"), "StatefulSet", "vllm"))
    assert pod["nodeSelector"] == vllm["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == vllm["tolerations"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_gpu_template_renders_a_valid_job_mounting_what_the_manifests_create() -> None:
    template = gpu_template()
    values = {name: spec["default"] for name, spec in template["variables"]["properties"].items()
              if "default" in spec}
    # The worker names each Job after its flow run and fills in the command itself.
    job = apply_values(template["job_configuration"]["job_manifest"], values | {"name": "run"})
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    docs, settings = render("base"), settings_of("base")
    assert job["metadata"]["namespace"] == find(docs, "Namespace", "tuneloop")["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    account = find(docs, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["image"] in {c["image"] for w in workloads(docs)
                                  for c in pod_spec(w)["containers"] if uses_tuneloop_image(c)}
    mounts = mounts_of(pod, container)
    config = env_of(container)["TUNELOOP_CONFIG"]["value"]
    volume, _ = mounts[str(Path(config).parent)]
    data = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    assert Path(config).name in data
    home, _ = mounts[str(settings.home)]
    find(docs, "PersistentVolumeClaim", home["persistentVolumeClaim"]["claimName"])
