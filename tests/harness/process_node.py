"""The process node: a Node with no container runtime, that runs its pods as local processes.

    python -m harness.process_node --kubeconfig admin.kubeconfig [--name process-node] \
        [--cpu 8 --memory 32Gi --pods 110 --gpus 2] [--root-dir DIR] \
        [--tls-cert-file kubelet.crt --tls-private-key-file kubelet.key]

It registers a Node (capacity and allocatable as given, nvidia.com/gpu included, Ready, address
127.0.0.1), renews its Lease in kube-node-lease, watches the pods bound to it and runs each with
harness.pod_runner: every container's command+args as a process group on this host, with the
host's PATH (the image is ignored). Volumes live in a per-pod sandbox and mount paths are
rewritten in command, args, env and workingDir (rules in harness.pod_spec).

Logs: each container attempt writes <root-dir>/pods/<uid>/containers/<name>/logs/<n>.log, and
the node serves the kubelet endpoint GET /containerLogs/{ns}/{pod}/{container} (follow,
tailLines, previous, limitBytes) over HTTPS on 127.0.0.1, so `kubectl logs` works when the API
server trusts the serving cert (--kubelet-certificate-authority). Without --tls-cert-file it uses
a self-signed cert. The endpoint does not check who calls it: loopback, tests only.
"""

from __future__ import annotations

import argparse
import http.server
import json
import signal
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from harness import pki, pod_spec
from harness._proc import free_port
from harness.pod_runner import PodRunner, now_rfc3339

LEASE_SECONDS = 40
RENEW_EVERY = 10.0


