"""The checkpoint file: round trip, atomic writes, and refusal of anything that is not plain tensors."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.registry import model_from_checkpoint
from models.rnn import RNNConfig, RNNLanguageModel
from runtime.atomic import atomic_write_bytes, atomic_write_text


def payload(model: RNNLanguageModel) -> dict:
    return {
        "arch": "lstm",
        "model_config": model.config.to_dict(),
        "tokenizer": '{"model": "stand-in"}',
        "special_tokens": {"eos": 5, "unk": 6, "bos": None},
        "model": model.state_dict(),
        "generation": {"temperature": 0.8},
        "train": {"step": 7, "rng": {"python": [1, 2, 3]}, "optimizer": {"state": {}, "param_groups": []}},
    }


@pytest.fixture
def model() -> RNNLanguageModel:
    torch.manual_seed(0)
    return RNNLanguageModel(RNNConfig(vocab_size=7, embedding_size=4, hidden_size=8, num_layers=2))


def test_round_trip_restores_weights_config_and_training_state(model, tmp_path: Path) -> None:
    path = tmp_path / "lstm.bin"
    save_checkpoint(payload(model), path)
    loaded = load_checkpoint(path, expect_arch=("lstm", "gru"))
    assert loaded.training.step == 7 and loaded.special_tokens["eos"] == 5
    restored = model_from_checkpoint(loaded)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(restored(ids)[0], model.eval()(ids)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["lstm.bin"]  # no temp file left behind


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: run code on load
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    evil = _Payload()
    evil.marker = str(marker)
    path = tmp_path / "evil.bin"
    with path.open("wb") as handle:
        torch.save({"format": "textgen-checkpoint", "version": 1, "boom": evil}, handle)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_damaged_foreign_and_newer_files_are_refused(model, tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    save_checkpoint(payload(model), good)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a textgen checkpoint"):
        load_checkpoint(foreign)
    newer = tmp_path / "newer.bin"
    torch.save({**torch.load(good, weights_only=True), "version": 99}, newer)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match="holds a lstm model, expected gpt2"):
        load_checkpoint(good, expect_arch=("gpt2",))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "transcript.json"
    atomic_write_text(target, "old\n")

    def interrupted(handle) -> None:
        handle.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, interrupted)
    assert target.read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["transcript.json"]


def test_atomic_files_get_the_permissions_a_plain_open_would(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "é\n")  # mkstemp alone would leave it 0600
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é\n"


def test_a_replaced_file_keeps_its_permissions_and_a_link_keeps_its_target(tmp_path: Path) -> None:
    private = tmp_path / "private.json"
    atomic_write_text(private, "one\n")
    private.chmod(0o600)
    atomic_write_text(private, "two\n")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text() == "two\n"
    link = tmp_path / "latest.json"
    link.symlink_to(private.name)
    atomic_write_text(link, "three\n")
    assert link.is_symlink() and private.read_text() == "three\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest.json", "private.json"]


def old_way_checkpoint(model: RNNLanguageModel) -> dict:
    """A checkpoint dict exactly as textgen-train built and torch.save'd them before checkpoints were typed."""
    return {
        "format": "textgen-checkpoint",
        "version": 1,
        "arch": "lstm",
        "model_config": model.config.to_dict(),
        "tokenizer": '{"model": "stand-in"}',
        "special_tokens": {"eos": 5, "unk": 6, "bos": None},
        "model": model.state_dict(),
        "generation": {"temperature": 0.8, "top_k": 0},
        "train": {
            "step": 12, "seconds": 3.5, "tokens_seen": 768, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"plateau_scale": 1.0}, "scaler": None, "rng": {"python": [1, 2, 3]}, "rng_by_rank": None,
            "world_size": 1, "data_position": {"epoch": 0, "index": 12}, "rnn_state": [torch.ones(2, 4, 8)] * 2,
            "config": {"arch": "lstm", "hidden_size": 8}, "best_val_loss": 1.25, "best_step": 10,
            "evals_without_improvement": 0, "last_eval_step": 10, "tokenizer_kind": "char",
            "a_future_field": [1, 2],  # unknown keys survive a load and a save
        },
        "metrics": {"step": 10, "val_loss": 1.25},
    }


def assert_same(saved: object, loaded: object, where: str = "") -> None:
    if isinstance(saved, dict):
        assert isinstance(loaded, dict) and set(saved) == set(loaded), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}.{key}")
    elif isinstance(saved, list | tuple):
        assert len(saved) == len(loaded), where
        for index, (left, right) in enumerate(zip(saved, loaded, strict=True)):
            assert_same(left, right, f"{where}[{index}]")
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(saved, loaded), where
    else:
        assert saved == loaded, where


def test_a_checkpoint_built_the_old_way_loads_typed_and_saves_back_the_same_layout(model, tmp_path: Path) -> None:
    old = old_way_checkpoint(model)
    path = tmp_path / "old.bin"
    torch.save(old, path)
    loaded = load_checkpoint(path)
    assert loaded.arch == "lstm" and loaded.version == 1 and loaded.special_tokens["eos"] == 5
    assert loaded.training is not None and loaded.training.step == 12 and loaded.training.missing() == []
    assert loaded.training.data_position == {"epoch": 0, "index": 12} and loaded.training.best_val_loss == 1.25
    assert loaded.training.extra == {"a_future_field": [1, 2]} and loaded.metrics == {"step": 10, "val_loss": 1.25}
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model_from_checkpoint(loaded)(ids)[0], model.eval()(ids)[0])
    assert_same(old, loaded.to_dict())
    resaved = tmp_path / "resaved.bin"
    save_checkpoint(loaded, resaved)
    assert_same(old, torch.load(resaved, map_location="cpu", weights_only=True))  # the on-disk format is unchanged


def test_an_old_dict_saved_through_save_checkpoint_is_validated_first(model, tmp_path: Path) -> None:
    old = old_way_checkpoint(model)
    del old["format"], old["version"]  # the old save_checkpoint added these itself
    save_checkpoint(old, tmp_path / "ok.bin")
    assert load_checkpoint(tmp_path / "ok.bin").training.step == 12
    with pytest.raises(ValueError, match="'tokenizer' is missing"):
        save_checkpoint({**old, "tokenizer": None}, tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()
