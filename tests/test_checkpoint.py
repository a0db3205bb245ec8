"""Checkpoints: atomic writes, clear errors on bad files, retention, RNG state, production export."""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch

from tiny_transformer import checkpoint as ckpt_lib
from tiny_transformer.checkpoint import (
    FORMAT,
    CheckpointManager,
    capture_rng_state,
    export_production,
    load_checkpoint,
    load_model_from_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig
from tiny_transformer.tokenizers import CharTokenizer
from tiny_transformer.training import Trainer, TrainerConfig, sample_text

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


def small_checkpoint(step=1, val_loss=1.0, **extra):
    torch.manual_seed(step)
    return {"format": FORMAT, "version": 1, "model": {"w": torch.randn(4, 4)},
            "config": {"model_type": "gpt", "model": {}}, "step": step, "val_loss": val_loss, **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps, with its checkpoint folder."""
    tmp = tmp_path_factory.mktemp("trained")
    tok = CharTokenizer().fit(TEXT)
    ids = torch.tensor(tok.encode(TEXT))
    torch.manual_seed(0)
    model = TinyTransformerLM(TransformerConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_layers=1,
                                                d_ff=64, max_seq_len=16))
    cfg = TrainerConfig(max_steps=6, batch_size=4, warmup_steps=1, eval_interval=3, eval_batches=2,
                        progress=False, verbose=False, log_dir=str(tmp / "logs"),
                        checkpoint_dir=str(tmp / "ckpt"), experiment_name="run")
    trainer = Trainer(model, cfg, ids[:2000], ids[2000:], tokenizer=tok)
    trainer.train()
    return trainer, tmp


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    path = save_checkpoint(small_checkpoint(), tmp_path / "a.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], small_checkpoint()["model"]["w"])
    assert loaded["step"] == 1


def test_failure_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_1.pt"
    save_checkpoint(small_checkpoint(step=1), path)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # half a file is on disk when the "crash" happens
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(small_checkpoint(step=2), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1.pt"]  # no temporary file left behind

    def failing_replace(src, dst):
        raise OSError("killed before the rename (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="before the rename"):
        save_checkpoint(small_checkpoint(step=3), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1.pt"]


def test_manager_failure_keeps_best_and_latest(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_best=1)
    manager.save(small_checkpoint(step=10, val_loss=2.0), 10, 2.0)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        manager.save(small_checkpoint(step=20, val_loss=1.0), 20, 1.0)
    monkeypatch.undo()
    fresh = CheckpointManager(tmp_path)
    assert fresh.latest().name == "checkpoint_10.pt"
    assert load_checkpoint(fresh.best())["step"] == 10


# ---------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; train a model first"):
        load_checkpoint(tmp_path / "nope.pt")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")


def test_truncated_file(tmp_path):
    path = save_checkpoint(small_checkpoint(), tmp_path / "a.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    (tmp_path / "g.pt").write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match="corrupt, truncated or not a checkpoint at all"):
        load_checkpoint(tmp_path / "g.pt")


def test_bare_state_dict_is_named(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="bare state_dict"):
        load_checkpoint(tmp_path / "sd.pt")


class Sneaky:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": FORMAT, "payload": Sneaky()}, f, protocol=2)
    with zipfile.ZipFile(tmp_path / "evil_zip.pt", "w") as z:  # the layout torch.save uses
        z.writestr("evil_zip/data.pkl", pickle.dumps({"format": FORMAT, "payload": Sneaky()}, protocol=2))
        z.writestr("evil_zip/version", "3\n")
    with pytest.raises(ValueError, match="not a checkpoint at all"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="could run code while loading, so it is refused"):
        load_checkpoint(tmp_path / "evil_zip.pt")
    with pytest.raises(ValueError, match="not a checkpoint at all"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out


def test_newer_version_is_refused(tmp_path):
    save_checkpoint(small_checkpoint() | {"version": 99}, tmp_path / "v.pt")
    with pytest.raises(ValueError, match="version 99.*upgrade"):
        load_checkpoint(tmp_path / "v.pt")


# ---------------------------------------------------------------------------------------------
# retention and best.pt
# ---------------------------------------------------------------------------------------------
def test_keeps_best_n_plus_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_best=2)
    for step, val in [(1, 5.0), (2, 3.0), (3, 4.0), (4, 1.0), (5, 6.0)]:
        manager.save(small_checkpoint(step, val), step, val)
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pt"))
    assert names == ["checkpoint_2.pt", "checkpoint_4.pt", "checkpoint_5.pt"]  # best two + latest
    assert load_checkpoint(manager.best())["step"] == 4
    assert manager.latest().name == "checkpoint_5.pt"
    # A new manager on the same folder (a resumed run) rebuilds the same picture from the files.
    again = CheckpointManager(tmp_path, keep_best=2)
    assert [(i.step, i.val_loss) for i in again.checkpoints()] == [(2, 3.0), (4, 1.0), (5, 6.0)]
    again.save(small_checkpoint(6, 2.0), 6, 2.0)
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pt"))
    assert names == ["checkpoint_4.pt", "checkpoint_6.pt"]  # 6 is both among the best and the latest
    assert load_checkpoint(again.best())["step"] == 4  # 2.0 does not beat 1.0


def test_keep_best_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_best"):
        CheckpointManager(tmp_path, keep_best=0)


# ---------------------------------------------------------------------------------------------
# random number generators
# ---------------------------------------------------------------------------------------------
def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    save_checkpoint(small_checkpoint() | {"rng": state}, tmp_path / "r.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


# ---------------------------------------------------------------------------------------------
# models from checkpoints, production export
# ---------------------------------------------------------------------------------------------
def test_training_checkpoint_contents(trained):
    trainer, tmp = trained
    ckpt = load_checkpoint(tmp / "ckpt" / "run" / "checkpoint_6.pt")
    assert ckpt["format"] == FORMAT and ckpt["kind"] == "training" and ckpt["step"] == 6
    for key in ("model", "optimizer", "scheduler", "rng", "data_state", "config", "tokenizer", "train_loss",
                "val_loss", "epoch"):
        assert key in ckpt, key
    assert ckpt["config"]["model_type"] == "gpt" and ckpt["config"]["model"]["d_model"] == 32
    assert ckpt["config"]["training"]["max_steps"] == 6
    assert ckpt["tokenizer"] == trainer.tokenizer.to_dict()
    assert ckpt["data_state"]["batches_drawn"] == 6


def test_load_model_from_checkpoint(trained):
    trainer, tmp = trained
    model, tok, meta = load_model_from_checkpoint(tmp / "ckpt" / "run" / "checkpoint_6.pt")
    assert not model.training
    for a, b in zip(model.state_dict().values(), trainer.raw_model.state_dict().values()):
        assert torch.equal(a, b)
    assert tok.itos == trainer.tokenizer.itos
    assert meta["step"] == 6 and meta["val_loss"] == pytest.approx(trainer.val_loss)
    assert meta["perplexity"] == pytest.approx(np.exp(trainer.val_loss))


def test_production_export_is_smaller_and_generates(trained, tmp_path):
    _, tmp = trained
    src = tmp / "ckpt" / "run" / "checkpoint_6.pt"
    info = export_production(src, tmp_path / "model.pt")
    # AdamW keeps two moments per weight: dropping them (and RNG/data state) saves about two thirds.
    assert info["reduction"] > 2.5
    assert info["production_bytes"] == (tmp_path / "model.pt").stat().st_size
    prod = load_checkpoint(tmp_path / "model.pt")
    assert prod["kind"] == "production"
    assert not any(k in prod for k in ckpt_lib.TRAINING_ONLY_KEYS)
    assert prod["metrics"]["steps"] == 6 and prod["metrics"]["perplexity"] > 1
    model, tok, meta = load_model_from_checkpoint(tmp_path / "model.pt")
    text = sample_text(model, tok, "To be", max_new_tokens=20, temperature=0.8)
    assert len(text) == 20 and set(text) <= set(tok.itos)
    half = export_production(src, tmp_path / "model16.pt", dtype="float16")
    assert half["production_bytes"] < 0.7 * info["production_bytes"]
    model16, _, _ = load_model_from_checkpoint(tmp_path / "model16.pt")
    assert next(model16.parameters()).dtype == torch.float32  # loaded back as float32 for the CPU
    with pytest.raises(ValueError, match="dtype"):
        export_production(src, tmp_path / "x.pt", dtype="int4")


def test_production_file_cannot_resume(trained, tmp_path):
    trainer, tmp = trained
    export_production(tmp / "ckpt" / "run" / "checkpoint_6.pt", tmp_path / "model.pt")
    with pytest.raises(ValueError, match="production export"):
        trainer.resume(tmp_path / "model.pt")


def test_llama_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16,
                      tie_embeddings=False, pad_vocab_multiple=8, qk_norm=True)
    model = LlamaLM(cfg)
    chars = "".join(chr(ord("a") + i % 26) if i < 26 else chr(ord("A") + i - 26) for i in range(40))
    tok = CharTokenizer(chars)
    ids = torch.randint(0, 40, (500,))
    tc = TrainerConfig(max_steps=2, batch_size=2, warmup_steps=1, eval_interval=2, eval_batches=1,
                       progress=False, verbose=False, log_dir=str(tmp_path / "l"),
                       checkpoint_dir=str(tmp_path / "c"), experiment_name="llama")
    trainer = Trainer(model, tc, ids[:400], ids[400:], tokenizer=tok)
    trainer.train()
    loaded, _, meta = load_model_from_checkpoint(trainer.last_checkpoint)
    assert isinstance(loaded, LlamaLM) and meta["config"]["model_type"] == "llama"
    x = torch.randint(0, 40, (1, 8))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0])
