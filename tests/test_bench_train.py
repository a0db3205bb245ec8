"""`bench train --match-budget`: the time budget turned into a number of steps per recipe."""

import argparse

import pytest

from tiny_transformer import bench_train

SMALL = ["model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "model.d_ff=64", "training.batch_size=4",
         "training.warmup_steps=1"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200, encoding="utf-8")
    return path


def _args(**kw):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_time_steps_is_positive_and_small_models_are_fast(corpus):
    tokenizer, train_ids, _ = bench_train._load_shakespeare(str(corpus))
    cfg = bench_train.apply_overrides(bench_train.recipe("ours"), SMALL)
    dt = bench_train.time_steps(cfg, tokenizer.vocab_size, train_ids, steps=3, warmup=1)
    assert 0 < dt < 5


def test_match_budget_trains_the_steps_that_fit_and_caps_step_recipes(corpus, capsys, monkeypatch):
    # 0.25 s per step and a 2 s budget would be 8 steps, but both recipes end at max_steps = 5, as
    # time-limited runs would.
    monkeypatch.setattr(bench_train, "time_steps", lambda *a, **k: 0.25)
    args = _args(recipe="both", budget=2.0, match_budget=True, data=str(corpus),
                 set=SMALL + ["training.max_steps=5"])
    assert bench_train.main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-2:]}
    assert rows["reference"][2] == "5"
    assert rows["ours"][2] == "5"  # max_steps ends a clock-scheduled run too


def test_match_budget_spans_the_clock_schedule_over_the_matched_steps(corpus, capsys, monkeypatch):
    monkeypatch.setattr(bench_train, "time_steps", lambda *a, **k: 0.25)
    assert bench_train.main(_args(recipe="ours", budget=2.0, match_budget=True, data=str(corpus), set=SMALL)) == 0
    out = capsys.readouterr().out
    assert "-> " in out and out.splitlines()[-1].split()[2] == "8"


def test_match_budget_and_steps_exclude_each_other(corpus):
    with pytest.raises(ValueError, match="exclude each other"):
        bench_train.main(_args(steps=3, match_budget=True, data=str(corpus)))
