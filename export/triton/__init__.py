"""Code that runs inside Triton's python backend (copied next to each exported model version).

Only numpy, Pillow and onnxruntime may be imported here: these files also run in NVIDIA's
Triton container, where the project itself is not installed.
"""
