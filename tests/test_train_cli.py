"""`python -m tiny_transformer train / evaluate / bench train` end to end, on tiny models."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from tiny_transformer import bench_train
from tiny_transformer.checkpoint import (
    export_production,
    load_checkpoint,
    load_model_from_checkpoint,
)
from tiny_transformer.cli import main
from tiny_transformer.commands.train import parse_duration
from tiny_transformer.data import RandomBatchSampler, train_val_split
from tiny_transformer.training import read_log
from tiny_transformer.utils import repo_root

SHAKESPEARE = repo_root() / "data" / "tiny_shakespeare.txt"
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "model.d_ff=64", "--set", "model.max_seq_len=32", "--set", "training.batch_size=4",
        "--set", "training.eval_batches=2", "--set", "training.sample_tokens=20", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(("ROMEO:\nBut, soft! what light through yonder window breaks?\n"
                     "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n") * 40, encoding="utf-8")
    return path


def dirs(tmp_path):
    return ["--log-dir", str(tmp_path / "logs"), "--checkpoint-dir", str(tmp_path / "ckpt")]


def test_train_evaluate_resume(corpus, tmp_path, capsys):
    args = ["train", "--config", "tiny", "--data", str(corpus), "--max-steps", "6", "--eval-interval", "3",
            "--experiment-name", "quick_test", *dirs(tmp_path), *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out
    assert "CharTokenizer (vocabulary" in out and "parameters" in out
    assert "step      3: train loss" in out and "val loss" in out
    assert "--- sample at step 3 ---\nROMEO:" in out
    best = tmp_path / "ckpt" / "quick_test" / "best.pt"
    assert f'python -m tiny_transformer generate --checkpoint {best} --prompt "ROMEO:"' in out
    ckpt = load_checkpoint(tmp_path / "ckpt" / "quick_test" / "checkpoint_6.pt")
    assert ckpt["config"]["model"]["vocab_size"] == len(set(corpus.read_text(encoding="utf-8")))
    assert ckpt["config"]["data"]["path"] == str(corpus)
    records = read_log(tmp_path / "logs" / "quick_test" / "train.log")
    assert [r["step"] for r in records if r.get("val_loss") is not None and not r.get("event")] == [3, 6]

    assert main(["evaluate", "--experiment-name", "quick_test", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_3.pt" in out and "checkpoint_6.pt" in out and "best.pt" in out
    assert "perplexity" in out and "bits/char" in out

    assert main(["evaluate", "--checkpoint", str(best)]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "± " in out and "bits per character" in out

    # Starting again under the same name is refused: the old run would be mixed into the new one.
    assert main(args) == 1
    assert "already holds checkpoints" in capsys.readouterr().err

    assert args[5:7] == ["--max-steps", "6"]
    assert main([*args[:6], "9", *args[7:], "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 6" in out
    assert load_checkpoint(tmp_path / "ckpt" / "quick_test" / "checkpoint_9.pt")["step"] == 9
    steps = [r["step"] for r in read_log(tmp_path / "logs" / "quick_test" / "train.log")
             if r.get("val_loss") and not r.get("event")]
    assert steps == [3, 6, 9]

    assert main([*args, "--overwrite", "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "ckpt" / "quick_test").iterdir()) == ["best.pt", "checkpoint_3.pt"]


# --------------------------------------------------------------------------------------------
# Fine-tuning from the command line: train --init-from CHECKPOINT
# --------------------------------------------------------------------------------------------
# Another small text, written only with characters of `corpus` (the source model's vocabulary).
NEW_TEXT = ("JULIET:\nBut soft, Romeo! what light breaks through yonder window?\n"
            "ROMEO:\nO, wherefore art thou so bright?\n") * 12


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny model trained 4 steps (experiment "source"); returns (folder, best.pt, new text file)."""
    root = tmp_path_factory.mktemp("finetune")
    corpus = root / "corpus.txt"
    corpus.write_text(("ROMEO:\nBut, soft! what light through yonder window breaks?\n"
                       "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n") * 40, encoding="utf-8")
    assert set(NEW_TEXT) <= set(corpus.read_text(encoding="utf-8"))
    new_text = root / "new.txt"
    new_text.write_text(NEW_TEXT, encoding="utf-8")
    assert main(["train", "--config", "tiny", "--data", str(corpus), "--max-steps", "4", "--eval-interval", "4",
                 "--experiment-name", "source", *dirs(root), *TINY]) == 0
    return root, root / "ckpt" / "source" / "best.pt", new_text


