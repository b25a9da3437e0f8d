#!/usr/bin/env python3
"""Tests of the Helm chart in charts/hapair, run by scripts/test-chart.sh.

Helm itself renders and lints the chart, through helm-python-sdk (the Helm v4 Go SDK behind
a C ABI: `helm install --dry-run=client`, `helm lint --strict` and the values-schema check
are Helm's own code, not a reimplementation). Every rendered object is validated with
kubernetes-validate against the OpenAPI schemas of each Kubernetes minor the chart claims.
Nothing here needs a cluster or the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "hapair"
CI_VALUES = CHART / "ci"
INVALID_VALUES = REPO / "tests" / "fixtures" / "chart"

# The Kubernetes minors the chart claims (Chart.yaml kubeVersion is ">=" the first one). Every
# rendered manifest is validated against each. The last is the newest kubernetes-validate
# knows; test_claimed_versions fails when the two lists drift apart.
KUBE_VERSIONS = ("1.33", "1.34", "1.35", "1.36", "1.37")

# Kinds defined by CRDs of other projects: kubernetes-validate has no schema for them.
CRD_TYPED_KINDS = {"ServiceMonitor"}

RELEASE = "hapair"
NAMESPACE = "hapair-system"
FULLNAME = "hapair"

# The operator's permissions, exactly: (binding scope, API group, resource, verb, resourceName).
# Anything granted beyond this, or missing from it, fails test_rbac_is_exactly_the_contract.
EXPECTED_RBAC = {
    *(("ClusterRole", "hapair.dev", res, verb, None)
      for res in ("hagroups", "replicatedvolumes")
      for verb in ("get", "list", "watch", "patch")),
    *(("ClusterRole", "hapair.dev", res, verb, None)
      for res in ("hagroups/status", "replicatedvolumes/status")
      for verb in ("get", "patch")),
    ("ClusterRole", "events.k8s.io", "events", "create", None),
    ("Role", "", "secrets", "get", None),
    ("Role", "", "secrets", "list", None),
    ("Role", "", "secrets", "watch", None),
    ("Role", "", "secrets", "create", None),
    ("Role", "", "secrets", "update", None),
    ("Role", "coordination.k8s.io", "leases", "create", None),
    ("Role", "coordination.k8s.io", "leases", "get", f"{FULLNAME}-leader"),
    ("Role", "coordination.k8s.io", "leases", "update", f"{FULLNAME}-leader"),
}


class Render:
    """One `helm install --dry-run=client` of the chart with one values file."""

    def __init__(self, label: str, values: dict[str, Any]):
        self.label = label
        self.values = values
        with helm.Config(storage_driver="memory", namespace=NAMESPACE) as config:
            release = config.install(CHART_HANDLE, RELEASE, values, namespace=NAMESPACE, dry_run="client")
        self.manifest: str = release["manifest"]
        self.notes: str = release.get("notes", "")
        # Each object with the YAML text it came from (RBAC comments are checked in the text).
        self.objects: list[tuple[dict[str, Any], str]] = []
        for text in re.split(r"^---\s*$", self.manifest, flags=re.MULTILINE):
            obj = yaml.safe_load(text)
            if obj:
                self.objects.append((obj, text))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj, _ in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"{self.label}: expected one {kind} {name}, found {len(found)}")
        return found[0]


CHART_HANDLE: helm.Chart
RENDERS: dict[str, Render] = {}
HELM_HOME: str


def values_files() -> list[Path]:
    files = sorted(CI_VALUES.glob("*.yaml"))
    if not files:
        raise AssertionError(f"no example values files in {CI_VALUES}")
    return files


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise AssertionError(f"{path}: values must be a mapping")
    return values


def setUpModule() -> None:
    global CHART_HANDLE, HELM_HOME
    # Keep Helm's cache/config/data out of the user's home, and away from any real cluster.
    HELM_HOME = tempfile.mkdtemp(prefix="hapair-chart-test-")
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        os.environ[var] = os.path.join(HELM_HOME, var.lower())
    os.environ.pop("KUBECONFIG", None)
    CHART_HANDLE = helm.Chart.load(CHART)
    RENDERS["defaults"] = Render("defaults", {})
    for path in values_files():
        RENDERS[path.name] = Render(path.name, load_values(path))
    print(f"\nhelm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
          f"kubernetes-validate {kubernetes_validate.__version__}; rendered: {', '.join(RENDERS)}",
          file=sys.stderr)


def tearDownModule() -> None:
    CHART_HANDLE.close()
    shutil.rmtree(HELM_HOME, ignore_errors=True)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class ChartMetadata(unittest.TestCase):
    def test_claimed_versions(self) -> None:
        meta = CHART_HANDLE.metadata
        self.assertEqual(meta["apiVersion"], "v2")
        self.assertEqual(meta["kubeVersion"], f">={KUBE_VERSIONS[0]}.0-0",
                         "Chart.yaml kubeVersion and KUBE_VERSIONS disagree on the oldest minor")
        newest = kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())
        self.assertEqual(KUBE_VERSIONS[-1], newest,
                         "KUBE_VERSIONS must end at the newest minor kubernetes-validate knows")
        minors = [int(v.split(".")[1]) for v in KUBE_VERSIONS]
        self.assertEqual(minors, list(range(minors[0], minors[-1] + 1)), "claimed minors must be contiguous")

    def test_images_default_to_app_version(self) -> None:
        app_version = CHART_HANDLE.metadata["appVersion"]
        deployment = RENDERS["defaults"].one("Deployment", FULLNAME)
        self.assertEqual(pod_spec(deployment)["containers"][0]["image"],
                         f"ghcr.io/hapair/hapair-operator:{app_version}")
        daemonset = RENDERS["agents-values.yaml"].one("DaemonSet", f"{FULLNAME}-agent")
        self.assertEqual(pod_spec(daemonset)["containers"][0]["image"],
                         f"ghcr.io/hapair/hapair-agent:{app_version}")
        pinned = RENDERS["nodeport-values.yaml"].one("Deployment", "ha")
        self.assertEqual(pod_spec(pinned)["containers"][0]["image"],
                         "ghcr.io/hapair/hapair-operator@sha256:" + "0" * 64)

    def test_package_round_trip(self) -> None:
        """`helm package` keeps everything the chart needs (nothing lost to .helmignore)."""
        with tempfile.TemporaryDirectory(prefix="hapair-chart-pkg-") as out:
            archive = CHART_HANDLE.save(out)
            with helm.Chart.load(archive) as packaged:
                self.assertEqual(packaged.schema, CHART_HANDLE.schema)
                self.assertEqual(len(packaged.crds), 2)
                self.assertEqual(sorted(t["name"] for t in packaged.templates),
                                 sorted(t["name"] for t in CHART_HANDLE.templates))


class Lint(unittest.TestCase):
    def test_lint_strict_is_clean(self) -> None:
        infos: set[str] = set()
        sets = [("defaults", None)] + [(p.name, load_values(p)) for p in values_files()]
        for label, values in sets:
            for version in KUBE_VERSIONS:
                report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{version}.0")
                problems = [m for m in report["messages"] if m["severity"] >= 2] + list(report["errors"])
                self.assertEqual(problems, [], f"helm lint --strict ({label}, Kubernetes {version})")
                self.assertEqual(report["total_charts_linted"], 1)
                infos.update(f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] < 2)
        for info in sorted(infos):
            print(f"\n  lint info: {info}", file=sys.stderr, end="")


class KubernetesSchemas(unittest.TestCase):
    def test_every_manifest_validates_for_every_claimed_version(self) -> None:
        unvalidated: set[str] = set()
        count = 0
        for render in RENDERS.values():
            self.assertTrue(render.objects, f"{render.label}: nothing rendered")
            for obj, _ in render.objects:
                for version in KUBE_VERSIONS:
                    where = f"{render.label}: {obj['kind']} {obj['metadata']['name']} on Kubernetes {version}"
                    try:
                        kubernetes_validate.validate(obj, version, strict=True)
                        count += 1
                    except kubernetes_validate.SchemaNotFoundError:
                        self.assertIn(obj["kind"], CRD_TYPED_KINDS, f"{where}: no schema for this kind")
                        unvalidated.add(f"{obj['apiVersion']} {obj['kind']}")
                    except kubernetes_validate.ValidationError as e:
                        path = ".".join(str(p) for p in e.path)
                        self.fail(f"{where}: {path}: {e.message}")
        print(f"\n  {count} object validations passed (Kubernetes {', '.join(KUBE_VERSIONS)}); "
              f"not validatable by kubernetes-validate (CRD-typed): {', '.join(sorted(unvalidated)) or 'none'}",
              file=sys.stderr, end="")

    def test_chart_crds_validate_as_crds(self) -> None:
        crds = CHART_HANDLE.crds
        self.assertEqual(sorted(c["filename"] for c in crds),
                         ["hapair/crds/hagroups.hapair.dev.yaml", "hapair/crds/replicatedvolumes.hapair.dev.yaml"])
        for crd in crds:
            obj = yaml.safe_load(crd["data"])
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    self.fail(f"{crd['filename']} on Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")


class Crds(unittest.TestCase):
    def test_chart_crds_equal_crdgen_output(self) -> None:
        with tempfile.TemporaryDirectory(prefix="hapair-crdgen-") as out:
            result = subprocess.run(
                ["cargo", "run", "-q", "--locked", "-p", "hapair-crds", "--bin", "crdgen", "--", "--out", out],
                cwd=REPO, capture_output=True, text=True, check=False, timeout=600)
            self.assertEqual(result.returncode, 0, f"crdgen failed: {result.stderr}")
            generated = {p.name: p.read_bytes() for p in Path(out).iterdir()}
        committed = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
        self.assertEqual(sorted(committed), sorted(generated), "chart crds/ holds other files than crdgen writes")
        for name, data in generated.items():
            self.assertTrue(committed[name] == data,
                            f"charts/hapair/crds/{name} differs from crdgen output; "
                            "run `cargo run -p hapair-crds --bin crdgen`")


class ValuesSchema(unittest.TestCase):
    def test_invalid_values_are_rejected_naming_the_field(self) -> None:
        fixtures = sorted(INVALID_VALUES.glob("*.yaml"))
        self.assertTrue(fixtures, f"no invalid values fixtures in {INVALID_VALUES}")
        for path in fixtures:
            text = path.read_text()
            expected = re.findall(r"^# expect-error: (.+)$", text, flags=re.MULTILINE)
            self.assertTrue(expected, f"{path.name}: no '# expect-error:' line")
            values = yaml.safe_load(text)
            # The schema check alone...
            with self.assertRaises(helm.HelmValuesError, msg=f"{path.name} passed the schema") as caught:
                CHART_HANDLE.validate_schema(values)
            for needle in expected:
                self.assertIn(needle, str(caught.exception), f"{path.name}: schema error lacks {needle!r}")
            # ...and a real install, which validates the values merged with the defaults.
            with self.assertRaises(helm.HelmError, msg=f"{path.name} installed") as caught:
                with helm.Config(storage_driver="memory", namespace=NAMESPACE) as config:
                    config.install(CHART_HANDLE, RELEASE, values, namespace=NAMESPACE, dry_run="client")
            message = str(caught.exception)
            self.assertIn("values don't meet the specifications of the schema", message, path.name)
            for needle in expected:
                self.assertIn(needle, message, f"{path.name}: install error lacks {needle!r}")
            # helm lint reports it as an error too.
            report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
            self.assertTrue(any(expected[0] in e for e in report["errors"]),
                            f"{path.name}: helm lint did not report {expected[0]!r}: {report['errors']}")
        print(f"\n  {len(fixtures)} invalid values files rejected with the expected messages", file=sys.stderr, end="")

    def test_example_values_pass_the_schema(self) -> None:
        CHART_HANDLE.validate_schema(CHART_HANDLE.values)
        for path in values_files():
            CHART_HANDLE.validate_schema(CHART_HANDLE.merge_values(load_values(path)))


class Rbac(unittest.TestCase):
    VERB_LINE = re.compile(r"^\s*-\s+([a-z]+)\s+#\s*(\S.{9,})$")

    def rbac_objects(self, render: Render) -> list[tuple[dict[str, Any], str]]:
        return [(o, t) for o, t in render.objects if o["kind"] in ("Role", "ClusterRole")]

    def secret_namespaces_render(self) -> Render:
        # The release namespace listed too: it already has its Role, and gets no second one.
        return Render("secret-namespaces", {"rbac": {"secretNamespaces": ["databases", NAMESPACE, "web"]}})

    def test_no_wildcards_and_every_verb_justified(self) -> None:
        for render in [*RENDERS.values(), self.secret_namespaces_render()]:
            objects = self.rbac_objects(render)
            extra = len(render.values.get("rbac", {}).get("secretNamespaces", [NAMESPACE])) - 1
            self.assertEqual(sorted(o["kind"] for o, _ in objects), ["ClusterRole", "Role", *["Role"] * extra],
                             render.label)
            for obj, text in objects:
                where = f"{render.label}: {obj['kind']} {obj['metadata']['name']}"
                verbs_total = 0
                for rule in obj["rules"]:
                    self.assertNotIn("nonResourceURLs", rule, where)
                    for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                        for item in rule.get(field, []):
                            self.assertNotIn("*", item, f"{where}: wildcard in {field}")
                    verbs_total += len(rule["verbs"])
                # Every verb sits on its own line with a comment giving the reason.
                justified = 0
                verbs_indent = None
                for line in text.splitlines():
                    indent = len(line) - len(line.lstrip(" "))
                    if re.match(r"^\s*verbs:\s*$", line):
                        verbs_indent = indent
                        continue
                    if verbs_indent is not None and indent >= verbs_indent and re.match(r"^\s*-\s", line):
                        self.assertRegex(line, self.VERB_LINE, f"{where}: verb without a justification comment")
                        justified += 1
                        continue
                    verbs_indent = None
                self.assertEqual(justified, verbs_total, f"{where}: verbs must be a block list, one commented verb a line")

    def test_rbac_is_exactly_the_contract(self) -> None:
        for render in RENDERS.values():
            granted = set()
            for obj, _ in self.rbac_objects(render):
                for rule in obj["rules"]:
                    for group in rule["apiGroups"]:
                        for res in rule["resources"]:
                            for verb in rule["verbs"]:
                                for name in rule.get("resourceNames") or [None]:
                                    granted.add((obj["kind"], group, res, verb, name))
            lease = render.one("Deployment", self.fullname(render))
            lease_arg = [a for a in pod_spec(lease)["containers"][0]["args"] if a.startswith("--leader-election-lease=")]
            expected = {(k, g, r, v, n and f"{self.fullname(render)}-leader") for k, g, r, v, n in EXPECTED_RBAC}
            self.assertEqual(granted - expected, set(), f"{render.label}: granted beyond the contract")
            self.assertEqual(expected - granted, set(), f"{render.label}: missing permissions")
            self.assertEqual(lease_arg, [f"--leader-election-lease={self.fullname(render)}-leader"])
            # The Role is namespaced to the release; bindings point at the operator's account.
            role = render.one("Role", self.fullname(render))
            self.assertEqual(role["metadata"]["namespace"], NAMESPACE)
            for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
                binding = render.one(kind, self.fullname(render))
                self.assertEqual(binding["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                                      "name": self.fullname(render)})
                self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": self.fullname(render),
                                                        "namespace": NAMESPACE}])
            bindings = render.of_kind("ClusterRoleBinding") + render.of_kind("RoleBinding")
            self.assertEqual(len(bindings), 2, f"{render.label}: only the operator is bound to roles")

    def test_no_cluster_role_grants_secrets(self) -> None:
        # Reading Secrets cluster-wide would hand the operator every credential in the
        # cluster; Secret access is namespaced (release namespace, rbac.secretNamespaces).
        for render in [*RENDERS.values(), self.secret_namespaces_render()]:
            for role in render.of_kind("ClusterRole"):
                for rule in role["rules"]:
                    if "" in rule.get("apiGroups", []):
                        self.assertNotIn("secrets", rule.get("resources", []),
                                         f"{render.label}: ClusterRole {role['metadata']['name']} grants Secrets")

    def test_secret_namespaces_get_read_only_roles_and_reach_the_operator(self) -> None:
        render = self.secret_namespaces_render()
        for namespace in ("databases", "web"):
            role = [r for r in render.of_kind("Role") if r["metadata"]["namespace"] == namespace]
            self.assertEqual(len(role), 1, namespace)
            self.assertEqual(role[0]["metadata"]["name"], f"{FULLNAME}-secrets")
            self.assertEqual(role[0]["rules"], [{"apiGroups": [""], "resources": ["secrets"],
                                                 "verbs": ["get", "list", "watch"]}], namespace)
            binding = [b for b in render.of_kind("RoleBinding") if b["metadata"]["namespace"] == namespace]
            self.assertEqual(len(binding), 1, namespace)
            self.assertEqual(binding[0]["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                     "name": f"{FULLNAME}-secrets"})
            self.assertEqual(binding[0]["subjects"], [{"kind": "ServiceAccount", "name": FULLNAME,
                                                       "namespace": NAMESPACE}])
        self.assertEqual([r["metadata"]["namespace"] for r in render.of_kind("Role")],
                         [NAMESPACE, "databases", "web"])
        args = pod_spec(render.one("Deployment", FULLNAME))["containers"][0]["args"]
        self.assertEqual([a for a in args if a.startswith("--secret-namespace")],
                         ["--secret-namespace=databases", "--secret-namespace=web"])
        # By default: the release namespace only, and no flag.
        args = pod_spec(RENDERS["defaults"].one("Deployment", FULLNAME))["containers"][0]["args"]
        self.assertFalse([a for a in args if a.startswith("--secret-namespace")])
        for version in KUBE_VERSIONS:
            for obj, _ in render.objects:
                kubernetes_validate.validate(obj, version, strict=True)

    @staticmethod
    def fullname(render: Render) -> str:
        return render.values.get("fullnameOverride") or FULLNAME


class Operator(unittest.TestCase):
    def test_security_context(self) -> None:
        for render in RENDERS.values():
            deployment = render.of_kind("Deployment")
            self.assertEqual(len(deployment), 1, render.label)
            spec = pod_spec(deployment[0])
            where = render.label
            self.assertIs(spec["securityContext"]["runAsNonRoot"], True, where)
            self.assertGreater(spec["securityContext"]["runAsUser"], 0, where)
            self.assertEqual(spec["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"}, where)
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                self.assertFalse(spec.get(key, False), f"{where}: {key}")
            volumes = {v["name"]: v for v in spec["volumes"]}
            for container in spec["containers"] + spec.get("initContainers", []):
                sc = container["securityContext"]
                self.assertIs(sc["runAsNonRoot"], True, where)
                self.assertIs(sc["readOnlyRootFilesystem"], True, where)
                self.assertIs(sc["allowPrivilegeEscalation"], False, where)
                self.assertIs(sc.get("privileged", False), False, where)
                self.assertEqual(sc["capabilities"], {"drop": ["ALL"]}, where)
                # The only writable path is an emptyDir at /tmp.
                writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
                self.assertEqual([(m["mountPath"], "emptyDir" in volumes[m["name"]]) for m in writable],
                                 [("/tmp", True)], where)
                resources = container["resources"]
                self.assertTrue({"cpu", "memory"} <= set(resources["requests"]), where)
                self.assertIn("memory", resources["limits"], where)

    def test_deployment_follows_the_operator_contract(self) -> None:
        render = RENDERS["defaults"]
        deployment = render.one("Deployment", FULLNAME)
        self.assertEqual(deployment["spec"]["replicas"], 2)
        container = pod_spec(deployment)["containers"][0]
        self.assertEqual(container["args"], [
            "run",
            "--node-api-listen=0.0.0.0:8443",
            "--metrics-listen=0.0.0.0:9090",
            f"--server-name={FULLNAME}.{NAMESPACE}.svc",
            f"--leader-election-lease={FULLNAME}-leader",
            f"--pki-secret={FULLNAME}-pki",
            "--log-format=json",
        ])
        env = {e["name"]: e for e in container["env"]}
        self.assertEqual(env["POD_NAME"]["valueFrom"], {"fieldRef": {"fieldPath": "metadata.name"}})
        self.assertEqual(env["POD_NAMESPACE"]["valueFrom"], {"fieldRef": {"fieldPath": "metadata.namespace"}})
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.assertEqual(ports, {"node-api": 8443, "metrics": 9090})
        self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})
        self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})
        # Text logs: no --log-format flag at all.
        text_logs = pod_spec(RENDERS["agents-values.yaml"].one("Deployment", FULLNAME))["containers"][0]["args"]
        self.assertFalse([a for a in text_logs if a.startswith("--log-format")])

    def test_external_access(self) -> None:
        render = RENDERS["defaults"]
        self.assertEqual([s["metadata"]["name"] for s in render.of_kind("Service")], [FULLNAME])
        self.assertEqual(render.one("Service", FULLNAME)["spec"]["type"], "ClusterIP")

        render = RENDERS["external-agents-values.yaml"]
        external = render.one("Service", f"{FULLNAME}-external")
        self.assertEqual(external["spec"]["type"], "LoadBalancer")
        self.assertEqual([p["name"] for p in external["spec"]["ports"]], ["node-api"], "metrics must stay internal")
        self.assertEqual(external["spec"]["loadBalancerSourceRanges"], ["198.18.10.0/24", "2001:db8:10::/64"])
        args = pod_spec(render.one("Deployment", FULLNAME))["containers"][0]["args"]
        self.assertEqual([a for a in args if a.startswith("--server-name=")],
                         [f"--server-name={FULLNAME}.{NAMESPACE}.svc", "--server-name=ha.example.test",
                          "--server-name=198.18.0.10"])
        policy = render.one("NetworkPolicy", FULLNAME)
        self.assertEqual(policy["spec"]["policyTypes"], ["Ingress", "Egress"])
        node_api_from = policy["spec"]["ingress"][0]["from"]
        operator_labels = render.one("Deployment", FULLNAME)["spec"]["selector"]["matchLabels"]
        self.assertEqual(node_api_from, [{"podSelector": {"matchLabels": operator_labels}},
                                         {"ipBlock": {"cidr": "198.18.10.0/24"}},
                                         {"ipBlock": {"cidr": "2001:db8:10::/64"}},
                                         {"namespaceSelector": {"matchLabels": {
                                             "kubernetes.io/metadata.name": "hapair-system"}}}])
        # Without CIDRs the node API is open to any source (mTLS and tokens guard it).
        open_policy = RENDERS["defaults"].one("NetworkPolicy", FULLNAME)
        self.assertNotIn("from", open_policy["spec"]["ingress"][0])
        self.assertEqual(policy["spec"]["egress"][0]["to"], [{"ipBlock": {"cidr": "198.18.0.1/32"}}])

        render = RENDERS["nodeport-values.yaml"]
        external = render.one("Service", "ha-external")
        self.assertEqual(external["spec"]["type"], "NodePort")
        self.assertEqual(external["spec"]["ports"][0]["nodePort"], 30843)
        self.assertNotIn("loadBalancerSourceRanges", external["spec"])
        args = pod_spec(render.one("Deployment", "ha"))["containers"][0]["args"]
        self.assertIn("--node-api-listen=[::]:8443", args)
        self.assertEqual(render.one("Deployment", "ha")["spec"]["replicas"], 3)

    def test_selectors_and_named_ports_line_up(self) -> None:
        for render in RENDERS.values():
            workloads = render.of_kind("Deployment") + render.of_kind("DaemonSet")
            for workload in workloads:
                labels = workload["spec"]["template"]["metadata"]["labels"]
                self.assertTrue(matches(workload["spec"]["selector"]["matchLabels"], labels))
            for service in render.of_kind("Service"):
                backing = [w for w in workloads
                           if matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
                self.assertEqual(len(backing), 1, f"{render.label}: Service {service['metadata']['name']}")
                port_names = {p["name"] for c in pod_spec(backing[0])["containers"] for p in c["ports"]}
                for port in service["spec"]["ports"]:
                    self.assertIn(port["targetPort"], port_names, f"{render.label}: {service['metadata']['name']}")
            operator_labels = render.of_kind("Deployment")[0]["spec"]["template"]["metadata"]["labels"]
            for pdb in render.of_kind("PodDisruptionBudget"):
                self.assertTrue(matches(pdb["spec"]["selector"]["matchLabels"], operator_labels))
            for policy in render.of_kind("NetworkPolicy"):
                self.assertTrue(matches(policy["spec"]["podSelector"]["matchLabels"], operator_labels))
                for rule in policy["spec"]["ingress"]:
                    for port in rule["ports"]:
                        self.assertIn(port["port"], {"node-api", "metrics"})
            for monitor in render.of_kind("ServiceMonitor"):
                selected = [s for s in render.of_kind("Service")
                            if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
                self.assertEqual(len(selected), 1, f"{render.label}: ServiceMonitor {monitor['metadata']['name']}")
                for endpoint in monitor["spec"]["endpoints"]:
                    self.assertIn(endpoint["port"], {p["name"] for p in selected[0]["spec"]["ports"]})
                    self.assertEqual(endpoint["path"], "/metrics")

    def test_optional_objects(self) -> None:
        expected = {
            # values file: (DaemonSets, ServiceMonitors, NetworkPolicies, PodDisruptionBudgets,
            # ConfigMaps)
            "defaults": (0, 0, 1, 1, 0),
            "default-values.yaml": (0, 0, 1, 1, 0),
            "agents-values.yaml": (1, 0, 1, 1, 0),
            "external-agents-values.yaml": (0, 0, 1, 1, 0),
            "nodeport-values.yaml": (0, 0, 1, 1, 0),
            "monitoring-values.yaml": (1, 2, 1, 1, 1),
        }
        self.assertEqual(sorted(expected), sorted(RENDERS), "every values file needs an expectation here")
        for label, counts in expected.items():
            render = RENDERS[label]
            got = tuple(len(render.of_kind(k))
                        for k in ("DaemonSet", "ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap"))
            self.assertEqual(got, counts, label)
        pdb = RENDERS["defaults"].one("PodDisruptionBudget", FULLNAME)
        self.assertEqual(pdb["spec"]["maxUnavailable"], 1)
        self.assertEqual(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow")


class Dashboard(unittest.TestCase):
    def test_configmap_carries_the_dashboard_for_the_sidecar(self) -> None:
        render = RENDERS["monitoring-values.yaml"]
        config_map = render.one("ConfigMap", f"{FULLNAME}-dashboard")
        self.assertEqual(config_map["metadata"]["namespace"], NAMESPACE)
        self.assertEqual(config_map["metadata"]["labels"]["grafana_dashboard"], "1")
        self.assertEqual(config_map["metadata"]["annotations"], {"grafana_folder": "hapair"})
        committed = json.loads((CHART / "dashboards" / "hapair.json").read_text())
        self.assertEqual(json.loads(config_map["data"]["hapair.json"]), committed)
        self.assertEqual(committed["uid"], "hapair-overview")

    def test_namespace_can_be_grafanas(self) -> None:
        render = Render("dashboard-namespace", {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
        config_map = render.one("ConfigMap", f"{FULLNAME}-dashboard")
        self.assertEqual(config_map["metadata"]["namespace"], "monitoring")


class Agent(unittest.TestCase):
    def daemonset(self, label: str) -> dict[str, Any]:
        return RENDERS[label].one("DaemonSet", f"{FULLNAME}-agent")

    def test_daemonset_follows_the_agent_contract(self) -> None:
        for label, extra_caps, host in (("monitoring-values.yaml", [], "0.0.0.0"),
                                        ("agents-values.yaml", ["SYS_ADMIN"], "127.0.0.1")):
            spec = pod_spec(self.daemonset(label))
            self.assertIs(spec["hostNetwork"], True, label)
            self.assertEqual(spec["dnsPolicy"], "ClusterFirstWithHostNet", label)
            self.assertEqual(spec["priorityClassName"], "system-node-critical", label)
            self.assertIs(spec["automountServiceAccountToken"], False, label)
            self.assertFalse(spec.get("hostPID", False), label)
            container = spec["containers"][0]
            self.assertEqual(container["args"],
                             ["run", "--config", "/etc/hapair/agent.yaml", "--listen", f"{host}:9464"], label)
            sc = container["securityContext"]
            self.assertEqual(sc["capabilities"], {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", *extra_caps]}, label)
            self.assertIs(sc["privileged"], False, label)
            self.assertIs(sc["readOnlyRootFilesystem"], True, label)
            # No privilege escalation, except that SYS_ADMIN makes the setting meaningless.
            self.assertIs(sc["allowPrivilegeEscalation"], bool(extra_caps), label)
            self.assertEqual({p["name"]: p["containerPort"] for p in container["ports"]}, {"endpoints": 9464})
            # Loopback-only endpoints (the default) are probed on loopback: the kubelet shares
            # the host network with the pod. Otherwise on the pod's (the node's) address.
            probe = {"path": "/healthz", "port": "endpoints", **({"host": host} if host == "127.0.0.1" else {})}
            self.assertEqual(container["livenessProbe"]["httpGet"], probe, label)
            self.assertEqual(container["readinessProbe"]["httpGet"], probe, label)
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            self.assertEqual(volumes[mounts["/etc/hapair"]]["hostPath"]["path"], "/etc/hapair")
            self.assertEqual(volumes[mounts["/var/lib/hapair"]]["hostPath"]["path"], "/var/lib/hapair")
            self.assertIn("emptyDir", volumes[mounts["/tmp"]])
            self.assertEqual(spec["nodeSelector"].get("hapair.dev/agent"), "true", label)

    def test_agent_account_has_no_permissions(self) -> None:
        render = RENDERS["agents-values.yaml"]
        account = render.one("ServiceAccount", f"{FULLNAME}-agent")
        self.assertIs(account["automountServiceAccountToken"], False)
        for binding in render.of_kind("ClusterRoleBinding") + render.of_kind("RoleBinding"):
            self.assertNotIn(f"{FULLNAME}-agent", [s["name"] for s in binding["subjects"]])


class Notes(unittest.TestCase):
    def test_notes_explain_enrollment(self) -> None:
        for render in RENDERS.values():
            notes = render.notes
            name = Rbac.fullname(render)
            for needle in ("hapair-agent enroll --controller https://", "--ca-fingerprint",
                           "kubectl hapair token create --node NAME",
                           f"exec deploy/{name} -- hapair-operator token create --node NAME",
                           f"secret {name}-pki", "systemctl enable --now hapair-agent"):
                self.assertIn(needle, notes, f"{render.label}: NOTES.txt lacks {needle!r}")
            self.assertNotIn("<no value>", notes, render.label)
        self.assertIn("kubectl label node NAME hapair.dev/agent=true kubernetes.io/os=linux\n",
                      RENDERS["agents-values.yaml"].notes)
        self.assertIn(f"get service {FULLNAME}-external", RENDERS["external-agents-values.yaml"].notes)
        self.assertIn("service.external.enabled=true", RENDERS["defaults"].notes)


if __name__ == "__main__":
    unittest.main(verbosity=2)
