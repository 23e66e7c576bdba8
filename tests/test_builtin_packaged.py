"""The built-in model shipped in the package (issue 17): its record matches the recipe in the code,
its checksum holds, and a missing or corrupt packaged model falls back to training, saying why."""
from __future__ import annotations

import json
import shutil

import pytest

from pumer_plug.evaluation.tasks import builtin

PACKAGED = builtin.PACKAGED_MODEL_DIR


def _metadata() -> dict:
    return json.loads((PACKAGED / builtin.METADATA_FILE).read_text())


def test_the_shipped_record_matches_the_recipe_in_the_code():
    """Changing the recipe (curriculum, batch size, learning rate, ...) without retraining fails here:
    run `pumer-plug train --seed 0` and copy the cache folder to pumer_plug/data/builtin-digits-vqa."""
    metadata = _metadata()
    assert builtin.recipe_differences(metadata, seed=0) == []
    assert builtin._sha256(PACKAGED / builtin.WEIGHTS_FILE) == metadata["weights_sha256"]
    assert metadata["val_accuracy"] > 0.9 > metadata["val_question_prior_accuracy"]
    assert sorted(p.name for p in PACKAGED.iterdir()) == ["builtin.json", "config.json", "model.safetensors",
                                                         "tokenizer.json"]


@pytest.fixture
def no_training(tmp_path, monkeypatch):
    """An empty cache, and a 'trainer' that copies the shipped model instead of training."""
    calls: list = []

    def fake_train(model_dir, progress, seed=0):
        calls.append(model_dir)
        shutil.copytree(PACKAGED, model_dir)

    monkeypatch.setattr(builtin, "_train_into_cache", fake_train)
    monkeypatch.setenv(builtin.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path, calls


def test_the_packaged_model_is_used_without_training(no_training):
    _, calls = no_training
    model, tokenizer = builtin.load_builtin_model(progress=False)
    assert calls == [] and not model.training and tokenizer.get_vocab_size() > 10


@pytest.mark.parametrize("damage", ["corrupt_weights", "delete_weights", "stale_recipe"])
def test_a_corrupt_packaged_model_falls_back_to_training_saying_why(no_training, monkeypatch, capsys, damage):
    tmp_path, calls = no_training
    copy = tmp_path / "packaged"
    shutil.copytree(PACKAGED, copy)
    weights = copy / builtin.WEIGHTS_FILE
    if damage == "corrupt_weights":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete_weights":
        weights.unlink()
    else:
        metadata = json.loads((copy / builtin.METADATA_FILE).read_text())
        metadata["learning_rate"] = 5e-4
        (copy / builtin.METADATA_FILE).write_text(json.dumps(metadata))
    monkeypatch.setattr(builtin, "PACKAGED_MODEL_DIR", copy)
    expected = {"corrupt_weights": "checksum", "delete_weights": "model.safetensors", "stale_recipe": "learning_rate"}
    with pytest.warns(UserWarning, match=f"packaged model .* is unusable .*{expected[damage]}"):
        builtin.load_builtin_model()
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert "training the built-in model" in err and "val accuracy" in err and "stored in" in err


def test_a_missing_packaged_model_falls_back_to_training_saying_why(no_training, monkeypatch, capsys):
    tmp_path, calls = no_training
    monkeypatch.setattr(builtin, "PACKAGED_MODEL_DIR", tmp_path / "nothing")
    builtin.load_builtin_model()
    assert len(calls) == 1 and "no packaged model in" in capsys.readouterr().err
