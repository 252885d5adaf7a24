"""--logger tensorboard and wandb: what train.py logged, read back from the backends' own files and
compared with metrics.jsonl; a missing backend is an error that names the pip command. (The W&B run
is the class-conditional run's: tests/test_class_conditional.py checks it with `wandb_history`.)"""

import importlib.util
import json
import struct


import train as train_cli
from cli_runs import training_rows, validation_rows


def test_tensorboard_event_file_holds_the_metrics_and_the_grids(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished_run
    events = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows, held_out = training_rows(out), validation_rows(out)
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in rows]
    assert [round(e.value, 5) for e in logged] == [round(r["loss"], 5) for r in rows]
    validated = events.Scalars("train/val_bpd")
    assert len(held_out) >= 2 and [(e.step, round(e.value, 5)) for e in validated] == [
        (r["step"], round(r["val_bpd"], 5)) for r in held_out]
    assert {"train/lr", "train/grad_norm", "train/ema_decay", "train/images_per_sec"} <= set(events.Tags()["scalars"])
    grids = sorted(p.name for p in (out / "samples").iterdir())
    images = events.Images("samples")
    assert len(images) == len(grids) and images[-1].step == rows[-1]["step"]


def wandb_history(run_file):
    """The history records of a W&B run file (its leveldb-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, history = run_file.read_bytes(), 7, b"", []
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return history


def test_a_missing_backend_names_the_pip_command(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert train_cli.main(["--logger", "wandb", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--logger wandb needs the wandb package: pip install \"flaxdiff[wandb]\"" in err
    assert not (tmp_path / "o").exists()