class ProcessNode:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        name: str,
        capacity: Mapping[str, str],
        root_dir: Path,
        tls: pki.CertPair,
        passthrough_env: tuple[str, ...] = (),
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.name = name
        self.capacity = dict(capacity)
        self.root_dir = root_dir.resolve()
        self.tls = tls
        self.passthrough_env = passthrough_env
        self.runners: dict[str, PodRunner] = {}  # pod uid -> runner
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.lookup = pod_spec.Lookup(config_map=self._config_map, secret=self._secret)
        # No kube-proxy: in-cluster clients reach the API server at its real address.
        api_url = urllib.parse.urlsplit(api.configuration.host)
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": api_url.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(api_url.port or 443),
        }

    def log(self, message: str) -> None:
        print(f"{now_rfc3339()} process-node {self.name}: {message}", flush=True)

    # -- API helpers used by the runners -----------------------------------------------

    def _config_map(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        try:
            obj = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return pod_spec.encode_config_map(obj.data, obj.binary_data)

    def _secret(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        try:
            obj = self.core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return pod_spec.decode_secret(obj.data)

    def request_token(self, pod: pod_spec.Pod, source: Mapping[str, Any]) -> str:
        """A bound service-account token, as the kubelet gets for projected token volumes."""
        meta = pod["metadata"]
        spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        # A plain dict is serialized as-is; the client's typings only know the model classes.
        body = cast(Any, {"spec": spec})
        result = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"), meta["namespace"], body
        )
        assert result.status is not None
        return str(result.status.token)

    def patch_pod_status(self, pod: pod_spec.Pod, status: dict[str, Any]) -> None:
        """Write a pod's status, retrying while the API server is unreachable or failing.

        Like the kubelet's status manager: a status is never dropped because the API server
        restarted, or a finished pod would stay Running forever. Gives up on a client error
        (a deleted pod: 404) and when the node stops.
        """
        meta = pod["metadata"]
        delay = 0.5
        while True:
            try:
                self.core.patch_namespaced_pod_status(
                    meta["name"], meta["namespace"], {"status": status}
                )
                return
            except ApiException as err:
                if err.status is not None and 400 <= err.status < 500 and err.status != 429:
                    if err.status != 404:  # a pod deleted meanwhile has no status left to write
                        self.log(
                            f"status of {meta['namespace']}/{meta['name']}: "
                            f"{err.status} {err.reason}: {err.body}"
                        )
                    return
                problem = f"{err.status} {err.reason}"
            except Exception as err:  # connection refused/reset while the API server is down
                problem = repr(err)
            self.log(f"status of {meta['namespace']}/{meta['name']}: {problem}; retrying")
            if self.stopping.wait(delay):
                return
            delay = min(delay * 2, 5.0)

    def delete_pod_now(self, pod: pod_spec.Pod) -> None:
        meta = pod["metadata"]
        body = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
        )
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    # -- node registration and heartbeats ------------------------------------------------

    def register(self, log_port: int) -> None:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubetune.io/process-node": "true",
        }
        try:
            self.core.create_node(
                client.V1Node(metadata=client.V1ObjectMeta(name=self.name, labels=labels))
            )
        except ApiException as err:
            if err.status != 409:
                raise
        meta = self.core.read_node(self.name).metadata
        assert meta is not None
        self.node_uid = meta.uid
        self.log_port = log_port
        self._update_node_status()

    def _update_node_status(self) -> None:
        now = now_rfc3339()
        healthy = [
            ("Ready", "True", "KubeletReady", "process node is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": m,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s, r, m in healthy
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "process-node",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": "v0.0.0-process-node",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.core.patch_node_status(self.name, {"status": status})

    def _renew_lease(self) -> None:
        micro_now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS}
        try:
            self.coordination.patch_namespaced_lease(
                self.name, "kube-node-lease", {"spec": {**spec, "renewTime": micro_now}}
            )
            return
        except ApiException as err:
            if err.status != 404:
                raise
        # Created without renewTime: the client would turn it into a datetime and drop the
        # microseconds the API insists on; the patch above sets it from the next beat on.
        owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.node_uid}
        meta = {"name": self.name, "namespace": "kube-node-lease", "ownerReferences": [owner]}
        body = {"metadata": meta, "spec": spec}
        self.coordination.create_namespaced_lease("kube-node-lease", cast(Any, body))
        self._renew_lease()

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self.stopping.is_set():
            try:
                self._renew_lease()
                if beats % 6 == 0:  # the Lease is the heartbeat; status every minute is plenty
                    self._update_node_status()
                beats += 1
            except Exception as err:
                self.log(f"heartbeat failed: {err!r} {getattr(err, 'body', '')}")
            self.stopping.wait(RENEW_EVERY)

    # -- pods ----------------------------------------------------------------------------

    def _handle(self, kind: str, pod: pod_spec.Pod) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            runner = self.runners.get(uid)
            if kind == "DELETED":
                if runner is not None:
                    runner.deleted()
                    del self.runners[uid]
                return
            if runner is not None:
                runner.update(pod)
                return
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                # Finished before this node started (or on an earlier node process): nothing runs.
                if pod["metadata"].get("deletionTimestamp"):
                    self.delete_pod_now(pod)
                return
            runner = PodRunner(self, pod)
            self.runners[uid] = runner
        runner.start()

    def _watch_pods(self) -> None:
        selector = f"spec.nodeName={self.name}"
        while not self.stopping.is_set():
            try:
                listing: Any = self.core.list_pod_for_all_namespaces(
                    field_selector=selector, _preload_content=False
                )
                body = json.loads(listing.data)
                seen = {item["metadata"]["uid"] for item in body["items"]}
                for item in body["items"]:
                    self._handle("ADDED", item)
                with self.lock:  # deleted while we were not watching
                    vanished = [uid for uid in self.runners if uid not in seen]
                for uid in vanished:
                    self._handle("DELETED", self.runners[uid].pod)
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=body["metadata"]["resourceVersion"],
                    timeout_seconds=300,
                )
                for event in stream:
                    if self.stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._handle(event["type"], event["raw_object"])
            except Exception as err:
                if not self.stopping.is_set():
                    self.log(f"pod watch restarting: {err!r}")
                    time.sleep(1)

    def run(self) -> None:
        """Register, then serve logs, heartbeat and run pods until `stop()`."""
        server = _LogServer(self)
        self.register(server.port)
        self.log(f"registered; logs on https://127.0.0.1:{server.port}; pods under {self.root_dir}")
        threading.Thread(target=server.serve_forever, daemon=True, name="logs").start()
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        try:
            self._watch_pods()
        finally:
            server.shutdown()

    def stop(self) -> None:
        """Stop watching and kill every pod's processes (pods are left for the API to judge)."""
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.gone = True  # report nothing more: the node is going away
            # Short grace: whoever stops the node will not wait a pod's 30s for it.
            runner.kill_all(grace=1.0)

    def runner_for(self, namespace: str, name: str) -> PodRunner | None:
        with self.lock:
            matches = [
                r for r in self.runners.values() if (r.namespace, r.name) == (namespace, name)
            ]
        return matches[-1] if matches else None


