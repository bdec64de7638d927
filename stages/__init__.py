"""DVC stages: one module per stage of dvc.yaml, run as `python -m stages.<name>`.

- `stages.common`: the library the stages share (params, dataset layout, model loading, training
  step, generation, statistics, edges, I/O). It imports nothing above it.
- `stages.demo`: the embedded demo (drawn garments, the tiny model kit and its pretraining, the
  demo-only colour check). Stages use it; it uses the library.
The apps (`fashion-exp`, `fashion-bundle`, `fashion-generate`, `fashion-studio`) live in the
`fashion` package, above all of this; pyproject.toml's import-linter contracts keep the layers.
"""
