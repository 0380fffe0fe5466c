#!/usr/bin/env python3
"""Run the dev overlay's pods as local processes, with the configuration they render to.

    smoke.py RENDERED.yaml --bin SPOTLIGHT --work DIR

No cluster here, so this is the closest check that the rendered pods start and work
together: the coordinator, one worker per branch group and the edge agent run with the
args, config file and environment of their pod specs. Only what a cluster provides is
replaced: pod IP and Service names become 127.0.0.1, every container port a free
loopback port, the mounted Secret a fresh `spotlight certs` directory, the image's model
and ONNX Runtime the repository's. Then it checks, failing on the first miss:

- every probe of every pod answers 200 on its port and scheme once the roles are up;
- the coordinator lists each group's worker with that group's segments;
- an edge streams 300 Fashion-MNIST test images: every frame answered, no error;
- SIGTERM stops every process with status 0 within its terminationGracePeriodSeconds.

Run by `scripts/k8s-validate.sh --smoke`. Needs PyYAML.
"""

import argparse
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MODEL_IN_IMAGE = "/opt/spotlight/models/"
SECRETS_IN_POD = "/etc/spotlight/secrets/"
DATASET = Path("/usr/share/datasets/fashion-mnist")
# The image sets ORT_DYLIB_PATH; here: the caller's, else `make onnxruntime`'s.
ORT = os.environ.get("ORT_DYLIB_PATH") or str(ROOT / "build/onnxruntime/libonnxruntime.so")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    """One pod of the render as a local process."""

    def __init__(self, doc, name, coord_port, secrets, work, bin_path):
        self.doc, self.name, self.work = doc, name, work
        spec = doc["spec"]["template"]["spec"]
        self.grace = spec.get("terminationGracePeriodSeconds", 30)
        self.container = spec["containers"][0]
        self.ports = {p["containerPort"]: free_port() for p in self.container.get("ports", [])}
        self.named = {p["name"]: self.ports[p["containerPort"]] for p in self.container.get("ports", [])}
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        fields = {"metadata.name": name, "status.podIP": "127.0.0.1", "spec.nodeName": "smoke-node"}
        env = {"PATH": "/usr/bin:/bin", "ORT_DYLIB_PATH": ORT}
        for e in self.container.get("env", []):
            if "valueFrom" in e:
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
                value = labels.get(m.group(1), "") if m else fields[path]
            else:
                value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
            value = value.replace(SECRETS_IN_POD, f"{secrets}/").replace(MODEL_IN_IMAGE, f"{ROOT}/models/")
            value = re.sub(r"https://spotlight-(coordinator|registry):7000", f"https://127.0.0.1:{coord_port}", value)
            value = re.sub(r"(?:0\.0\.0\.0|127\.0\.0\.1):(\d+)",
                           lambda m: f"127.0.0.1:{self.ports.get(int(m.group(1)), m.group(1))}", value)
            env[e["name"]] = value
        self.env = env
        args = [bin_path] + self.container["args"]
        mounts = {m["mountPath"]: m for m in self.container.get("volumeMounts", [])}
        i = args.index("--config") + 1
        args[i] = str(ROOT / "deploy/k8s/base/config" / mounts[args[i]]["subPath"])
        self.args = args
        self.proc = None

    def start(self, extra_args=(), env=None):
        log = open(self.work / f"{self.name}.log", "w")
        self.proc = subprocess.Popen(self.args + list(extra_args), env=env or self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.work)

    def log_tail(self):
        return (self.work / f"{self.name}.log").read_text()[-1500:]

    def probe(self, kind, ca):
        get = self.container[kind]["httpGet"]
        scheme = get.get("scheme", "HTTP").lower()
        url = f"{scheme}://127.0.0.1:{self.named[get['port']]}{get['path']}"
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False  # the kubelet verifies nothing either
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, context=ctx if scheme == "https" else None, timeout=2) as r:
                return r.status, url
        except urllib.error.HTTPError as e:
            return e.code, url
        except OSError as e:
            return str(e), url


class PortTaken(Exception):
    """A pod exited because a port picked free was bound by another socket first (an
    outgoing connection's ephemeral port can be any free port) before the pod bound it."""


# A start that loses such a race is retried with fresh ports, at most this many times.
START_ATTEMPTS = 3


def exited(pod):
    """Raises if `pod` has exited: PortTaken for a lost port race, else the failure."""
    if pod.proc.poll() is None:
        return
    tail = pod.log_tail()
    if "Address already in use" in tail:
        raise PortTaken(f"{pod.name} exited {pod.proc.returncode}: {tail.strip().splitlines()[-1]}")
    raise SystemExit(f"  FAIL {pod.name} exited {pod.proc.returncode}:\n{tail}")


def stop_all(pods):
    for p in pods:
        if p.proc and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def wait_for(what, fn, seconds):
    deadline = time.monotonic() + seconds
    while True:
        ok, detail = fn()
        if ok:
            return detail
        if time.monotonic() > deadline:
            raise SystemExit(f"  FAIL {what}: {detail}")
        time.sleep(0.25)


