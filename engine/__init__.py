"""The engine behind train.py and evaluate.py: each file owns one job.

    config.py         typed config tree: dataclasses, strict YAML, dotted overrides
    fileio.py         the atomic writer every output goes through
    checkpoint.py     checkpoint files (save/load/list/prune) and RNG states
    distributed.py    process group and the few collectives
    optim.py          TSN parameter groups, SGD/AdamW, LR schedule, EMA of the weights
    amp.py            bf16/fp16/fp32 autocast
    channels_last.py  channels-last model and input
    step.py           one optimizer step: accumulation, clipping, loss scaling, non-finite guard
    metrics_log.py    metrics.jsonl, TensorBoard, provenance
    scoring.py        multi-view scoring across ranks, view fusion, top-k / mean-class metrics
    reports.py        score dumps, reports and plots of a test run, fusion of dumps
    progress.py       progress lines and a wide console for logs (evaluate, prep, train)

See docs/ARCHITECTURE.md for the data flow from prep/ to train.py and evaluate.py.
"""
