#!/usr/bin/env python3
"""Checks on rendered spotlight manifests that a schema cannot express.

    check.py --model-manifest M --configs DIR --secrets SECRETS.yaml NAME=RENDERED.yaml...

Run by scripts/k8s-validate.sh after the schema validation. Each check that fails prints
one line saying what was expected and what came; the exit status is the number of
failures (capped at 100). Needs PyYAML (kubernetes-validate depends on it).
"""

import argparse
import re
import sys
from pathlib import Path

import yaml

WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
CLUSTER_SCOPED = ("Namespace",)
# Top-level keys and sections of spotlight's Settings (crates/spotlight/src/settings.rs),
# plus [cluster] of the etcd mode.
TOP_KEYS = {"MODEL", "ONNXRUNTIME"}
SECTIONS = {"LOG", "SECURITY", "COORDINATOR", "WORKER", "EDGE", "UP", "CLUSTER"}
SECRETS_DIR = "/etc/spotlight/secrets/"


class Report:
    def __init__(self):
        self.failures = []
        self.warnings = []
        self.checked = 0

    def expect(self, ok, where, message):
        self.checked += 1
        if not ok:
            self.failures.append(f"{where}: {message}")
        return ok

    def warn(self, where, message):
        self.warnings.append(f"{where}: {message}")


def load(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def name_of(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


def pod_spec(doc):
    return doc["spec"]["template"]["spec"]


def pod_labels(doc):
    return doc["spec"]["template"]["metadata"].get("labels", {})


def env_map(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def reference_keys(config_dir):
    """Every `key =` or `# key =` line of the reference files, by section."""
    keys = {}
    for path in Path(config_dir).glob("*.toml"):
        section = ""
        for line in path.read_text().splitlines():
            s = line.strip().lstrip("#").strip()
            m = re.fullmatch(r"\[([a-z_.]+)\]", s)
            if m:
                section = m.group(1).split(".")[0]
                continue
            m = re.match(r"([a-z_]+)\s*=", s)
            if m:
                keys.setdefault(section, set()).add(m.group(1))
    return keys


def drain_ms(container, config_dir, role):
    """The drain timeout a container runs with: its env, else the reference file."""
    env = env_map(container)
    value = env.get(f"SPOTLIGHT_{role.upper()}__DRAIN_TIMEOUT_MS")
    if value is not None:
        return int(value)
    path = Path(config_dir) / f"{role}.toml"
    if path.is_file():
        m = re.search(r"^drain_timeout_ms\s*=\s*(\d+)", path.read_text(), re.M)
        if m:
            return int(m.group(1))
    return 0


def check_workload(r, label, doc, docs, secrets, refs, config_dir):
    where = f"{label} {name_of(doc)}"
    spec = pod_spec(doc)
    r.expect(spec.get("enableServiceLinks") is False, where,
             "enableServiceLinks must be false: injected SPOTLIGHT_*_SERVICE_HOST variables "
             "are unknown config keys and stop the role")
    r.expect(spec.get("automountServiceAccountToken") is False, where,
             "automountServiceAccountToken should be false: no role calls the Kubernetes API")
    psc = spec.get("securityContext", {})
    r.expect(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, where,
             f"pod must run as a non-root uid, got {psc}")
    r.expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where,
             "seccompProfile RuntimeDefault expected")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    grace = spec.get("terminationGracePeriodSeconds", 30)

    for c in spec["containers"]:
        cw = f"{where} container {c['name']}"
        csc = c.get("securityContext", {})
        r.expect(csc.get("allowPrivilegeEscalation") is False, cw, "allowPrivilegeEscalation must be false")
        r.expect(csc.get("readOnlyRootFilesystem") is True, cw, "readOnlyRootFilesystem must be true")
        r.expect(csc.get("capabilities", {}).get("drop") == ["ALL"], cw, "capabilities must drop ALL")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for what in ("cpu", "memory"):
                r.expect(what in res.get(kind, {}), cw, f"resources.{kind}.{what} missing")
        ports = {p["name"]: p for p in c.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe"):
            r.expect(probe in c, cw, f"{probe} missing")
            port = c.get(probe, {}).get("httpGet", c.get(probe, {}).get("tcpSocket", {})).get("port")
            if isinstance(port, str):
                r.expect(port in ports, cw, f"{probe} names port {port!r}; ports: {sorted(ports)}")

        args = c.get("args", [])
        if c.get("command", [""])[0].endswith("/spotlight") and args:
            role = args[0]
            env = env_map(c)
            # Probes: liveness /livez, readiness /readyz, HTTPS where the role serves TLS.
            for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
                got = c.get(probe, {}).get("httpGet", {})
                r.expect(got.get("path") == path, cw, f"{probe} should GET {path}, got {got.get('path')}")
                want = "HTTP" if role == "edge" else "HTTPS"
                r.expect(got.get("scheme", "HTTP") == want, cw,
                         f"{probe} scheme should be {want} ({role} HTTP port), got {got.get('scheme', 'HTTP')}")
            # Grace period: longer than the drain, plus any preStop sleep.
            pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            need = drain_ms(c, config_dir, role) / 1000 + pre
            r.expect(grace > need, cw,
                     f"terminationGracePeriodSeconds {grace} must exceed preStop {pre} s + drain {need - pre:g} s")
            # --config points at a mounted ConfigMap key.
            if "--config" in args:
                path = args[args.index("--config") + 1]
                mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == path), None)
                ok = r.expect(mount is not None, cw, f"--config {path} is not mounted")
                if ok:
                    cm_name = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
                    cm = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name), None)
                    r.expect(cm is not None and mount.get("subPath") in cm.get("data", {}), cw,
                             f"--config {path}: ConfigMap {cm_name} has no key {mount.get('subPath')}")
            # SPOTLIGHT_* variables: SPOTLIGHT_<TOPKEY> or SPOTLIGHT_<SECTION>__<KEY>.
            for name in env:
                if not name.startswith("SPOTLIGHT_"):
                    continue
                rest = name[len("SPOTLIGHT_"):]
                if "__" not in rest:
                    r.expect(rest in TOP_KEYS, cw, f"{name}: not a top-level key ({sorted(TOP_KEYS)}); "
                             "sections need a double underscore, SPOTLIGHT_<SECTION>__<KEY>")
                    continue
                section, key = rest.split("__", 1)
                if r.expect(section in SECTIONS, cw, f"{name}: unknown section {section.lower()}"):
                    if key.lower() not in refs.get(section.lower(), set()):
                        r.warn(role, f"{name}: key {section.lower()}.{key.lower()} is not in any configs/*.toml")
            # Files under the secrets mount exist in the Secret mounted there.
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == SECRETS_DIR.rstrip("/")), None)
            wanted = {v[len(SECRETS_DIR):] for v in env.values() if v and v.startswith(SECRETS_DIR)}
            if wanted:
                if r.expect(mount is not None, cw, f"uses {sorted(wanted)} but mounts nothing at {SECRETS_DIR}"):
                    sname = volumes.get(mount["name"], {}).get("secret", {}).get("secretName")
                    have = secrets.get(sname)
                    if r.expect(have is not None, cw, f"Secret {sname} is not made by create-secrets.sh"):
                        r.expect(wanted <= have, cw, f"Secret {sname} lacks {sorted(wanted - have)}")
            # A worker advertises an address the coordinator can dial: its pod IP, https.
            if role == "worker":
                adv = env.get("SPOTLIGHT_WORKER__ADVERTISE", "")
                r.expect(adv.startswith("https://$(POD_IP):"), cw,
                         f"worker should advertise https://$(POD_IP):PORT, got {adv!r}")
                names = [e["name"] for e in c["env"]]
                if "POD_IP" in names and "SPOTLIGHT_WORKER__ADVERTISE" in names:
                    r.expect(names.index("POD_IP") < names.index("SPOTLIGHT_WORKER__ADVERTISE"), cw,
                             "POD_IP must be defined before SPOTLIGHT_WORKER__ADVERTISE refers to it")


