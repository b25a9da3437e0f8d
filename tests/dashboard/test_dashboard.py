#!/usr/bin/env python3
"""Checks that the Grafana dashboard (charts/hapair/dashboards/hapair.json) and the docs
use only metrics the daemons really export. Run by scripts/test-dashboard.sh.

- The controller's metrics come from a real `hapair-operator standalone`, started in its own
  network and PID namespaces and driven until every metric family has a sample (a refused
  manifest, an enrollment, a witness request), then scraped at /metrics.
- The agent's metrics come from the agent crate's code: every `register(...)` /
  `register_with_unit(...)` on a prometheus-client Registry under node-agent/src, with the
  registry's prefix and the metric's type (counters are exported with `_total`). The same
  reader applied to the operator's code must find every family the live scrape shows, with
  the same type, which keeps the reader honest.

Every metric name in every PromQL expression of the dashboard (panel targets and template
queries) must be one of those names; so must every `hapair_agent_*` / `hapair_controller_*`
name mentioned in README.md and docs/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "hapair" / "dashboards" / "hapair.json"
DEBUG = REPO / "target" / "debug"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "inf", "nan", "Inf", "NaN"}
UNITS = {"Seconds": "seconds", "Bytes": "bytes", "Joules": "joules", "Meters": "meters", "Grams": "grams",
         "Ratios": "ratios", "Volts": "volts", "Amperes": "amperes", "Celsius": "celsius"}
KINDS = ("Counter", "Gauge", "Histogram", "Info")


# ----------------------------------------------------------------------------------------
# PromQL


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and Grafana
    variables left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    names: set[str] = set()
    # label_values(metric, label) and query_result(expr) are Grafana's template functions:
    # only the first argument is PromQL.
    for m in re.finditer(r"\blabel_values\(\s*([^,)]*(?:\{[^}]*\})?)\s*(?:,\s*\w+\s*)?\)", s):
        names |= metric_names(m.group(1))
    s = re.sub(r"\blabel_values\([^)]*\)", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # an exponent or a unit suffix of a number
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and query-type template variable."""
    found: list[tuple[str, str]] = []

    def panels(items: list[dict]) -> None:
        for panel in items:
            for target in panel.get("targets", []):
                if "expr" in target:
                    found.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
            panels(panel.get("panels", []))

    panels(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else query or ""
            found.append((f"variable {variable.get('name')!r}", text))
    return found


# ----------------------------------------------------------------------------------------
# Reading the registrations from the code


def registered_families(src: Path) -> dict[str, tuple[str, str]]:
    """family name (prefix + name + unit) -> (kind, file:line), from the Rust sources."""
    families: dict[str, tuple[str, str]] = {}
    for path in sorted(src.rglob("*.rs")):
        text = path.read_text()
        if ".register" not in text:
            continue
        prefixes = re.findall(r'Registry::with_prefix\(\s*"([^"]+)"\s*\)', text)
        for m in re.finditer(r'\.register(_with_unit)?\(\s*"([^"]+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*'
                             r"(?:Unit::(\w+)\s*,\s*)?([^;]*?)\)\s*;", text, re.S):
            where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
            if len(prefixes) != 1:
                raise AssertionError(f"{where}: expected one Registry::with_prefix in the file, found {prefixes}")
            name = f"{prefixes[0]}_{m.group(2)}"
            if m.group(1):
                unit = UNITS.get(m.group(3) or "")
                if unit is None:
                    raise AssertionError(f"{where}: unit {m.group(3)!r} is not known to this check")
                name = f"{name}_{unit}"
            families[name] = (metric_kind(text, m.group(4).strip().rstrip(",").strip(), where), where)
    return families


def metric_kind(text: str, argument: str, where: str) -> str:
    """Counter/Gauge/Histogram/Info of the metric passed to register: a type named in the
    argument itself, or in the declaration of the variable or field it clones."""
    declared = argument
    ident = re.match(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)\.clone\(\)$", argument) or \
        re.match(r"^(?:Box::new\()?([A-Za-z_]\w*)\)?$", argument)
    if not any(k in argument for k in KINDS) and ident:
        name = ident.group(1)
        decl = re.search(rf"\blet\s+(?:mut\s+)?{name}\s*(?::\s*([^=]+))?=\s*([^;]+);", text) or \
            re.search(rf"^\s*(?:pub(?:\([^)]*\))?\s+)?{name}\s*:\s*([^\n]+?),?\s*$", text, re.M)
        if decl:
            declared = " ".join(g for g in decl.groups() if g)
    for kind in ("Histogram", "Counter", "Info", "Gauge"):
        if re.search(rf"\b{kind}\b", declared):
            return kind.lower()
    raise AssertionError(f"{where}: cannot tell the type of {argument!r}; name the type in its declaration")


def sample_names(family: str, kind: str) -> set[str]:
    return {
        "counter": {f"{family}_total"},
        "gauge": {family},
        "histogram": {f"{family}_bucket", f"{family}_sum", f"{family}_count"},
        "info": {f"{family}_info"},
    }[kind]


# ----------------------------------------------------------------------------------------
# The live controller

DRIVE_CONTROLLER = textwrap.dedent("""\
    set -euo pipefail
    ip link set lo up
    d="$1"
    mkdir -p "$d/manifests"
    cat > "$d/manifests/g.yaml" <<'EOF'
    apiVersion: hapair.dev/v1alpha1
    kind: HaGroup
    metadata: {name: g}
    spec:
      nodes:
        - {name: a, heartbeatAddresses: [198.18.1.1]}
        - {name: b, heartbeatAddresses: [198.18.1.2]}
    EOF
    # A refused manifest: errors_total{category="manifest"}.
    cat > "$d/manifests/bad.yaml" <<'EOF'
    apiVersion: hapair.dev/v1alpha1
    kind: HaGroup
    metadata: {name: bad}
    spec:
      nodes:
        - {name: a, heartbeatAddresses: [198.18.2.1]}
    EOF
    "$BIN/hapair-operator" standalone --manifests "$d/manifests" --state "$d/state" \\
        --listen 127.0.0.1:7443 >"$d/controller.log" 2>&1 &
    for _ in $(seq 100); do
        curl -sf --cacert "$d/state/ca.crt" https://127.0.0.1:7443/healthz >/dev/null 2>&1 && break
        sleep 0.1
    done
    out=$("$BIN/hapair-operator" token create --state "$d/state" --node a)
    token=$(awk '/^token:/ {print $2}' <<<"$out")
    fp=$(awk '/^ca fingerprint:/ {print $3}' <<<"$out")
    # An enrollment: enrollments_total.
    "$BIN/hapair-agent" enroll --controller https://127.0.0.1:7443 --node a --token "$token" \\
        --ca-fingerprint "$fp" --dir "$d/a" >/dev/null
    # A witness request: witness_decisions_total.
    curl -sS --cacert "$d/a/ca.crt" --cert "$d/a/node.crt" --key "$d/a/node.key" \\
        -H 'content-type: application/json' \\
        -d '{"group":"default/g","node":"a","op":"acquire","epoch":1,"ttlMs":800}' \\
        https://127.0.0.1:7443/v1/witness/lease >/dev/null
    curl -sS --cacert "$d/state/ca.crt" https://127.0.0.1:7443/metrics
    """)


def scrape_controller() -> str:
    with tempfile.TemporaryDirectory(prefix="hapair-dashboard-test-") as tmp:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BIN": str(DEBUG)}
        proc = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--kill-child", "bash", "-c", DRIVE_CONTROLLER, "drive", tmp],
            capture_output=True, text=True, timeout=60, env=env)
        if proc.returncode != 0:
            log = Path(tmp, "controller.log")
            raise AssertionError(f"driving the controller failed ({proc.returncode}):\n{proc.stderr}\n"
                                 f"controller log:\n{log.read_text() if log.exists() else '(none)'}")
        return proc.stdout


