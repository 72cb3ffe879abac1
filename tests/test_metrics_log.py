"""metrics.jsonl's TensorBoard side: an extra (`pip install -e .[tb]`); a process without it says so once."""

from __future__ import annotations

import logging
import sys

from engine import metrics_log


def test_missing_tensorboard_is_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    monkeypatch.setattr(metrics_log, "_tb_off_said", False)
    with caplog.at_level(logging.WARNING, logger="engine.metrics_log"):
        for run in ("a", "b"):
            (tmp_path / run).mkdir()
            m = metrics_log.MetricsLog(tmp_path / run, resume_step=None)
            m.write("train", 1, loss=1.0)
            m.close()
            assert m.tb is None and (tmp_path / run / "metrics.jsonl").read_text().count("\n") == 1
    said = [r.getMessage() for r in caplog.records if "TensorBoard is off" in r.getMessage()]
    assert said == [metrics_log.TB_OFF] and "pip install -e .[tb]" in said[0]
