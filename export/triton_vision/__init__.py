"""Code that runs inside Triton's python backend for the SAM2 and Florence-2 models.

Copied next to each exported version (like `export/triton/`), flat: the files import each other
as top-level modules there and as `export.triton_vision.*` in the tests. Only numpy, Pillow,
regex and onnxruntime may be imported here: these files also run in NVIDIA's Triton container,
where the project itself is not installed.
"""