def parse_exposition(text: str) -> tuple[dict[str, str], set[str]]:
    """(family -> type from `# TYPE`, sample names) of an OpenMetrics text."""
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    samples = {m.group(1) for m in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{|\s)", text, re.M)}
    return families, samples


# ----------------------------------------------------------------------------------------


class PromQL(unittest.TestCase):
    def test_names_are_extracted_and_everything_else_ignored(self) -> None:
        cases = {
            'sum by (phase) (hapair_controller_groups{phase=~"Down|SplitBrain"})': {"hapair_controller_groups"},
            "rate(a_total[5m]) / ignoring(x) group_left(y) b offset 1h > 1e3": {"a_total", "b"},
            'max by (group, node, role) (hapair_agent_role{group=~"$group"}) == 1': {"hapair_agent_role"},
            "sum(rate(x_total[$__rate_interval])) without (instance) and on(g) y": {"x_total", "y"},
            "label_values(hapair_agent_role, group)": {"hapair_agent_role"},
            'histogram_quantile(0.99, sum by (le) (rate(d_bucket{a="b(c)"}[5m])))': {"d_bucket"},
        }
        for expr, expected in cases.items():
            self.assertEqual(metric_names(expr), expected, expr)


class Metrics(unittest.TestCase):
    scraped_families: dict[str, str]
    scraped_samples: set[str]
    agent: dict[str, tuple[str, str]]
    known: set[str]

    @classmethod
    def setUpClass(cls) -> None:
        cls.scraped_families, cls.scraped_samples = parse_exposition(scrape_controller())
        cls.agent = registered_families(REPO / "node-agent" / "src")
        cls.known = set(cls.scraped_samples)
        for family, (kind, _) in cls.agent.items():
            cls.known |= sample_names(family, kind)
        print(f"\n  controller (scraped): {len(cls.scraped_families)} families; agent (code): "
              f"{len(cls.agent)} families", file=sys.stderr)

    def test_the_scrape_has_every_family_of_the_controller_code(self) -> None:
        # Also proves the code reader: it must see what the real encoder exported, typed alike.
        in_code = registered_families(REPO / "operator" / "src")
        # Written only by Kubernetes mode (API writes), which cannot run here; the family
        # stays empty in the standalone controller, and empty families are not exported.
        kubernetes_only = {"hapair_controller_kube_writes"}
        self.assertEqual({f: k for f, (k, _) in in_code.items() if f not in kubernetes_only},
                         self.scraped_families,
                         "the families in operator/src (left) and in the live scrape (right) differ")

    def test_agent_families_are_read_from_the_code(self) -> None:
        self.assertIn("hapair_agent_role", self.agent)
        self.assertEqual(self.agent["hapair_agent_failovers"][0], "counter")
        for family, (kind, where) in self.agent.items():
            self.assertTrue(family.startswith("hapair_agent_"), f"{where}: {family}")

    def test_dashboard_uses_only_exported_metrics(self) -> None:
        dashboard = json.loads(DASHBOARD.read_text())
        expressions = dashboard_expressions(dashboard)
        self.assertGreater(len(expressions), 10)
        unknown = []
        used: set[str] = set()
        for where, expr in expressions:
            names = metric_names(expr)
            if not names:
                unknown.append(f"{where}: no metric in {expr!r}")
            for name in names:
                used.add(name)
                if name not in self.known:
                    unknown.append(f"{where}: {name} is not exported (in {expr!r})")
        if unknown:
            self.fail("\n".join(unknown))
        unused = sorted(n for n in self.known if n not in used)
        if unused:
            print(f"\n  exported but not on the dashboard: {', '.join(unused)}", file=sys.stderr)

    def test_docs_name_only_exported_metrics(self) -> None:
        families = set(self.scraped_families) | set(self.agent)
        unknown = []
        for path in DOCS:
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                for m in re.finditer(r"\bhapair_(?:agent|controller)_[a-z0-9_]+", line):
                    if m.group(0) not in self.known and m.group(0) not in families:
                        unknown.append(f"{path.relative_to(REPO)}:{lineno}: {m.group(0)}")
        if unknown:
            self.fail("metrics named in the docs that nothing exports:\n" + "\n".join(unknown))


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("test_dashboard.py: run as root (the controller runs in its own network namespace)")
    for binary in ("hapair-operator", "hapair-agent"):
        if not os.access(DEBUG / binary, os.X_OK):
            sys.exit(f"test_dashboard.py: target/debug/{binary} missing; build it first (cargo build)")
    unittest.main(verbosity=2)
