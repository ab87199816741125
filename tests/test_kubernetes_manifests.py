"""deploy/kubernetes: every object valid against the Kubernetes schemas, and the parts agree.

Built-in kinds go through kubernetes-validate (strict: unknown fields are errors). The
LeaderWorkerSet's own fields are checked here by hand, its pod templates through the schema. Then
the parts are checked against each other and against the programs they run: the leader's `inflight
serve` line parses with the real argument parser, its probes ask for a health service the gateway
registers, SMG's worker URLs name each group's leader, SMG's flags exist in the installed smg.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.gateway.__main__ import PUBLIC_SERVICES
from services.launcher import ServeConfig

FOLDER = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES = "1.33.0"


def documents() -> list[dict]:
    docs = []
    for path in sorted(FOLDER.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def lws() -> dict:
    (only,) = by_kind("LeaderWorkerSet")
    return only


def leader_container() -> dict:
    (container,) = lws()["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("doc", [d for d in documents() if d["kind"] != "LeaderWorkerSet"],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_built_in_objects_are_valid_against_the_kubernetes_schema(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_leader_worker_set_has_its_required_fields_and_valid_pod_templates() -> None:
    doc = lws()
    assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
    assert spec.get("startupPolicy", "LeaderCreated") in ("LeaderCreated", "LeaderReady")
    template = spec["leaderWorkerTemplate"]
    assert set(template) <= {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy",
                             "volumeClaimTemplates"}
    assert isinstance(template["size"], int) and template["size"] >= 1
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"  # one replica, one failure domain
    for role in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                        "template": template[role]}
        kubernetes_validate.validate(pod_template, KUBERNETES, strict=True)
        for container in template[role]["spec"]["containers"]:
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus >= 1
    env = {e["name"]: e["value"] for e in leader_container()["env"]}
    assert int(env["GPUS_PER_POD"]) == leader_container()["resources"]["limits"]["nvidia.com/gpu"]


def serve_line(script: str) -> list[str]:
    """The `inflight serve` arguments of the leader's script, with its shell variables given values."""
    line = re.search(r"exec inflight serve (.*?)(?:\n\s*\n|\Z)", script, re.S).group(1).replace("\\\n", " ")
    values = {"$((LWS_GROUP_SIZE * GPUS_PER_POD))": "2", '"${hosts}"': "inflight-0:1,inflight-0-1:1"}
    for variable, value in values.items():
        line = line.replace(variable, value)
    assert "$" not in line, f"an unexpanded shell variable in {line!r}"
    return shlex.split(line)


def test_the_leader_runs_a_valid_inflight_serve_with_grpc_probes_on_its_port() -> None:
    container = leader_container()
    parser = argparse.ArgumentParser()
    ServeConfig.add_arguments(parser)
    config = ServeConfig.from_args(parser.parse_args(serve_line(container["args"][0])))
    assert config.mpi_hosts and config.tp == 2 and config.device == "cuda"
    assert config.gateway.drain_seconds < lws()["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"][
        "terminationGracePeriodSeconds"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == config.port and ports["metrics"] == config.gateway.metrics_port
    health_names = {"", *PUBLIC_SERVICES}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == config.port and grpc_probe.get("service", "") in health_names
    annotations = lws()["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.gateway.metrics_port)


def test_services_select_the_pods_they_are_for() -> None:
    leader_labels = lws()["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
    (deployment,) = by_kind("Deployment")
    services = {s["metadata"]["name"]: s["spec"]["selector"] for s in by_kind("Service")}
    assert services["inflight-replicas"].items() <= leader_labels.items()
    assert services["smg"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def smg_script() -> str:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"][0]


def test_smg_routes_to_every_replicas_leader_with_flags_the_installed_smg_knows() -> None:
    doc = lws()
    name, namespace = doc["metadata"]["name"], doc["metadata"]["namespace"]
    urls = re.findall(r"grpc://\S+", smg_script())
    assert urls == [f"grpc://{name}-{group}.{name}.{namespace}.svc.cluster.local:50051"
                    for group in range(doc["spec"]["replicas"])]
    binary = Path(sys.executable).parent / "smg"
    help_text = subprocess.run([str(binary), "launch", "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in set(re.findall(r"(--[a-z][a-z-]+)", smg_script())):
        assert f"{flag} " in help_text or f"{flag}\n" in help_text or f"{flag}," in help_text, flag


def test_the_network_policy_lets_smg_reach_the_gateway_and_the_group_reach_itself() -> None:
    (policy,) = by_kind("NetworkPolicy")
    rules = policy["spec"]["ingress"]
    selectors = [r["from"][0].get("podSelector", {}).get("matchLabels") for r in rules]
    assert {"app.kubernetes.io/name": "inflight"} in selectors  # ssh, rendezvous, NCCL between ranks
    smg_rule = next(r for r in rules if r["from"][0].get("podSelector", {}).get("matchLabels") ==
                    {"app.kubernetes.io/name": "smg"})
    assert smg_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
