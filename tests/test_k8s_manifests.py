"""infra/k8s agrees with configs/cluster.yaml: the RayJob runs that config on the RayCluster, the
worker pods give each stream reader what the processor asks of Ray, the model is mounted where
the config looks for it, every pod runs the one image, built from the pinned set. (No
Kubernetes cluster is reachable from here: the manifests are parsed, not applied.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import ray
import yaml

from pipeline.config import load_config
from tests.conftest import ROOT

K8S = ROOT / "infra" / "k8s"


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_the_ray_job_runs_the_cluster_config_on_the_ray_cluster():
    cluster, job = manifest("raycluster.yaml"), manifest("rayjob.yaml")
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipeline.cli", "run"]
    config_path = argv[argv.index("-c") + 1]
    assert config_path.startswith("/app/")  # the image's WORKDIR holds the repository
    config = load_config(ROOT / config_path.removeprefix("/app/"), environ={})
    assert config.ray.address == "auto" and config.processor.spill_dir.is_absolute()
    assert "runtimeEnvYAML" not in job["spec"]  # nothing installed or uploaded at run time
    # The driver runs on the head: its pod exposes the Prometheus endpoint, bound beyond localhost.
    (head,) = containers(cluster["spec"]["headGroupSpec"]["template"])
    assert config.processor.metrics.enabled and config.processor.metrics.host == "0.0.0.0"
    assert config.processor.metrics.port in [port["containerPort"] for port in head["ports"]]


def test_reader_pods_give_each_reader_what_the_processor_asks_of_ray():
    config = load_config(ROOT / "configs" / "cluster.yaml", environ={}).processor
    spec = manifest("raycluster.yaml")["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # drivers only
    (readers,) = spec["workerGroupSpecs"]
    assert readers["replicas"] == readers["minReplicas"] == readers["maxReplicas"] == config.readers
    params = readers["rayStartParams"]
    assert float(params["num-cpus"]) == config.reader_num_cpus and float(params["num-gpus"]) == config.reader_num_gpus
    (container,) = containers(readers["template"])
    for bound in ("limits", "requests"):
        resources = container["resources"][bound]
        assert float(resources["cpu"]) == config.reader_num_cpus
        assert float(resources.get("nvidia.com/gpu", 0)) == config.reader_num_gpus
        # Ray's reservation for the reader fits the pod, with room for Ray's own processes.
        assert resources["memory"].endswith("Gi") and config.reader_memory_mb <= int(resources["memory"][:-2]) * 1024 - 2048


def test_every_pod_runs_the_one_image_with_the_model_and_scratch_where_the_config_looks():
    config = load_config(ROOT / "configs" / "cluster.yaml", environ={})
    spec = manifest("raycluster.yaml")["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {c["image"] for pod in pods for c in containers(pod)}
    assert len(images) == 1
    for pod in pods:
        mounts = [m["mountPath"] for c in containers(pod) for m in c.get("volumeMounts", [])]
        assert any(Path(config.model.path).is_relative_to(m) for m in mounts), mounts
    reader_mounts = [m["mountPath"] for c in containers(spec["workerGroupSpecs"][0]["template"])
                     for m in c.get("volumeMounts", [])]
    assert any(config.processor.spill_dir.is_relative_to(m) for m in reader_mounts)


def test_the_image_installs_the_pinned_set_and_this_project():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    assert "-r /tmp/lock.txt" in dockerfile and "requirements.lock" in dockerfile
    torch = next(line for line in (ROOT / "requirements.lock").read_text().splitlines() if line.startswith("torch=="))
    assert f"ARG TORCH={torch.removeprefix('torch==')}" in dockerfile  # the lock's build by default
    for package in ("actors", "pipeline", "ttt_model", "configs"):
        assert f"COPY {package} {package}" in dockerfile
    assert "WORKDIR /app" in dockerfile


def test_the_cluster_is_locked_down():
    spec = manifest("raycluster.yaml")["spec"]
    assert spec["authOptions"] == {"mode": "token"}  # Ray's token on the dashboard, Jobs API, GCS
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] != 0
        for container in containers(pod):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The head (the driver) gets the stream's secrets; a reader only MLflow's credentials (it
    # fetches models:/ and uploads its states), never the control key or Kafka's password.
    (head,) = containers(spec["headGroupSpec"]["template"])
    assert {"secretRef": {"name": "ttt-stream-secrets"}} in head["envFrom"]
    for group in spec["workerGroupSpecs"]:
        for container in containers(group["template"]):
            assert "envFrom" not in container
            assert {e["name"] for e in container["env"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
            assert all(e["valueFrom"]["secretKeyRef"]["key"] == e["name"] for e in container["env"])
    for pod in pods:
        for volume in pod["spec"].get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), volume  # spill files cannot fill the node
    assert re.search(r"^USER 1000$", (K8S / "Dockerfile").read_text(), re.M)


def test_the_network_policy_admits_only_the_cluster_the_submitters_and_prometheus():
    policy, head_kafka = yaml.safe_load_all((K8S / "networkpolicy.yaml").read_text())
    cluster = manifest("raycluster.yaml")["metadata"]["name"]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # Egress: each other, DNS and MLflow for every pod; Kafka for the head only.
    egress_ports = {p["port"] for r in policy["spec"]["egress"] for p in r.get("ports", [])}
    assert egress_ports == {53, 5000}
    assert head_kafka["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    assert [p["port"] for r in head_kafka["spec"]["egress"] for p in r["ports"]] == [9092]
    config = load_config(ROOT / "configs/cluster.yaml", environ={})
    assert {int(s.rsplit(":", 1)[1]) for s in config.kafka.bootstrap_servers.split(",")} == {9092}
    assert config.mlflow.tracking_uri.endswith(":5000")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": cluster}}
    rules = policy["spec"]["ingress"]
    open_rules = [r for r in rules if "ports" not in r]
    assert open_rules == [{"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": cluster}}}]}]
    ported = {p["port"] for r in rules if "ports" in r for p in r["ports"]}
    head_ports = {p["containerPort"] for p in containers(manifest("raycluster.yaml")["spec"]["headGroupSpec"]["template"])[0]["ports"]}
    assert ported == {8265, 9464} and ported <= head_ports  # the Jobs API and the stream's metrics, nothing else
