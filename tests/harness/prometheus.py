"""A private Prometheus (Debian's package, see scripts/install-system-deps.sh) for tests.

    from harness.prometheus import Prometheus
    prom = Prometheus.start(["127.0.0.1:9100"], workdir)   # scrapes every second
    prom.wait_for_target_up(timeout=30)
    prom.query('my_metric{job="test"}')                    # -> the API's data.result list
    prom.stop()

    # Or any scrape configs, e.g. Kubernetes service discovery of a test cluster's pods:
    Prometheus.start([], workdir, scrape_configs=[{"job_name": "pods",
        "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": "admin.kubeconfig"}]}])

Each instance gets its own config, TSDB directory and free loopback port; the system service
the package installs is never used.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness._proc import ManagedProcess, free_port, log_tail, wait_until

SCRAPE_INTERVAL = "1s"


class PrometheusMissing(RuntimeError):
    """The prometheus binary is not installed."""


@dataclass
class Prometheus:
    url: str
    process: ManagedProcess
    job: str = "test"

    @classmethod
    def start(
        cls,
        targets: list[str],
        workdir: Path,
        job: str = "test",
        timeout: float = 30.0,
        scrape_configs: list[dict[str, Any]] | None = None,
    ) -> Prometheus:
        """Scrape ``targets`` (job ``job``), plus ``scrape_configs`` as Prometheus reads them."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusMissing(
                "prometheus is not on PATH; run `bash scripts/install-system-deps.sh` (as root)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        jobs = list(scrape_configs or [])
        if targets:
            jobs.insert(0, {"job_name": job, "static_configs": [{"targets": targets}]})
        config = workdir / "prometheus.yml"
        # JSON is valid YAML.
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": SCRAPE_INTERVAL,
                        "evaluation_interval": SCRAPE_INTERVAL,
                    },
                    "scrape_configs": jobs,
                },
                indent=2,
            )
        )
        port = free_port()
        proc = ManagedProcess(
            "prometheus",
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            workdir / "prometheus.log",
        )
        prom = cls(url=f"http://127.0.0.1:{port}", process=proc, job=job)

        def ready() -> bool:
            proc.check_running()
            with urllib.request.urlopen(prom.url + "/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        try:
            wait_until(ready, timeout=timeout, what="Prometheus /-/ready", interval=0.2)
        except BaseException:
            proc.stop()
            raise
        return prom

    def stop(self) -> None:
        self.process.stop()

    def _api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} failed: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; returns data.result (a list of {metric, value})."""
        data = self._api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._api("targets")["activeTargets"]
        return active

    def wait_for_target_up(self, timeout: float = 30.0) -> None:
        """Wait until every configured target has been scraped successfully."""

        def all_up() -> bool:
            targets = self.targets()
            return bool(targets) and all(t["health"] == "up" for t in targets)

        try:
            wait_until(all_up, timeout=timeout, what="Prometheus targets to be up", interval=0.25)
        except TimeoutError as err:
            raise TimeoutError(
                f"{err}; targets: {self.targets()}\n{log_tail(self.process.log_path)}"
            ) from None