def finetune_args(root, source, data, name="ft", *extra):
    return ["train", "--init-from", str(source), "--data", str(data), "--experiment-name", name,
            *dirs(root), "--no-progress", *extra]


def test_init_from_starts_from_the_checkpoint_weights(source_run, capsys):
    root, best, new_text = source_run
    args = finetune_args(root, best, new_text, "ft", "--max-steps", "3", "--eval-interval", "3",
                         "--set", "training.log_interval=1")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"fine-tuning: weights, model config and tokenizer from {best} (training checkpoint, step 4" in out

    # The first logged loss is the source model's loss on the fine-tune's first batch: the weights
    # were loaded, and training started at step 0 (a fresh sampler over the new text).
    model, tokenizer, meta = load_model_from_checkpoint(best)
    train_text, _ = train_val_split(NEW_TEXT, 0.1)
    settings = meta["config"]["training"]
    sampler = RandomBatchSampler(torch.tensor(tokenizer.encode(train_text)), settings["batch_size"],
                                 model.max_seq_len, seed=settings["seed"])
    with torch.no_grad():
        expected = model(*sampler.next_batch())[1].item()
    steps = [r for r in read_log(root / "logs" / "ft" / "train.log") if not r.get("event")]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["train_loss"] == pytest.approx(expected, rel=1e-5)

    ckpt = load_checkpoint(root / "ckpt" / "ft" / "checkpoint_3.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["init_from"] == str(best)
    assert ckpt["config"]["model"] == meta["config"]["model"]  # the source's model, unchanged
    assert ckpt["config"]["data"]["path"] == str(new_text)
    assert ckpt["tokenizer"] == tokenizer.to_dict()
    assert ckpt["config"]["training"]["batch_size"] == settings["batch_size"]  # the source's settings

    # A fine-tuning run continues with --resume alone: model, settings and text come from its checkpoint.
    assert main(["train", "--resume", "--experiment-name", "ft", "--max-steps", "5", *dirs(root),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 3" in out
    resumed = load_checkpoint(root / "ckpt" / "ft" / "checkpoint_5.pt")
    assert resumed["config"]["model"] == meta["config"]["model"] and resumed["config"]["init_from"] == str(best)


def test_init_from_a_production_checkpoint(source_run, capsys):
    root, best, new_text = source_run
    production = root / "source_prod.pt"
    export_production(best, production, dtype="float16")
    assert main(finetune_args(root, production, new_text, "ft_prod", "--max-steps", "1")) == 0
    assert "(production checkpoint, step 4" in capsys.readouterr().out
    ckpt = load_checkpoint(root / "ckpt" / "ft_prod" / "checkpoint_1.pt")
    assert ckpt["config"]["model"] == load_checkpoint(best)["config"]["model"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--init-from: checkpoint|does not exist"),
        ("text file", "--init-from: checkpoint|not a checkpoint at all"),
        ("state_dict", "not a tiny-transformer checkpoint|bare state_dict"),
        ("unknown characters", "2 character(s) the tokenizer does not know: '7' x2, 'é' x1|fit_to_vocabulary"),
        ("resume", "--resume continues|give one of them"),
        ("same name", "'source' is the run|needs a new name"),
        ("no name", "--init-from needs --experiment-name"),
        ("preset", "the preset 'tiny' cannot apply"),
        ("model override", "--set model.d_model=64 cannot apply"),
    ],
)
def test_init_from_refuses_with_the_fix(source_run, tmp_path, capsys, case, message):
    root, best, new_text = source_run
    source, data, name, extra = best, new_text, "ft_err", []
    if case == "missing":
        source = tmp_path / "nope.pt"
    elif case == "text file":
        source = new_text
    elif case == "state_dict":
        source = tmp_path / "weights.pt"
        torch.save(load_checkpoint(best)["model"], source)
    elif case == "unknown characters":
        data = tmp_path / "accents.txt"
        data.write_text(NEW_TEXT + "O Romeo, thé light at 7, 7 bright?\n", encoding="utf-8")
    elif case == "resume":
        extra = ["--resume"]
    elif case == "same name":
        name = "source"
    elif case == "preset":
        extra = ["--config", "tiny"]
    elif case == "model override":
        extra = ["--set", "model.d_model=64"]
    args = finetune_args(root, source, data, name, *extra)
    if case == "no name":
        args = [a for a in args if a not in ("--experiment-name", name)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert all(m in err for m in message.split("|")), err
    assert not (root / "ckpt" / "ft_err").exists()  # nothing was trained


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="data/tiny_shakespeare.txt not downloaded")
def test_train_shortcut_on_tiny_shakespeare(tmp_path, capsys, monkeypatch):
    """`train shakespeare`: the preset name is enough (data and experiment name default)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "shakespeare", "--max-steps", "2", "--eval-interval", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "tiny_shakespeare.txt — 1,115,394 characters" in out
    assert "(vocabulary 65)" in out
    assert (tmp_path / "checkpoints" / "shakespeare" / "best.pt").exists()
    assert (tmp_path / "logs" / "shakespeare" / "train.log").exists()


def test_missing_dataset_points_to_the_download_command(tmp_path, capsys):
    rc = main(["train", "--config", "tiny", "--data", str(tmp_path / "nope.txt"), *dirs(tmp_path), *TINY])
    assert rc == 1
    err = capsys.readouterr().err
    assert "dataset not found" in err and "download_shakespeare.sh" in err and "tiny_transformer download" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "nonexistent"], "unknown preset 'nonexistent'"),
        (["--set", "training.batch_size=0"], "training.batch_size = 0 is invalid"),
        (["--set", "training.lr=-3"], "training.lr = -3 is invalid"),
        (["--set", "training.schedule=linear"], "choose one of cosine, stable_cooldown, constant"),
        (["--set", "training.seq_len=64"], "longer than the model's context"),
        (["--set", "training.warmup_steps=50", "--max-steps", "5"], "warmup_steps = 50 is larger"),
        (["--set", "training.bacth_size=3"], "did you mean 'batch_size'"),
        (["--set", "lr=3"], "SECTION.KEY=VALUE|model.NAME or training.NAME"),
        (["--max-time", "soon"], "not a duration"),
        (["--resume"], "no checkpoint in"),
    ],
)
def test_bad_command_lines_are_explained(corpus, tmp_path, capsys, extra, message):
    args = ["train", "--data", str(corpus), *dirs(tmp_path), *TINY, *extra]
    if "--config" not in extra:
        args += ["--config", "tiny"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert any(m in err for m in message.split("|")), err


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90
    assert parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("-5")


def test_max_time_on_the_command_line(corpus, tmp_path, capsys):
    rc = main(["train", "--config", "tiny", "--data", str(corpus), "--max-steps", "100000", "--max-time", "1s",
               "--experiment-name", "budget", *dirs(tmp_path), *TINY, "--set", "training.sample_interval=0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(max_time)" in out


def test_entry_point_in_a_subprocess(corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(repo_root())}
    proc = subprocess.run(
        [sys.executable, "-m", "tiny_transformer", "train", "--config", "tiny", "--data", str(corpus),
         "--max-steps", "2", "--eval-interval", "2", "--experiment-name", "sub", *dirs(tmp_path), *TINY],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "generate text with:" in proc.stdout


def _bench_args(**kw):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_bench_train_quality_runs_both_recipes(corpus, capsys):
    args = _bench_args(recipe="both", budget=0.5, data=str(corpus),
                       set=["model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "model.d_ff=64",
                            "training.batch_size=4", "training.warmup_steps=1"])
    assert bench_train.main(args) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "ours" in out and "± " in out


def test_bench_train_fixed_steps_are_reproducible(corpus, capsys):
    sets = ["model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "model.d_ff=64", "training.batch_size=4"]
    losses = []
    for _ in range(2):
        assert bench_train.main(_bench_args(recipe="ours", steps=3, data=str(corpus), set=sets)) == 0
        out = capsys.readouterr().out
        assert "3 steps of training" in out
        row = [line for line in out.splitlines() if line.startswith("ours")][-1]
        losses.append(row.split()[-3])  # the val loss column (before "± stderr")
        assert row.split()[2] == "3"
    assert losses[0] == losses[1]  # no clock involved: the same numbers every time
    with pytest.raises(ValueError, match="--steps must be a positive"):
        bench_train.main(_bench_args(steps=0, data=str(corpus)))


BENCH_SMALL = ["model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "model.d_ff=64",
               "training.batch_size=4", "training.warmup_steps=1"]


def test_time_steps_is_positive_and_small_models_are_fast(corpus):
    tokenizer, train_ids, _ = bench_train._load_shakespeare(str(corpus))
    cfg = bench_train.apply_overrides(bench_train.recipe("ours"), BENCH_SMALL)
    dt = bench_train.time_steps(cfg, tokenizer.vocab_size, train_ids, steps=3, warmup=1)
    assert 0 < dt < 5


def test_match_budget_trains_the_steps_that_fit_and_caps_step_recipes(corpus, capsys, monkeypatch):
    # 0.25 s per step and a 2 s budget would be 8 steps, but both recipes end at max_steps = 5, as
    # time-limited runs would.
    monkeypatch.setattr(bench_train, "time_steps", lambda *a, **k: 0.25)
    args = _bench_args(recipe="both", budget=2.0, match_budget=True, data=str(corpus),
                 set=BENCH_SMALL + ["training.max_steps=5"])
    assert bench_train.main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-2:]}
    assert rows["reference"][2] == "5"
    assert rows["ours"][2] == "5"  # max_steps ends a clock-scheduled run too


def test_match_budget_spans_the_clock_schedule_over_the_matched_steps(corpus, capsys, monkeypatch):
    monkeypatch.setattr(bench_train, "time_steps", lambda *a, **k: 0.25)
    assert bench_train.main(_bench_args(recipe="ours", budget=2.0, match_budget=True, data=str(corpus), set=BENCH_SMALL)) == 0
    out = capsys.readouterr().out
    assert "-> " in out and out.splitlines()[-1].split()[2] == "8"


def test_match_budget_and_steps_exclude_each_other(corpus):
    with pytest.raises(ValueError, match="exclude each other"):
        bench_train.main(_bench_args(steps=3, match_budget=True, data=str(corpus)))


def test_bench_train_throughput(capsys):
    args = _bench_args(throughput=True, presets="tiny", seconds=0.1, batch_size=2)
    assert bench_train.main(args) == 0
    out = capsys.readouterr().out
    assert "FLOPs/token = 6*N + 12*L*T*d" in out
    row = next(line for line in out.splitlines() if line.startswith("tiny"))
    assert float(row.split()[-1]) > 0  # GFLOP/s


def test_flops_formula():
    from tiny_transformer.config import build_model

    model = build_model("tiny", vocab_size=65)
    cfg = model.config
    n = model.num_parameters() - model.pos_embedding.weight.numel()  # tied head counted once
    assert bench_train.flops_per_token(model, 128) == 6 * n + 12 * cfg.n_layers * 128 * cfg.d_model
