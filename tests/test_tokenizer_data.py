"""CharTokenizer and the data pipeline (split, TextDataset windows, RandomBatchSampler)."""

from pathlib import Path

import pytest
import torch

from tiny_transformer.data import RandomBatchSampler, TextDataset, load_text, train_val_split
from tiny_transformer.tokenizers import CharTokenizer, UnknownCharacterError, tokenizer_from_dict

SHAKESPEARE = Path(__file__).resolve().parent.parent / "data" / "tiny_shakespeare.txt"


def test_char_tokenizer_round_trip_and_vocab():
    tok = CharTokenizer().fit("hello world")
    assert tok.vocab == {" ": 0, "d": 1, "e": 2, "h": 3, "l": 4, "o": 5, "r": 6, "w": 7}
    assert tok.vocab_size == 8
    ids = tok.encode("hello")
    assert ids == [3, 2, 4, 4, 5]
    assert tok.decode(ids) == "hello"
    assert tok.decode(torch.tensor(ids)) == "hello"


def test_unknown_character_names_char_and_position():
    tok = CharTokenizer().fit("abc")
    with pytest.raises(UnknownCharacterError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 7])


def test_tokenizer_save_load(tmp_path):
    tok = CharTokenizer().fit("Ünïcode text ✓\n")
    path = tmp_path / "tok.json"
    tok.save(path)
    back = CharTokenizer.load(path)
    assert back.vocab == tok.vocab
    assert tokenizer_from_dict(tok.to_dict()).encode("✓") == tok.encode("✓")
    with pytest.raises(ValueError, match="fit"):
        CharTokenizer().encode("a")


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="data/tiny_shakespeare.txt not prepared")
def test_shakespeare_vocabulary_is_65():
    text = load_text(SHAKESPEARE)
    tok = CharTokenizer().fit(text)
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(text[:1000])) == text[:1000]


def test_load_text_missing_points_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_shakespeare.sh"):
        load_text(tmp_path / "nope.txt")


def test_temporal_split_keeps_the_end_for_validation():
    data = list(range(100))
    train, val = train_val_split(data, 0.1)
    assert train == list(range(90)) and val == list(range(90, 100))
    with pytest.raises(ValueError):
        train_val_split(data, 1.5)


@pytest.mark.parametrize("n,seq_len,stride,expected", [
    (100, 10, 10, 9),   # floor((100-11)/10)+1
    (100, 10, 1, 90),
    (100, 10, 3, 30),
    (11, 10, 5, 1),     # exactly one window fits
    (10, 10, 1, 0),     # too short: no window has a target for its last token
])
def test_dataset_lengths(n, seq_len, stride, expected):
    ds = TextDataset(torch.arange(n), seq_len, stride)
    assert len(ds) == expected
    for i in range(len(ds)):  # every window is in range and shifted by one
        x, y = ds[i]
        assert x.shape == y.shape == (seq_len,)
        assert torch.equal(y, x + 1)
        assert x[0].item() == i * stride


def test_dataset_index_errors_and_negative_index():
    ds = TextDataset(torch.arange(50), 8, 4)
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="stride"):
        TextDataset(torch.arange(50), 8, 0)


def test_random_batches_are_shifted_windows_and_resumable():
    tokens = torch.arange(1000)
    sampler = RandomBatchSampler(tokens, batch_size=4, seq_len=16, seed=3)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    state = sampler.state_dict()
    expected = [sampler.next_batch()[0] for _ in range(3)]
    resumed = RandomBatchSampler(tokens, batch_size=4, seq_len=16, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in expected)
    assert resumed.batches_drawn == 4


def test_random_batches_cover_the_whole_range():
    tokens = torch.arange(40)
    sampler = RandomBatchSampler(tokens, batch_size=64, seq_len=8, seed=0)
    starts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(20)])
    assert starts.min() == 0 and starts.max() == 40 - 8 - 1


def test_sampler_rejects_short_text():
    with pytest.raises(ValueError, match="too short"):
        RandomBatchSampler(torch.arange(5), 2, 8)
