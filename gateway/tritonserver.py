"""Start the real `tritonserver` (shipped in the nvidia-pytriton wheel) on the CPU target.

The wheel carries the server binary, the python backend and one backend stub per Python
version. We assemble a backend directory for the running Python, put the virtual environment
first on PATH (the python-backend stub then imports numpy/onnxruntime from it), load models
explicitly, and wait until the server reports ready.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class TritonStartError(RuntimeError):
    pass


def pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed (make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def backend_dir(work_dir: Path) -> Path:
    """A --backend-directory holding the python backend with the stub for this Python."""
    root = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"no python backend stub for Python {version} in {stub.parent.parent}")
    target = work_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        dst = target / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return target.parent


# Platforms of Triton's built-in backends (a config names either `backend` or `platform`).
PLATFORM_BACKENDS = {
    "tensorrt_plan": "tensorrt",
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
}


def model_backend(config: Path) -> str:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    return parsed.backend or PLATFORM_BACKENDS.get(parsed.platform, parsed.platform)


def models_in(repository: Path, backends: set[str] | None = None) -> list[str]:
    """Models that have a config and at least one numbered version; with `backends`, only those
    this server can run (the wheel's server has the python backend only: a TensorRT version
    added for the GPU target must not stop the CPU server from starting)."""
    names = []
    for config in sorted(repository.glob("*/config.pbtxt")):
        if not any(p.is_dir() and p.name.isdigit() for p in config.parent.iterdir()):
            continue
        if backends is not None and (backend := model_backend(config)) not in backends:
            print(
                f"tritonserver: not loading {config.parent.name}: backend {backend!r} is not in this "
                f"server (it has {sorted(backends)}; NVIDIA's Triton image has the GPU backends)",
                file=sys.stderr,
            )
            continue
        names.append(config.parent.name)
    return names


@dataclass
class TritonServer:
    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    work_dir: Path = Path(".looksync/triton")
    models: list[str] | None = None
    log_verbose: int = 0
    process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        backends_root = backend_dir(Path(self.work_dir))
        cmd = [
            str(binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backends_root.resolve()}",
            "--model-control-mode=explicit",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--strict-readiness=true",
            # In-flight requests get this long at shutdown; the default waits 30 s.
            "--exit-timeout-secs=5",
            f"--log-verbose={self.log_verbose}",
        ]
        backends = {p.name for p in backends_root.iterdir() if p.is_dir()}
        for model in self.models if self.models is not None else models_in(Path(self.repository), backends):
            cmd.append(f"--load-model={model}")
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = pytriton_root().parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        # Each python model gets its own stub process; keep their numeric libraries from each
        # spawning a thread per core on a small machine.
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self, timeout_s: float = 120.0, log_file=None, attempts: int = 2) -> TritonServer:
        """Start and wait until ready. A server that dies while starting is started once more:
        on a busy host the python backend's stub start-up occasionally aborts
        (`boost::interprocess::lock_exception`, exit -6) and a second start succeeds; a real
        configuration error fails both times and is reported."""
        Path(self.work_dir).mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log_file or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                self.wait_ready(timeout_s)
                return self
            except TritonStartError:
                if attempt == attempts or self.process.poll() is None:
                    raise  # timed out (already stopped), or the last attempt
                try:  # its python stubs (same process group) may outlive it
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with code {self.process.returncode}")
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM lets Triton unload models and end the python stubs; the group kill is only
        # for a server that ignores it.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
