"""`metrics.jsonl` costs O(1) bytes written per record on any storage (appends on a file system, segments on
object storage), and what a relaunch reads back is exactly what was logged up to the resumed step."""
import json

import pytest

from gconv import metrics_log, storage, tensorboard
from gconv.metrics_log import MetricsLog, read_metrics


def _record(step: int) -> dict:
    return {"step": step, "train_loss": 1.0 / step, "train_accuracy": 0.5, "train_grad_norm": 2.0 ** 0.5,
            "train_lr": 0.1, "img_per_sec": 1234.5, "wall_time": 0.25 * step}


def _cost(log: MetricsLog, steps: range) -> int:
    before = storage.bytes_written()
    for step in steps:
        log.write(_record(step))
    return storage.bytes_written() - before


@pytest.mark.parametrize("object_store", [False, True], ids=["file_system", "object_store"])
def test_each_record_costs_the_same_bytes_however_long_the_log(tmp_path, object_store):
    """Records 129-256 cost what records 1-128 did. Rewriting the whole log on each record (as object storage would
    need without segments) makes the second half cost ~3x the first: sum of n over 129..256 against 1..128. Error
    model of the bound: the lines of the second half are 1-2 characters longer (3-digit steps, longer 1/step
    decimals) out of ~150: < 2%, so 1.1 leaves room and still fails a growing cost by a factor of 2.7."""
    assert 128 % metrics_log.SEGMENT_RECORDS == 0 and 128 % tensorboard.RECORDS_PER_FILE == 0
    log = MetricsLog(storage.as_path(tmp_path / "run" / "metrics.jsonl"), 0, enabled=True, object_store=object_store)
    first, second = _cost(log, range(1, 129)), _cost(log, range(129, 257))
    log.close()
    line = len(json.dumps(_record(200))) + 1
    # Per record: its line (appended), or its segment so far (at most SEGMENT_RECORDS lines, (S + 1) / 2 on
    # average), plus its TensorBoard scalars (~30-60 bytes each, at most RECORDS_PER_FILE records per file).
    assert second <= 1.1 * first, (first, second)
    per_record = (metrics_log.SEGMENT_RECORDS + 1) / 2 if object_store else 1
    assert second / 128 <= per_record * line + (tensorboard.RECORDS_PER_FILE if object_store else 1) * 8 * 64
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 257))
    assert not (tmp_path / "run" / "metrics.parts").exists()  # folded into metrics.jsonl on close


def test_object_store_log_stopped_without_closing_resumes_exactly(tmp_path):
    """A process killed mid-run leaves segments: readers see every record; the relaunch at step 20 keeps steps
    1-20, logs 21-30 anew, and ends with exactly those records in `metrics.jsonl`, no segment left."""
    path = storage.as_path(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, 0, enabled=True, object_store=True)
    for step in range(1, 41):
        log.write(_record(step))  # killed here: no close
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 41))
    assert len(list((tmp_path / "metrics.parts").iterdir())) == 40 // metrics_log.SEGMENT_RECORDS + 1
    log = MetricsLog(path, 20, enabled=True, object_store=True)
    assert [r["step"] for r in log.records] == list(range(1, 21))
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 21))
    for step in range(21, 31):
        log.write(_record(step))
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 31))  # live: metrics.jsonl + this session's
    log.close()
    assert read_metrics(path) == [_record(s) for s in range(1, 31)]
    assert not (tmp_path / "metrics.parts").exists()


def test_segments_already_folded_in_are_not_read_twice(tmp_path):
    """Stopped between writing the folded `metrics.jsonl` and deleting the segments: nothing is counted twice."""
    path = storage.as_path(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, 0, enabled=True, object_store=True)
    for step in range(1, 21):
        log.write(_record(step))
    storage.write_text(path, "".join(json.dumps(_record(s)) + "\n" for s in range(1, 21)))  # folded, parts kept
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 21))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(_record(s)) + "\n" for s in range(1, 5)))
    (tmp_path / "metrics.parts" / f"{0:09d}.jsonl").unlink()
    with pytest.raises(storage.RunDirError, match="lacks the records 4..15"):  # a lost segment is named
        read_metrics(path)