class _LogServer(http.server.ThreadingHTTPServer):
    """The kubelet's /containerLogs endpoint, enough for `kubectl logs [-f] [--tail] [-p]`."""

    daemon_threads = True

    def __init__(self, node: ProcessNode) -> None:
        self.node = node
        super().__init__(("127.0.0.1", free_port()), _LogHandler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(node.tls.cert), str(node.tls.key))
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.port: int = self.server_address[1]


class _LogHandler(http.server.BaseHTTPRequestHandler):
    server: _LogServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = urllib.parse.parse_qs(url.query)
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.send_error(404, "only /containerLogs/{namespace}/{pod}/{container} is served")
            return
        runner = self.server.node.runner_for(parts[1], parts[2])
        run = runner.find(parts[3]) if runner else None
        if runner is None or run is None:
            self.send_error(
                404, f"container {parts[3]} of pod {parts[1]}/{parts[2]} not found on this node"
            )
            return
        previous = query.get("previous", ["false"])[0] == "true"
        path = run.log_path(run.restart_count - 1 if previous else None)
        if not path.exists():
            self.send_error(
                400,
                f'previous terminated container "{run.name}" not found'
                if previous
                else "no logs yet",
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        data = path.read_bytes()
        if "tailLines" in query:
            lines = data.splitlines(keepends=True)
            data = (
                b"".join(lines[-int(query["tailLines"][0]) :])
                if int(query["tailLines"][0])
                else b""
            )
        limit = int(query["limitBytes"][0]) if "limitBytes" in query else None
        self.wfile.write(data[:limit])
        if query.get("follow", ["false"])[0] != "true" or previous:
            return
        offset = path.stat().st_size
        # Follow until this attempt's process is gone and the file is drained.
        with open(path, "rb") as log:
            log.seek(offset)
            while True:
                chunk = log.read(65536)
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    continue
                if run.popen is None or run.popen.poll() is not None or runner.gone:
                    return
                time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--name", default="process-node")
    parser.add_argument("--cpu", default="8")
    parser.add_argument("--memory", default="32Gi")
    parser.add_argument("--pods", default="110")
    parser.add_argument("--gpus", default="2", help="nvidia.com/gpu capacity (0 to leave it out)")
    parser.add_argument("--root-dir", type=Path, help="pod sandboxes (default: a new temp dir)")
    parser.add_argument("--tls-cert-file", type=Path, help="serving cert of the log endpoint")
    parser.add_argument("--tls-private-key-file", type=Path)
    parser.add_argument(
        "--pass-env", action="append", default=[], help="extra host env var for pods"
    )
    args = parser.parse_args(argv)

    root = args.root_dir or Path(tempfile.mkdtemp(prefix=f"{args.name}-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.tls_cert_file and args.tls_private_key_file:
        tls = pki.CertPair(args.tls_cert_file, args.tls_private_key_file)
    else:
        tls = pki.self_signed_serving_cert(root / "pki")
    capacity = {"cpu": args.cpu, "memory": args.memory, "pods": args.pods}
    if args.gpus != "0":
        capacity["nvidia.com/gpu"] = args.gpus
    api = config.new_client_from_config(config_file=args.kubeconfig)
    node = ProcessNode(
        api,
        name=args.name,
        capacity=capacity,
        root_dir=root,
        tls=tls,
        passthrough_env=tuple(args.pass_env),
    )

    def on_signal(signum: int, _frame: object) -> None:
        node.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
