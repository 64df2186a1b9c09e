"""The committed generated gRPC modules match gateway/api/looksync.proto."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(REPO),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "gateway/api/looksync.proto",
        ],
        check=True,
        cwd=REPO,
    )
    for name in ("looksync_pb2.py", "looksync_pb2_grpc.py"):
        fresh = (tmp_path / "gateway/api" / name).read_text()
        assert fresh == (REPO / "gateway/api" / name).read_text(), f"{name} is stale: run `make proto`"
