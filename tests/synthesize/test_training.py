"""Neural training: resume from a checkpoint after a killed worker, time budget, progress log, device
detection, and models pickled on CUDA loading on a CPU-only machine."""

from __future__ import annotations

import logging
import pickle
import threading

import pytest
import torch

from synthfactory.storage import Store
from synthfactory.synthesize import engine
from synthfactory.synthesize.device import detect_device, device_params
from synthfactory.synthesize.training import TrainingInterrupted, TrainPlan

from .conftest import TINY_CTGAN, TINY_TVAE


def _weights(synth, kind):
    net = synth._model.decoder if kind == "tvae" else synth._model._generator
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("kind,params", [("ctgan", TINY_CTGAN), ("tvae", TINY_TVAE)])
def test_killed_after_first_chunk_resumes_to_n_epochs_identical_to_uninterrupted(tmp_path, small_table, kind,
                                                                                  params):
    store = Store(s3=threading.Lock())  # an unpicklable client (as boto3's): checkpoints must not pickle the store
    meta = engine.metadata_dict(small_table)
    ckpt = str(tmp_path / "ckpt")
    params = {**params, "epochs": 4}

    def kill(epoch):
        raise TrainingInterrupted(f"worker died after epoch {epoch}")

    first = TrainPlan(epochs=4, checkpoint_uri=ckpt, store=store, checkpoint_every=2, fingerprint="same",
                      on_checkpoint=kill)
    with pytest.raises(TrainingInterrupted):
        engine.fit(small_table, kind, params, meta, plan=first)
    assert store.exists(ckpt + "/base.pkl") and store.exists(ckpt + "/state.pt")

    retry = TrainPlan(epochs=4, checkpoint_uri=ckpt, store=store, checkpoint_every=2, fingerprint="same")
    resumed, _ = engine.fit(small_table, kind, params, meta, plan=retry)
    assert retry.info["resumed_from_epoch"] == 2 and retry.info["epochs_done"] == 4
    epochs = resumed.get_loss_values()["Epoch"]
    assert sorted(epochs.unique()) == [0, 1, 2, 3]  # each epoch trained exactly once: total = N
    assert type(resumed).__module__.startswith("sdv.") and type(resumed._model).__module__.startswith("ctgan.")

    straight = TrainPlan(epochs=4, checkpoint_uri=str(tmp_path / "other"), store=store, checkpoint_every=2,
                         fingerprint="same")
    uninterrupted, _ = engine.fit(small_table, kind, params, meta, plan=straight)
    a, b = _weights(resumed, kind), _weights(uninterrupted, kind)
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, optimiser moments and RNG streams were restored

    uri = str(tmp_path / "model.pkl")
    engine.save(resumed, uri, store)
    out = engine.sample(engine.load(uri, store), 30)
    assert len(out) == 30 and set(out["gender"]) <= {"female", "male"}


def test_checkpoint_of_other_data_is_not_resumed(tmp_path, small_table):
    store = Store()
    meta = engine.metadata_dict(small_table)
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(TrainingInterrupted):
        engine.fit(small_table, "ctgan", {**TINY_CTGAN, "epochs": 2}, meta,
                   plan=TrainPlan(epochs=2, checkpoint_uri=ckpt, store=store, checkpoint_every=1, fingerprint="a",
                                  on_checkpoint=lambda e: (_ for _ in ()).throw(TrainingInterrupted())))
    plan = TrainPlan(epochs=2, checkpoint_uri=ckpt, store=store, checkpoint_every=1, fingerprint="b")
    engine.fit(small_table, "ctgan", {**TINY_CTGAN, "epochs": 2}, meta, plan=plan)
    assert plan.info["resumed_from_epoch"] is None and plan.info["epochs_done"] == 2


def test_time_budget_keeps_the_model_trained_so_far_and_logs_progress(small_table, caplog):
    plan = TrainPlan(epochs=50, time_budget_s=1e-6)
    with caplog.at_level(logging.INFO, logger="synthfactory"):
        synth, _ = engine.fit(small_table, "ctgan", {**TINY_CTGAN, "epochs": 50}, engine.metadata_dict(small_table),
                              plan=plan)
    assert plan.info["stopped"] == "time_budget" and plan.info["epochs_done"] == 1
    assert plan.info["cpu_seconds_per_epoch"] > 0 and plan.info["device"] == "cpu"
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("epoch=1/50 loss_g=") and "loss_d=" in line and "eta=" in line for line in lines)
    assert any("time budget" in line for line in lines)
    assert len(engine.sample(synth, 10)) == 10


def test_device_detection(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="synthfactory"):
        assert device_params("ctgan", {})["enable_gpu"] is False
        assert device_params("par", {"epochs": 1})["cuda"] is False
    assert "no CUDA device found; training on CPU" in caplog.text
    assert device_params("gaussian_copula", {}) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detect_device() == "cuda"
    assert device_params("tvae", {})["enable_gpu"] is True
    assert device_params("par", {})["cuda"] is True
    assert device_params("ctgan", {"enable_gpu": False})["enable_gpu"] is False  # the spec wins


def test_a_model_pickled_on_cuda_loads_on_a_cpu_only_machine(monkeypatch):
    """Plain SDV fails here ('Attempting to deserialize object on a CUDA device'); our loader maps to CPU."""
    import torch.serialization

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as torch writes on GPU
    blob = pickle.dumps({"weights": torch.arange(4.0)})
    monkeypatch.setattr(torch.serialization, "location_tag", real_tag)
    with pytest.raises(RuntimeError, match="CUDA device"):
        pickle.loads(blob)
    loaded = engine.load_bytes(blob)
    assert loaded["weights"].device.type == "cpu" and loaded["weights"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_save_maps_networks_to_cpu_and_restores_the_device():
    calls = []

    class FakeCTGAN:
        _generator = object()
        _device = "cuda:0"

        def set_device(self, device):
            calls.append(str(device))
            self._device = device

    class FakeSynth:
        _model = FakeCTGAN()

    with engine.cpu_mapped(FakeSynth()) as devices:
        assert devices == ["cuda:0"] and calls == ["cpu"]
    assert calls == ["cpu", "cuda:0"]
