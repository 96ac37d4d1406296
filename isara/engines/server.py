"""The server engine (params engine.kind: server): completions from an OpenAI-compatible `/v1/completions` endpoint,
`engine.slots` requests in flight at once (one thread each), so a server with that many parallel slots stays full.

Without `engine.url`, `LocalServer` starts a llama.cpp server for the model file on 127.0.0.1 (a free port) and
stops it when the engine closes (and, on Linux, when the process that started it dies):
- llama.cpp's own `llama-server` (`--parallel engine.slots`, `engine.slots x engine.n_ctx` context), from
  `engine.server_binary` or PATH (benchmarks/build_llama_server.sh builds it from the llama.cpp source that the
  installed llama-cpp-python vendors);
- else llama-cpp-python's server (the `llama-cpp-python[server]` extra), through isara.engines.llama_cpp_server:
  one completion at a time, each from an empty KV cache, on a Llama built by isara.engines.llama.open_llama, so it
  returns exactly what the in-process sequential engine returns.

Each request carries its completion's own sampling: seed, temperature, top_p, max_tokens and the stop strings,
plus the create_completion defaults that OpenAI's API leaves to the server (top_k 40, min_p 0.05, no repeat
penalty), so every llama.cpp server samples with the in-process engines' chain. A server that dies or stops
answering mid-run raises `ServerError` naming the endpoint (and, for a server isara started, how it ended);
generate's attempt log keeps every attempt decided before it, so a rerun resumes there.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from isara.engines import Completion, EngineBase, Request
from isara.params import Engine as EngineParams
from isara.paths import resolve_path
from isara.records import Backend

# create_completion's defaults for the sampler knobs OpenAI's API does not have (isara.engines.batched names them).
# repeat_penalty is always sent: llama-cpp-python's server defaults it to 1.1, create_completion to 1.0.
TOP_K = 40
MIN_P = 0.05


class ServerError(ConnectionError):
    """A server that cannot be started, died, or stopped answering; the message names the endpoint."""


def completions_url(url: str) -> str:
    """http://host:port (or .../v1) -> http://host:port/v1/completions; a /completions URL stays as it is."""
    url = url.rstrip("/")
    if url.endswith("/completions"):
        return url
    return url + "/completions" if url.endswith("/v1") else url + "/v1/completions"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig():
    """A function for Popen's preexec_fn that makes the child get SIGTERM when its parent dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed stage leaves no server behind; None elsewhere. libc is loaded here, in the
    parent: the child, forked from a process with threads, only makes the one foreign call before exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


def _ended(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


class LocalServer:
    """A llama.cpp server for one model file on 127.0.0.1, started now, stopped by `stop()`."""

    def __init__(self, model_path: str | Path, params: EngineParams, seed: int = 0):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{model_path}: model file not found")
        self.params = params
        self.program, binary = self.choose(params)
        self.slots = params.slots if self.program == "llama-server" else 1
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.endpoint = completions_url(self.base_url)
        if self.program == "llama-server":
            ngl = "all" if params.n_gpu_layers < 0 else str(params.n_gpu_layers)
            cmd = [str(binary), "--model", str(self.model_path), "--host", "127.0.0.1", "--port", str(self.port),
                   "--ctx-size", str(params.n_ctx * self.slots), "--parallel", str(self.slots),
                   "--threads", str(params.n_threads), "--threads-batch", str(params.n_threads),
                   "--n-gpu-layers", ngl, "--seed", str(seed), "--no-webui", "--no-warmup",
                   # no CPU weight repacking: its AMX path crashed the server at the first decode (SIGSEGV in
                   # ggml_backend_amx_mul_mat, SmolLM2 Q4_1, llama.cpp of llama-cpp-python 0.3.36, AMX CPU), and
                   # the in-process engine does not repack either, so both run the same CPU kernels
                   "--no-repack"]
        else:
            cmd = [sys.executable, "-m", "isara.engines.llama_cpp_server", "--model", str(self.model_path),
                   "--port", str(self.port), "--n_ctx", str(params.n_ctx), "--n_threads", str(params.n_threads),
                   "--n_gpu_layers", str(params.n_gpu_layers), "--seed", str(seed)]
        self.cmd = cmd
        self._log_dir = tempfile.mkdtemp(prefix="isara-server-")
        self.log_path = Path(self._log_dir) / "server.log"
        env = dict(os.environ)
        # The launcher imports isara: from this checkout (stages put it first on sys.path), not site-packages.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2]),
                                                        env.get("PYTHONPATH", "")] if p)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, preexec_fn=_pdeathsig())  # noqa: PLW1509 (one prctl call)
        try:
            self._wait_ready(params.timeout)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def choose(params: EngineParams) -> tuple[str, Path | None]:
        """("llama-server", its path) or ("llama-cpp-python", None), as params engine.server asks."""
        if params.server != "llama-cpp-python":
            binary = resolve_path(params.server_binary) if params.server_binary else shutil.which("llama-server")
            if binary is not None and Path(binary).is_file():
                return "llama-server", Path(binary)
            if params.server == "llama-server":
                missing = f"engine.server_binary {binary} is not a file" if binary else "no llama-server is on PATH"
                raise FileNotFoundError(f"params.yaml: engine.server is llama-server, but {missing}: set "
                                        f"engine.server_binary (benchmarks/build_llama_server.sh builds one) or "
                                        f"engine.server: llama-cpp-python")
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            raise LookupError(f"engine.kind server needs llama.cpp's llama-server (none on PATH) or llama-cpp-python's "
                              f"server extra (pip install 'llama-cpp-python[server]'): {exc}") from None
        return "llama-cpp-python", None

    def log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            return "\n".join(lines[-n:])
        return ""

    def status(self) -> str | None:
        """How the server ended, or None while it runs."""
        code = self.process.poll()
        return None if code is None else f"{self.program} (pid {self.process.pid}) {_ended(code)}"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ended = self.status()
            if ended:
                raise ServerError(f"{ended}, started for {self.model_path} on {self.base_url}, stopped before it was "
                                  f"ready; its log ends:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException), \
                    urllib.request.urlopen(self.base_url + "/v1/models", timeout=5) as resp:
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise ServerError(f"{self.program} for {self.model_path} on {self.base_url} not ready after "
                                  f"{timeout:.0f} s (engine.timeout); its log ends:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._log_dir, ignore_errors=True)


class ServerEngine(EngineBase):
    """Completions from `url` (an OpenAI-compatible server), `slots` requests in flight.

    width: the requests worth handing over per complete_many call, max(slots, batch_size): generate runs that
    many attempts per round (the answers of a round are fewer than its questions)."""

    def __init__(self, url: str, slots: int = 1, timeout: float = 600.0, backend: Backend | None = None,
                 server: LocalServer | None = None, width: int | None = None):
        self.endpoint = completions_url(url)
        self.slots = int(slots)
        self.width = max(int(width or 0), self.slots)
        self.timeout = timeout
        self.server = server
        self.backend = backend or Backend(server="openai-compatible", endpoint=self.endpoint, slots=self.slots)
        self.model = self._served_model() if server is None else None  # e.g. vLLM needs the model's name
        self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="isara-server")

    @classmethod
    def open(cls, model_path: str | Path, params: EngineParams, seed: int = 0) -> ServerEngine:
        """params.url: that server (it must serve the model at model_path); else a LocalServer for the file."""
        if params.url is not None:
            return cls(params.url, params.slots, params.timeout, width=params.batch_size)
        server = LocalServer(model_path, params, seed)
        return cls(server.base_url, server.slots, params.timeout, Backend(server=server.program, slots=server.slots),
                   server, width=params.batch_size)

    def _served_model(self) -> str | None:
        """The first model id the server lists at /v1/models (OpenAI's API asks for one); None if it lists none."""
        base = self.endpoint.rsplit("/completions", 1)[0]
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError), \
                urllib.request.urlopen(base + "/models", timeout=min(self.timeout, 30)) as resp:
            return str(json.loads(resp.read().decode("utf-8"))["data"][0]["id"])
        return None

    def describe(self) -> str:
        if self.server is not None:
            return f"{self.server.program} that isara started at {self.endpoint}"
        return f"the server at {self.endpoint}"

    def _error(self, why: str) -> ServerError:
        ended = self.server.status() if self.server is not None else None
        if ended:
            tail = self.server.log_tail(5)
            why = f"{ended}" + (f"; its log ends:\n{tail}" if tail else "")
        return ServerError(f"LLM server {self.endpoint}: {why}")

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        for attempt in range(30):
            request = urllib.request.Request(self.endpoint, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", errors="replace")[:500]
                if exc.code == 503 and attempt < 29:  # loading, or all slots busy: llama-server asks to come back
                    time.sleep(1.0)
                    continue
                raise self._error(f"HTTP {exc.code} {exc.reason}: {detail}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise self._error(f"no answer ({type(reason).__name__}: {reason})") from None
            except json.JSONDecodeError as exc:
                raise self._error(f"not a JSON answer: {exc}") from None
        raise AssertionError("unreachable")

    def complete_one(self, request: Request) -> Completion:
        prompt, sampling, stop = request
        out = self._post({"prompt": prompt, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                          "top_p": sampling.top_p, "seed": sampling.seed, "stop": list(stop), "top_k": TOP_K,
                          "min_p": MIN_P, "repeat_penalty": sampling.repeat_penalty, "stream": False,
                          **({"model": self.model} if self.model else {})})
        try:
            choice = out["choices"][0]
            return choice["text"], choice.get("finish_reason") or "stop", int(out["usage"]["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise self._error(f"unexpected answer {json.dumps(out)[:300]} ({exc!r})") from None

    def complete_many(self, requests: Sequence[Request]) -> list[Completion]:
        futures = [self._pool.submit(self.complete_one, r) for r in requests]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.server is not None:
            self.server.stop()
            self.server = None
