"""One tiny SAM2 + Florence-2 export per test process, shared by the vision test modules.

A plain cached function rather than a fixture in conftest.py: both test_vision_export.py and
test_vision_triton.py use it, and exporting twice would double their run time.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def tiny_vision_repo() -> Path:
    """A model repository with version 1 of tiny `sam2_mask` and `florence2_ground` (CPU target)."""
    from export.florence2 import Florence2Request, export_florence2
    from export.sam2 import Sam2Request, export_sam2

    root = Path(tempfile.mkdtemp(prefix="looksync-vision-"))
    atexit.register(shutil.rmtree, root, True)
    repo = root / "model_repository"
    # One onnxruntime thread per model: the test machine has two cores and Triton runs both.
    export_sam2(Sam2Request(version=1, tiny=True, repository=repo, onnx_threads=1))
    export_florence2(
        Florence2Request(version=1, tiny=True, repository=repo, onnx_threads=1, max_new_tokens=32)
    )
    return repo
