"""A real Prometheus for the tests: deploy/prometheus.yml and its rules, pointed at a test server and scraping
every second, on a free port with its own storage."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from instructd.client.local import free_port

DEPLOY = Path(__file__).parents[2] / "deploy"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
NOT_INSTALLED = ("Prometheus is not installed: scripts/install.sh installs Debian's package where it runs as root "
                 "with apt-get")


class Prometheus:
    """`prometheus` scraping `target` (host:port of a /metrics page) with deploy/'s job and rules."""

    def __init__(self, root: Path, target: str) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
        [job] = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        """Starts Prometheus and waits for its first scrape of the target, so that all that happens after this
        shows as an increase (its targets reach the scraper some seconds after it is ready)."""
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.root / 'prometheus.yml'}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.root / "prometheus.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # another process: poll it
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.root / 'prometheus.log').read_text()[-2000:]}")
            try:
                if self.query("up"):
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus did not scrape its target within {timeout}s")

    def query(self, expr: str) -> list[dict]:
        """The instant vector `expr` evaluates to now: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict]:
        """Polls until `expr` returns data: Prometheus scrapes and evaluates its rules in its own time."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no data for {expr} within {timeout}s")
            time.sleep(0.5)
        return result

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *_) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop()
