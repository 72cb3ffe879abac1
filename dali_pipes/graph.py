"""The DALI graph: external source -> decode (cpu | mixed) -> crop+resize -> flip+normalise.

One function builds every mode. The GPU and CPU routes differ only in the `device=` of the decoders
(everything downstream follows its input's placement); crop boxes, flips and labels arrive as
per-sample arguments from `source.ClipSource`, so the graph has no randomness of its own.

Per-sample outputs: clips (crops, F, C, H, W) for videos, (crops, C, H, W) for one frame of a frame
folder; labels, ids and replaced flags as scalars. loader.py turns them into the contract layouts.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from .source import ClipSource

DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


@pipeline_def(enable_conditionals=False)
def clip_graph(
    source: ClipSource,
    device: str,
    num_crops: int,
    out_size: int,
    mean: list[float],
    std: list[float],
    dtype: str,
    parallel: bool,
    prefetch: int,
):
    """DALI pipeline for one loader (pass batch_size/num_threads/device_id/py_* to the decorator)."""
    kind = source.kind
    names = {"pyav": ["frames"], "bytes": ["encoded", "indices"], "frames": ["jpeg"]}[kind]
    extra = {"prefetch_queue_depth": prefetch} if parallel else {}  # DALI rejects it when serial
    outs = fn.external_source(
        source=source,
        num_outputs=len(names) + 5,
        batch=False,
        parallel=parallel,
        **extra,
        layout=(["FHWC"] if kind == "pyav" else [""] * len(names)) + [""] * 5,  # encoded data: no layout
    )
    inputs, (rois, mirror, label, ident, replaced) = outs[: len(names)], outs[len(names) :]
    mixed = "mixed" if device == "gpu" else "cpu"
    if kind == "pyav":  # decoded by PyAV in the workers (the CPU route only, see loader.source_kind)
        frames = inputs[0]  # in training already cropped and resized there (ClipSource.resizes)
        out_layout = "FCHW"
    elif kind == "bytes":
        frames = fn.decoders.video(inputs[0], frames=inputs[1], device=mixed)
        out_layout = "FCHW"
    else:
        frames = fn.decoders.image(inputs[0], device=mixed, output_type=types.RGB)
        out_layout = "CHW"
    views = []
    for c in range(num_crops):
        if source.resizes:
            view = frames
        else:
            view = fn.resize(frames, size=[out_size, out_size], roi_start=rois[c, 0:2], roi_end=rois[c, 2:4],
                             roi_relative=True)  # fmt: skip
        view = fn.crop_mirror_normalize(
            view,
            mirror=mirror,
            mean=[255.0 * m for m in mean],
            std=[255.0 * s for s in std],
            dtype=DALI_DTYPES[dtype],
            output_layout=out_layout,
        )
        views.append(view)
    clips = fn.stack(*views) if num_crops > 1 else fn.expand_dims(views[0], axes=[0])  # no copy of one view
    return clips, label, ident, replaced