def start_probed(make, ca):
    """Starts the pods `make()` returns and waits until every probe of each answers 200, as
    the kubelet would call them. A start that loses a port race is retried with the fresh
    ports of a new `make()`, at most START_ATTEMPTS times; on any failure the pods are
    stopped before the error goes up."""
    for attempt in range(1, START_ATTEMPTS + 1):
        pods = make()
        for p in pods:
            p.start()
        try:
            for p in pods:
                for kind in [k for k in ("livenessProbe", "readinessProbe") if k in p.container]:
                    def check(p=p, kind=kind):
                        for q in pods:
                            exited(q)
                        status, url = p.probe(kind, ca)
                        return status == 200, f"{url} answered {status}"
                    print(f"  ok   {p.name} {kind}: {wait_for(f'{p.name} {kind}', check, 60)}")
            return pods
        except PortTaken as e:
            stop_all(pods)
            if attempt == START_ATTEMPTS:
                raise SystemExit(f"  FAIL {e} ({START_ATTEMPTS} attempts with fresh ports)")
            print(f"  note {e}; starting again on fresh ports ({attempt + 1} of {START_ATTEMPTS})")
        except BaseException:
            stop_all(pods)
            raise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    secrets = work / "secrets"
    subprocess.run([a.bin, "certs", "--out", str(secrets), "--force"], check=True, stdout=subprocess.DEVNULL)
    ca = str(secrets / "ca.pem")

    docs = [d for d in yaml.safe_load_all(Path(a.rendered).read_text()) if d]
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "DaemonSet")}
    component = lambda d: d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
    coord_doc = next(d for d in workloads.values() if component(d) == "coordinator")
    edge_doc = next(d for d in workloads.values() if component(d) == "edge")
    pods = []
    try:
        def cloud():
            # Every pod's ports are picked afresh on each attempt (the workers need the
            # coordinator's).
            coord = Pod(coord_doc, "coordinator", None, secrets, work, a.bin)
            return [coord] + [Pod(d, f"{n}-smoke", coord.ports[7000], secrets, work, a.bin)
                              for n, d in sorted(workloads.items()) if component(d) == "worker"]
        pods = start_probed(cloud, ca)
        coord, workers = pods[0], pods[1:]
        coord_port = coord.ports[7000]
        # Registration: each group's worker hosts that group's segments.
        reader = (secrets / "reader.token").read_text().strip()
        req = urllib.request.Request(f"https://127.0.0.1:{coord.named['http']}/v1/workers",
                                     headers={"Authorization": f"Bearer {reader}"})
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        listed = yaml.safe_load(urllib.request.urlopen(req, context=ctx, timeout=5).read())["workers"]
        for w in workers:
            group = w.env["SPOTLIGHT_WORKER__BRANCHES"]
            seen = [x["segments"] for x in listed if x["worker_id"] == w.name]
            if not seen or not all(s == group or s.startswith(group + ".") for s in seen[0]) or group not in seen[0]:
                raise SystemExit(f"  FAIL worker {w.name} (group {group}) registered {seen}")
            print(f"  ok   {w.name} registered {', '.join(seen[0])}")
        # An edge streams test images through all of it.
        edge = Pod(edge_doc, "edge-smoke", coord_port, secrets, work, a.bin)
        stream_env = {k: v for k, v in edge.env.items() if k != "SPOTLIGHT_EDGE__LISTEN"}
        run = subprocess.run(edge.args + ["--idx-images", str(DATASET / "t10k-images-idx3-ubyte.gz"),
                                          "--idx-labels", str(DATASET / "t10k-labels-idx1-ubyte.gz"),
                                          "--limit", "300"],
                             env=stream_env, cwd=work, capture_output=True, text=True, timeout=120)
        summary = next((l for l in run.stdout.splitlines() if l.startswith("frames ")), "")
        if run.returncode != 0 or not re.search(r"frames 300\s+predictions 300\s+errors 0", summary):
            raise SystemExit(f"  FAIL edge stream (exit {run.returncode}): {summary}\n{run.stderr[-1500:]}")
        print(f"  ok   edge streamed: {summary}")
        # The edge agent as the DaemonSet runs it: local API, probes.
        pods += start_probed(lambda: [Pod(edge_doc, "edge-smoke", coord_port, secrets, work, a.bin)], ca)
        # SIGTERM: everything drains and exits 0 within its grace period.
        for p in reversed(pods):
            p.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for p in pods:
            try:
                code = p.proc.wait(timeout=max(0.0, p.grace - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                raise SystemExit(f"  FAIL {p.name} still running {p.grace} s after SIGTERM")
            if code != 0:
                raise SystemExit(f"  FAIL {p.name} exited {code} after SIGTERM:\n{p.log_tail()}")
        print(f"  ok   SIGTERM: {len(pods)} processes exited 0 in {time.monotonic() - t0:.1f} s")
    finally:
        for p in pods:
            if p.proc and p.proc.poll() is None:
                p.proc.kill()


if __name__ == "__main__":
    main()
