"""Trainer, schedules, optimizer groups, logs and exact resume (tiny models: fast on 2 CPU cores)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig
from tiny_transformer.tokenizers import CharTokenizer
from tiny_transformer.training import (
    Muon,
    Trainer,
    TrainerConfig,
    TrainingDiverged,
    apply_overrides,
    classify_parameters,
    evaluate_loss,
    lr_at,
    lr_multiplier,
    orthogonalize,
    read_log,
    sample_text,
)

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
) * 20


@pytest.fixture(scope="module")
def data():
    tok = CharTokenizer().fit(TEXT)
    ids = torch.tensor(tok.encode(TEXT), dtype=torch.long)
    n = int(len(ids) * 0.9)
    return tok, ids[:n], ids[n:]


def tiny_model(vocab_size, dropout=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_seq_len=16, dropout=dropout)
    cfg.update(kw)
    return TinyTransformerLM(TransformerConfig(**cfg))


def tiny_config(tmp_path, **kw):
    cfg = dict(max_steps=10, batch_size=4, warmup_steps=2, eval_interval=5, eval_batches=2, log_interval=1,
               progress=False, verbose=False, log_dir=str(tmp_path / "logs"),
               checkpoint_dir=str(tmp_path / "checkpoints"), experiment_name="run")
    cfg.update(kw)
    return TrainerConfig(**cfg)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
def test_cosine_schedule_matches_hand_computed_values():
    m = lambda step: lr_multiplier("cosine", step, max_steps=110, warmup_steps=10, min_ratio=0.1)  # noqa: E731
    assert m(0) == pytest.approx(0.1)  # warm-up: (0 + 1) / 10
    assert m(4) == pytest.approx(0.5)
    assert m(9) == pytest.approx(1.0)
    assert m(10) == pytest.approx(1.0)  # decay starts at the top
    assert m(60) == pytest.approx(0.55)  # half way: 0.1 + 0.9 * 0.5
    assert m(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert m(110) == pytest.approx(0.1)
    assert m(500) == pytest.approx(0.1)  # past the end: stays at the floor


def test_stable_cooldown_and_constant_schedules():
    m = lambda step: lr_multiplier("stable_cooldown", step, 100, 0, 0.0, cooldown_frac=0.2)  # noqa: E731
    assert m(0) == 1.0 and m(50) == 1.0 and m(80) == 1.0
    assert m(90) == pytest.approx(0.5)
    assert m(95) == pytest.approx(0.25)
    assert m(100) == pytest.approx(0.0)
    assert lr_multiplier("constant", 3, 100, warmup_steps=4) == pytest.approx(1.0)
    assert lr_multiplier("constant", 1, 100, warmup_steps=4) == pytest.approx(0.5)
    assert lr_multiplier("constant", 99, 100) == 1.0


def test_progress_overrides_step_for_time_budgets():
    assert lr_multiplier("cosine", 5, 10_000, 0, 0.0, progress=0.5) == pytest.approx(0.5)
    assert lr_multiplier("stable_cooldown", 5, 10_000, 0, 0.0, 0.5, progress=0.75) == pytest.approx(0.5)


def test_lr_at_uses_min_lr():
    cfg = TrainerConfig(max_steps=100, warmup_steps=0, lr=1e-3, min_lr=2e-4)
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 100) == pytest.approx(2e-4)
    assert TrainerConfig(lr=1e-3).min_lr_value == pytest.approx(1e-4)  # default floor: lr / 10


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="cosine, stable_cooldown, constant"):
        lr_multiplier("linear", 0, 10)


# ---------------------------------------------------------------------------------------------
# parameter groups and optimizers
# ---------------------------------------------------------------------------------------------
def test_parameter_groups_tied_gpt(data, tmp_path):
    tok, train, val = data
    model = tiny_model(tok.vocab_size)
    groups = {k: [n for n, _ in v] for k, v in classify_parameters(model).items()}
    assert groups["embedding"] == ["tok_embeddings.weight", "pos_embedding.weight"]
    assert groups["head"] == []  # tied: the head is the embedding, counted once
    assert "layers.0.attention.qkv.weight" in groups["matrix"]
    assert "layers.0.feed_forward.w2.weight" in groups["matrix"]
    assert all(n.endswith(("bias", "norm.weight")) for n in groups["scalar"])
    total = sum(len(v) for v in groups.values())
    assert total == len(list(model.parameters()))

    cfg = tiny_config(tmp_path, weight_decay=0.1, embedding_lr=5e-3, scalar_lr=2e-3)
    trainer = Trainer(model, cfg, train, val)
    by_name = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert by_name["embedding"]["base_lr"] == 5e-3 and by_name["embedding"]["weight_decay"] == 0.1
    assert by_name["matrix"]["base_lr"] == 1e-3 and by_name["matrix"]["weight_decay"] == 0.1
    assert by_name["scalar"]["base_lr"] == 2e-3 and by_name["scalar"]["weight_decay"] == 0.0
    # The schedule scales every group by the same factor.
    trainer.step = 0
    trainer._set_lr(None)
    assert by_name["embedding"]["lr"] == pytest.approx(5e-3 * 0.5)  # warm-up step 1 of 2
    assert by_name["scalar"]["lr"] == pytest.approx(2e-3 * 0.5)


def test_parameter_groups_untied_llama_head():
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, max_seq_len=16,
                                tie_embeddings=False, pad_vocab_multiple=8))
    groups = {k: [n for n, _ in v] for k, v in classify_parameters(model).items()}
    assert groups["head"] == ["output.weight"]
    assert groups["embedding"] == ["tok_embeddings.weight"]
    assert "layers.0.feed_forward.w3.weight" in groups["matrix"]


def test_orthogonalize_gives_unit_singular_values():
    torch.manual_seed(0)
    g = torch.randn(32, 64)
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(orthogonalize(g).flatten(), (u @ vh).flatten(), dim=0)
    assert cos > 0.95
    tall = orthogonalize(torch.randn(64, 16))  # tall matrices are handled through the transpose
    assert tall.shape == (64, 16)
    assert torch.linalg.svdvals(tall).max() < 1.3


def test_muon_optimizer_trains(data, tmp_path):
    tok, train, val = data
    cfg = tiny_config(tmp_path, optimizer="muon", matrix_lr=0.02, lr=3e-3, max_steps=15, eval_interval=15)
    trainer = Trainer(tiny_model(tok.vocab_size), cfg, train, val)
    assert isinstance(trainer.optimizer, Muon)
    assert [g["use_muon"] for g in trainer.optimizer.param_groups if g["name"] == "matrix"] == [True]
    first = trainer.evaluate()
    trainer.train()
    assert trainer.val_loss < first - 0.3


def test_gradient_accumulation_equals_big_batch(data, tmp_path):
    tok, train, _ = data
    torch.manual_seed(1)
    starts = torch.randint(0, len(train) - 17, (8,))
    windows = train[starts[:, None] + torch.arange(17)]
    x, y = windows[:, :-1], windows[:, 1:]
    results = []
    for accum, batches in ((1, [(x, y)]), (2, [(x[:4], y[:4]), (x[4:], y[4:])]), (4, [(x[i:i + 2], y[i:i + 2])
                                                                                      for i in range(0, 8, 2)])):
        model = tiny_model(tok.vocab_size).double()
        cfg = tiny_config(tmp_path, batch_size=8 // accum, grad_accum_steps=accum, grad_clip=0.5)
        trainer = Trainer(model, cfg, train)
        loss = trainer.train_step(batches)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    # The model computes the loss in float32 even for a float64 model, hence the tolerances.
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6)
        for a, b in zip(params, results[0][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    # ...and the step really moved the weights (so the comparison is not vacuous).
    assert not torch.allclose(results[0][1][0], tiny_model(tok.vocab_size).double().tok_embeddings.weight)


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(data, tmp_path, optimizer):
    """N steps in one go == N/2 steps, a fresh process-like restart from the checkpoint, N/2 more."""
    tok, train, val = data
    kw = dict(max_steps=12, grad_accum_steps=2, eval_interval=4, optimizer=optimizer, lr=3e-3)
    full = Trainer(tiny_model(tok.vocab_size, dropout=0.1), tiny_config(tmp_path / "a", **kw), train, val, tok)
    full.train()
    expected = [h["loss"] for h in full.history]

    first = Trainer(tiny_model(tok.vocab_size, dropout=0.1), tiny_config(tmp_path / "b", **kw), train, val, tok)
    summary = first.train(steps=6)
    assert summary["stopped_by"] == "steps" and summary["steps"] == 6
    # Scramble every random generator: resume must restore them, not rely on them being untouched.
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    second = Trainer(tiny_model(tok.vocab_size, dropout=0.1, seed=5), tiny_config(tmp_path / "b", **kw),
                     train, val, tok)
    second.resume()
    assert second.step == 6
    second.train()
    resumed = [h["loss"] for h in first.history] + [h["loss"] for h in second.history]
    assert len(resumed) == len(expected) == 12
    assert resumed == expected  # bit-exact on the CPU
    for a, b in zip(full.raw_model.parameters(), second.raw_model.parameters()):
        assert torch.equal(a, b)
    # The log keeps one record per step: the resumed run replaced nothing and duplicated nothing.
    steps = [r["step"] for r in read_log(tmp_path / "b" / "logs" / "run" / "train.log") if "train_loss" in r
             and not r.get("event")]
    assert steps == list(range(1, 13))


def test_resume_rejects_a_different_model(data, tmp_path):
    tok, train, val = data
    Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path, max_steps=5), train, val, tok).train()
    other = Trainer(tiny_model(tok.vocab_size, d_ff=128), tiny_config(tmp_path, max_steps=5), train, val, tok)
    with pytest.raises(ValueError, match="different model config.*d_ff"):
        other.resume()


def test_resume_without_checkpoint_says_what_to_do(data, tmp_path):
    tok, train, val = data
    trainer = Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path), train, val, tok)
    with pytest.raises(FileNotFoundError, match="without --resume"):
        trainer.resume()


# ---------------------------------------------------------------------------------------------
# stopping: budget, divergence
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_clock(monkeypatch):
    """A simulated clock for the training loop: every reading advances it by 0.01 s."""
    import tiny_transformer.training as training

    now = {"t": 0.0}

    def clock():
        now["t"] += 0.01
        return now["t"]

    monkeypatch.setattr(training, "_clock", clock)
    return now


def test_max_time_stops_and_saves(data, tmp_path, fake_clock):
    tok, train, val = data
    cfg = tiny_config(tmp_path, max_steps=10**6, max_time=0.2, eval_interval=10**5, warmup_steps=0)
    trainer = Trainer(tiny_model(tok.vocab_size), cfg, train, val, tok)
    summary = trainer.train()
    assert summary["stopped_by"] == "max_time"
    assert 3 < summary["steps"] < 20  # the loop reads the clock a few times per step
    assert summary["val_loss"] is not None  # evaluated where it stopped
    assert trainer.checkpoints.latest().name == f"checkpoint_{summary['steps']}.pt"


def test_schedule_by_time_anneals_within_the_budget(data, tmp_path, fake_clock):
    tok, train, val = data
    cfg = tiny_config(tmp_path, max_steps=10**6, max_time=0.3, schedule_by_time=True, warmup_steps=0,
                      eval_interval=10**5, log_interval=10**5, lr=1e-3, min_lr=1e-5, save_checkpoints=False)
    trainer = Trainer(tiny_model(tok.vocab_size), cfg, train, val, tok)
    trainer.train()
    lrs = [h["lr"] for h in trainer.history]
    assert len(lrs) > 5
    assert lrs[0] == pytest.approx(1e-3, rel=0.01)
    assert lrs[-1] < 1e-4  # the cosine is nearly done when the clock runs out
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    tok, train, val = data
    trainer = Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path, max_steps=20), train, val, tok)
    original_forward = trainer.model.forward
    calls = {"n": 0}

    def forward(idx, targets=None, **kw):
        calls["n"] += trainer.model.training  # count training forwards only (not evaluations)
        logits, loss = original_forward(idx, targets, **kw)
        if trainer.model.training and calls["n"] > 7:
            loss = loss * float("nan")
        return logits, loss

    trainer.model.forward = forward
    with pytest.raises(TrainingDiverged, match=r"step 8.*learning rate is too high.*fp16.*bad data"):
        trainer.train()
    ckpt_dir = tmp_path / "checkpoints" / "run"
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint_*.pt")) == ["checkpoint_5.pt"]
    from tiny_transformer.checkpoint import load_model_from_checkpoint

    model, _, meta = load_model_from_checkpoint(ckpt_dir / "checkpoint_5.pt")
    assert meta["step"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(r.get("event") == "diverged" for r in read_log(tmp_path / "logs" / "run"))


def test_bad_data_is_rejected_before_training(data, tmp_path):
    tok, train, val = data
    with pytest.raises(ValueError, match="too few for one window"):
        Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path), train[:10], val)
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(tiny_model(5), tiny_config(tmp_path), train, val)
    with pytest.raises(ValueError, match="1-D sequence"):
        Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path), train.view(2, -1), val)


# ---------------------------------------------------------------------------------------------
# configuration checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lr=-1.0), r"training.lr = -1.0 is invalid: the learning rate must be a positive"),
        (dict(batch_size=0), r"training.batch_size = 0 is invalid: it must be a positive integer"),
        (dict(warmup_steps=50, max_steps=10), r"warmup_steps = 50 is larger than training.max_steps = 10"),
        (dict(schedule="linear"), r"choose one of cosine, stable_cooldown, constant"),
        (dict(optimizer="sgd"), r"choose one of adamw, muon"),
        (dict(precision="fp8"), r"choose one of auto, fp32, bf16, fp16"),
        (dict(seq_len=64), r"seq_len = 64 is longer than the model's context \(max_seq_len = 16\)"),
        (dict(grad_accum_steps=0), r"grad_accum_steps = 0 is invalid"),
        (dict(min_lr=1.0), r"min_lr = 1.0 is invalid: it must lie between 0 and lr"),
        (dict(experiment_name="a/b"), r"experiment_name = 'a/b' is invalid"),
        (dict(schedule_by_time=True), r"schedule_by_time = True needs training.max_time"),
    ],
)
def test_bad_configs_are_rejected(data, tmp_path, change, message):
    tok, train, val = data
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path, **change), train, val)


def test_unknown_setting_suggests_the_right_name():
    with pytest.raises(ValueError, match=r"unknown training setting 'bacth_size' \(did you mean 'batch_size'"):
        TrainerConfig.from_dict({"bacth_size": 8})
    with pytest.raises(ValueError, match="'warmup_step'.*did you mean 'warmup_steps'"):
        TrainerConfig.from_dict({"warmup_step": 10})


def test_fp16_needs_a_gpu(data, tmp_path):
    tok, train, val = data
    with pytest.raises(ValueError, match="fp16' needs a CUDA GPU"):
        Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path, precision="fp16", device="cpu"), train, val)


def test_apply_overrides():
    base = {"model": {"dropout": 0.0}, "training": {"lr": 1e-3}}
    out = apply_overrides(base, ["training.lr=3e-4", "model.dropout=0.2", "training.schedule=constant",
                                 "training.max_time=null", "training.compile=true"])
    assert out["training"] == {"lr": 3e-4, "schedule": "constant", "max_time": None, "compile": True}
    assert out["model"]["dropout"] == 0.2
    assert base["training"]["lr"] == 1e-3  # the input is not modified
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        apply_overrides(base, ["training.lr"])
    with pytest.raises(ValueError, match="model.NAME or training.NAME"):
        apply_overrides(base, ["optim.lr=1"])


# ---------------------------------------------------------------------------------------------
# logs, evaluation, samples, plots
# ---------------------------------------------------------------------------------------------
def test_jsonl_log_contents(data, tmp_path):
    tok, train, val = data
    cfg = tiny_config(tmp_path, max_steps=20, log_interval=5, eval_interval=10)
    Trainer(tiny_model(tok.vocab_size), cfg, train, val, tok).train()
    records = read_log(tmp_path / "logs" / "run" / "train.log")
    assert records[0]["event"] == "start" and records[0]["config"]["training"]["max_steps"] == 20
    assert records[-1]["event"] == "end" and records[-1]["stopped_by"] == "max_steps"
    steps = [r for r in records if not r.get("event")]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    for r in steps:
        assert set(r) == {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed"}
        assert r["train_loss"] > 0 and r["tokens_per_s"] > 0 and r["elapsed"] > 0
    assert [r["val_loss"] is not None for r in steps] == [False, True, False, True]
    assert steps[-1]["lr"] == pytest.approx(lr_at(cfg, 19))


def test_evaluate_leaves_random_state_alone(data, tmp_path):
    tok, train, val = data
    trainer = Trainer(tiny_model(tok.vocab_size, dropout=0.2), tiny_config(tmp_path), train, val, tok)
    state = torch.get_rng_state()
    first = trainer.evaluate()
    assert trainer.evaluate() == first  # the same fixed batches every time
    text = sample_text(trainer.raw_model, tok, "First", max_new_tokens=10)
    assert len(text) == 10 and set(text) <= set(tok.itos)
    assert torch.equal(torch.get_rng_state(), state)
    assert trainer.sampler.batches_drawn == 0


def test_evaluate_loss_covers_the_split(data):
    tok, train, val = data
    model = tiny_model(tok.vocab_size)
    result = evaluate_loss(model, val, seq_len=16, batch_size=5)
    assert result["windows"] == (len(val) - 1) // 16
    assert result["tokens"] == result["windows"] * 16
    assert math.log(tok.vocab_size) - 0.3 < result["loss"] < math.log(tok.vocab_size) + 0.3  # untrained
    assert 0 < result["stderr"] < 0.1
    with pytest.raises(ValueError, match="too few"):
        evaluate_loss(model, val[:5], seq_len=16)


def test_sample_callback_and_live_plot_in_a_terminal(data, tmp_path, capsys):
    from tiny_transformer.viz import LiveLossPlot, plot_lr_schedule, plot_training_log, sparkline

    tok, train, val = data
    live = LiveLossPlot(every=5, path=tmp_path / "loss.png")
    cfg = tiny_config(tmp_path, max_steps=10, sample_interval=5, sample_tokens=8, verbose=True)
    Trainer(tiny_model(tok.vocab_size), cfg, train, val, tok, callbacks=[live]).train()
    out = capsys.readouterr().out
    assert "--- sample at step 5 ---" in out and "--- sample at step 10 ---" in out
    assert "val loss" in out
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert live.steps == list(range(1, 11)) and live.val_steps == [5, 10]

    headless = LiveLossPlot(every=5)  # no notebook, no path: a text chart per update
    Trainer(tiny_model(tok.vocab_size), tiny_config(tmp_path / "h", max_steps=10), train, val, tok,
            callbacks=[headless]).train()
    assert headless.lines_printed >= 2
    assert len(sparkline([3.0, 2.0, 1.0])) == 3 and sparkline([3.0, 2.0, 1.0])[0] == "█"

    import matplotlib.pyplot as plt

    ax = plot_training_log(tmp_path / "logs" / "run" / "train.log")
    assert len(ax.lines) == 2  # train and validation
    ax = plot_lr_schedule({"cosine": TrainerConfig(max_steps=50, warmup_steps=5),
                           "wsd": TrainerConfig(max_steps=50, warmup_steps=5, schedule="stable_cooldown")})
    assert len(ax.lines) == 2 and len(ax.lines[0].get_xdata()) == 50
    plt.close("all")


def test_every_preset_has_a_valid_training_section():
    from tiny_transformer.config import list_presets, load_preset

    for name in list_presets():
        preset = load_preset(name)
        assert "training" in preset, f"preset {name} has no training section"
        cfg = TrainerConfig.from_dict(preset["training"])
        cfg.validate(preset["model"].get("max_seq_len"))


def test_bf16_autocast_on_cpu(data, tmp_path):
    tok, train, val = data
    cfg = tiny_config(tmp_path, precision="bf16", max_steps=3, eval_interval=3, save_checkpoints=False)
    trainer = Trainer(tiny_model(tok.vocab_size), cfg, train, val, tok)
    assert trainer.precision == "bf16" and not trainer.scaler.is_enabled()  # bf16 needs no loss scaling
    summary = trainer.train()
    assert math.isfinite(summary["val_loss"])
    assert next(trainer.raw_model.parameters()).dtype == torch.float32  # weights stay float32


def test_failed_compile_falls_back_to_eager(data, tmp_path, capsys):
    tok, train, val = data
    cfg = tiny_config(tmp_path, max_steps=2, eval_interval=2, verbose=True, save_checkpoints=False)
    trainer = Trainer(tiny_model(tok.vocab_size), cfg, train, val, tok)

    def broken_compiled_model(*args, **kwargs):
        raise RuntimeError("C++ compiler not found (simulated)")

    trainer.model = broken_compiled_model  # what a failing torch.compile wrapper does on its first call
    trainer.train()
    assert "torch.compile failed (RuntimeError: C++ compiler not found (simulated))" in capsys.readouterr().out
    assert trainer.model is trainer.raw_model and trainer.step == 2
