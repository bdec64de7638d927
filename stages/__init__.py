"""DVC stages: one module per stage of dvc.yaml, run as `python -m stages.<name>`.

Shared code (params, model loading, image I/O, device and precision) lives in `stages.common`.
"""