def check_render(r, label, docs, manifest, secrets, refs, config_dir):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for w in workloads:
        check_workload(r, label, w, docs, secrets, refs, config_dir)

    # One worker Deployment per top-level branch of the model package.
    top = sorted(s["id"] for s in manifest["segments"] if s.get("parent") is None)
    workers = [d for d in by_kind.get("Deployment", []) if pod_labels(d).get("app.kubernetes.io/component") == "worker"]
    groups = sorted(pod_labels(d).get("spotlight.dev/branch-group", "") for d in workers)
    r.expect(groups == top, label, f"worker groups {groups} must equal the top-level branches {top}")
    for w in workers:
        where = f"{label} {name_of(w)}"
        r.expect("replicas" not in w["spec"], where, "replicas set: the autoscaler owns the count")
        fields = [e for e in pod_spec(w)["containers"][0]["env"] if e["name"] == "SPOTLIGHT_WORKER__BRANCHES"]
        r.expect(bool(fields) and fields[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                 == "metadata.labels['spotlight.dev/branch-group']", where,
                 "SPOTLIGHT_WORKER__BRANCHES should come from the branch-group label")
        hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", [])
                if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
                and h["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]]
        if r.expect(len(hpas) == 1, where, f"expected one HorizontalPodAutoscaler, found {len(hpas)}"):
            h = hpas[0]["spec"]
            r.expect(1 <= h.get("minReplicas", 1) <= h["maxReplicas"], where,
                     f"autoscaler bounds {h.get('minReplicas')}..{h['maxReplicas']}")
            r.expect(any(m.get("resource", {}).get("name") == "cpu" for m in h.get("metrics", [])), where,
                     "autoscaler should scale on CPU")
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
                if matches(p["spec"]["selector"].get("matchLabels"), pod_labels(w))]
        r.expect(len(pdbs) == 1, where, f"expected one PodDisruptionBudget selecting its pods, found {len(pdbs)}")

    # Every Service selects pods and its named target ports exist with that protocol.
    for s in by_kind.get("Service", []):
        where = f"{label} {name_of(s)}"
        pods = [w for w in workloads if matches(s["spec"].get("selector"), pod_labels(w))]
        if r.expect(bool(pods), where, f"selector {s['spec'].get('selector')} matches no pods"):
            for p in s["spec"]["ports"]:
                tp = p.get("targetPort")
                if isinstance(tp, str):
                    have = {(cp["name"], cp.get("protocol", "TCP")) for w in pods
                            for c in pod_spec(w)["containers"] for cp in c.get("ports", [])}
                    r.expect((tp, p.get("protocol", "TCP")) in have, where,
                             f"targetPort {tp}/{p.get('protocol', 'TCP')} is no container port of its pods")

    # State: several coordinators need etcd; a state file serves one coordinator only.
    for c in [d for d in by_kind.get("Deployment", []) if pod_labels(d).get("app.kubernetes.io/component") == "coordinator"]:
        where = f"{label} {name_of(c)}"
        env = env_map(pod_spec(c)["containers"][0])
        replicas = c["spec"].get("replicas", 1)
        etcd = env.get("SPOTLIGHT_CLUSTER__ETCD")
        if replicas > 1:
            r.expect(bool(etcd), where, f"{replicas} replicas without SPOTLIGHT_CLUSTER__ETCD would each keep their own task")
            r.expect("SPOTLIGHT_COORDINATOR__STATE_FILE" not in env, where, "a state file with several replicas")
        if "SPOTLIGHT_COORDINATOR__STATE_FILE" in env:
            state = Path(env["SPOTLIGHT_COORDINATOR__STATE_FILE"]).parent.as_posix()
            mounts = pod_spec(c)["containers"][0].get("volumeMounts", [])
            vols = {v["name"]: v for v in pod_spec(c).get("volumes", [])}
            m = next((m for m in mounts if m["mountPath"] == state), None)
            r.expect(m is not None and "persistentVolumeClaim" in vols.get(m["name"], {}), where,
                     f"state file directory {state} should be a PersistentVolumeClaim")
            r.expect(c["spec"].get("strategy", {}).get("type") == "Recreate", where,
                     "a ReadWriteOnce state volume needs strategy Recreate")
        if etcd:
            sts = {d["metadata"]["name"]: d for d in by_kind.get("StatefulSet", [])}
            for url in etcd.split(","):
                m = re.fullmatch(r"http://([a-z0-9-]+)-(\d+)\.([a-z0-9-]+):2379", url)
                ok = r.expect(m is not None, where, f"etcd endpoint {url!r} is not http://MEMBER-N.SERVICE:2379")
                if ok:
                    s = sts.get(m.group(1))
                    r.expect(s is not None and int(m.group(2)) < s["spec"]["replicas"]
                             and s["spec"]["serviceName"] == m.group(3), where,
                             f"etcd endpoint {url} names no member of a StatefulSet here")
            for s in sts.values():
                n = s["spec"]["replicas"]
                r.expect(n >= 3 and n % 2 == 1, f"{label} {name_of(s)}", f"etcd members should be an odd number >= 3, got {n}")
                r.expect("--initial-cluster=" in " ".join(pod_spec(s)["containers"][0]["args"])
                         and all(f"{s['metadata']['name']}-{i}=" in " ".join(pod_spec(s)["containers"][0]["args"]) for i in range(n)),
                         f"{label} {name_of(s)}", "--initial-cluster must list every member")

    # Overlays: every namespaced object lands in the overlay's namespace.
    namespaces = [d["metadata"]["name"] for d in by_kind.get("Namespace", [])]
    if namespaces:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                r.expect(d["metadata"].get("namespace") == namespaces[0], f"{label} {name_of(d)}",
                         f"namespace {d['metadata'].get('namespace')!r}, expected {namespaces[0]!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-manifest", required=True)
    ap.add_argument("--configs", required=True)
    ap.add_argument("--secrets", required=True)
    ap.add_argument("renders", nargs="+", help="NAME=RENDERED.yaml")
    a = ap.parse_args()
    manifest = yaml.safe_load(Path(a.model_manifest).read_text())
    secrets = {d["metadata"]["name"]: set(d.get("data", {})) for d in load(a.secrets) if d["kind"] == "Secret"}
    refs = reference_keys(a.configs)
    r = Report()
    for spec in a.renders:
        label, path = spec.split("=", 1)
        check_render(r, label, load(path), manifest, secrets, refs, a.configs)
    for w in sorted(set(r.warnings)):
        print(f"  warning: {w}")
    for f in r.failures:
        print(f"  FAIL {f}")
    print(f"  {r.checked} checks, {len(r.failures)} failed, {len(set(r.warnings))} warnings")
    sys.exit(min(len(r.failures), 100))


if __name__ == "__main__":
    main()
