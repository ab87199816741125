"""SMG (the Shepherd Model Gateway, `smg` from PyPI) in a subprocess, fronting inflight replicas on loopback.

Offline: SMG reads the tokenizer from a local model folder and finds each replica's
`trtllm.TrtllmService` on its gateway port.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.stack import free_port


class SmgRouter:
    def __init__(self, worker_addresses: list[str], model_dir: Path | None, log_path: Path, policy: str = "cache_aware",
                 extra_args: tuple[str, ...] = (), api_key: str = "") -> None:
        """model_dir None: SMG has no tokenizer of its own and fetches the replicas' (GetTokenizer).
        api_key: a control-plane key SMG accepts, for /workers when SMG requires one."""
        binary = shutil.which("smg", path=str(Path(sys.executable).parent)) or shutil.which("smg")
        assert binary, "smg is a dev dependency (pip install smg)"
        self.binary = binary
        self.num_workers = len(worker_addresses)
        self.log_path = log_path
        self.fetches_tokenizer = model_dir is None
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [binary, "launch", "--worker-urls", *(f"grpc://{a}" for a in worker_addresses), "--policy", policy,
             *(["--model-path", str(model_dir), "--tokenizer-path", str(model_dir)] if model_dir
               else ["--model-path", "/nonexistent/tokenizer-from-the-worker"]), "--host", "127.0.0.1",
             "--port", str(port), "--prometheus-port", str(free_port()), *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.url}/workers", headers=self._headers, timeout=5).json()["workers"]

    def wait_ready(self, timeout: float = 90.0) -> SmgRouter:
        """Once every replica is registered, healthy and ready; without a tokenizer of its own, once SMG has
        also fetched the replicas' (it does so after a replica turns ready, and refuses chats until then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "smg exited"
            try:
                workers = self.workers()
                if len(workers) == self.num_workers and all(w.get("is_healthy") and w.get("status") == "ready"
                                                            for w in workers) and self._has_tokenizer():
                    return self
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"smg did not register {self.num_workers} ready workers within {timeout} s")

    def _has_tokenizer(self) -> bool:
        return (not self.fetches_tokenizer
                or "Successfully registered tokenizer" in self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
