"""DALI clip pipelines: lists -> frame indices -> decode -> crop/flip/normalise -> torch batches.

Entry point: `dali_pipes.loader.build_loader`. Modules: listfile (list parsing), sampling (pure frame
samplers), augment (crop/flip parameters), video_io (exact PyAV seeking decode), source (per-rank
sample stream for DALI's external source), graph (the DALI graph), loader, profile (the profiler).
Importing the package itself loads nothing heavy.
"""
