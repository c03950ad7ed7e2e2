"""The corpus, the split and the loaders."""

import io
import tarfile

import pytest
import torch

from peftkit import data
from peftkit.data.loaders import EpochBatchSampler, make_loaders, padding_stats
from peftkit.bases.models import load_tokenizer

# rows in each file, rating-0 rows dropped, share positive among the rest (from the files)
EXPECTED = {"movies": (10605, 37, 0.4960), "amazon": (3708, 98, 0.5895),
            "nyt": (5190, 244, 0.4456), "tweets": (4200, 4, 0.6904)}


@pytest.mark.parametrize("domain", list(EXPECTED))
def test_corpus_counts_and_balance(domain):
    df = data.load_corpus(domain)
    rows, dropped, positive = EXPECTED[domain]
    assert len(df) == rows - dropped and df.attrs["dropped_zero"] == dropped
    assert df.label.mean() == pytest.approx(positive, abs=5e-5)
    assert list(df.columns[:4]) == ["text", "rating", "label", "domain"]
    assert (df.label == (df.rating > 0)).all() and (df.rating != 0).all()
    assert df.text.str.len().min() > 0 and not df.text.str.contains("&amp;").any()


def test_all_domains():
    df = data.load_corpus("all")
    assert len(df) == sum(r - d for r, d, _ in EXPECTED.values())
    assert set(df.domain) == set(EXPECTED)


def test_unknown_domain_lists_valid_ones():
    with pytest.raises(ValueError, match="movies.*amazon.*nyt.*tweets.*all"):
        data.load_corpus("reddit")


def test_missing_corpus_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_DATA", str(tmp_path))
    with pytest.raises(data.CorpusError, match="make data"):
        data.load_corpus("movies", fetch_missing=False)


def test_checksum_mismatch_is_refused(tmp_path):
    fake = tmp_path / data.SDIST
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        blob = b"1\t2.0\tnot the real corpus\n"
        info = tarfile.TarInfo(data.INNER)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    fake.write_bytes(buf.getvalue())
    with pytest.raises(data.CorpusError, match="sha256"):
        data.install_sdist(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_split_is_stratified_deterministic_and_disjoint():
    df = data.load_corpus("all")
    df["row"] = range(len(df))  # ids repeat within the amazon file, so track rows
    a, b = data.split(df, seed=0), data.split(df, seed=0)
    for k in a:
        assert a[k].equals(b[k])
    assert not data.split(df, seed=1)["test"].equals(a["test"])
    ids = [set(a[k].row) for k in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(len(a[k]) for k in a) == len(df)
    assert len(a["test"]) == pytest.approx(0.1 * len(df), rel=0.01)
    for d in EXPECTED:  # each domain and label keeps its share in every part
        full = (df.domain == d).mean()
        for k in a:
            assert (a[k].domain == d).mean() == pytest.approx(full, abs=0.01)
            assert a[k][a[k].domain == d].label.mean() == pytest.approx(df[df.domain == d].label.mean(), abs=0.02)
    with pytest.raises(ValueError, match="sum"):
        data.split(df, fractions=(0.5, 0.1, 0.1))


def test_loaders_pad_to_the_longest_in_each_batch():
    splits = data.split(data.load_corpus("tweets").head(300))
    loaders = make_loaders(load_tokenizer(), splits, batch_size=16, max_length=64)
    for batch in loaders["train"]:
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]  # no extra columns
        assert batch["labels"].dtype == torch.long


def test_bucketing_pads_less_and_padding_stats_count_it():
    splits = data.split(data.load_corpus("movies").sample(800, random_state=0))
    tok = load_tokenizer()
    random_order, bucketed = (padding_stats(make_loaders(tok, splits, batch_size=16, bucket=b)["train"])
                              for b in (False, True))
    assert bucketed.padding_share < 0.5 * random_order.padding_share
    # Same examples either way: the real tokens agree, only the padding differs.
    assert random_order.real_tokens == bucketed.real_tokens == sum(
        len(ids) for ids in tok(list(splits["train"].text), truncation=True, max_length=128)["input_ids"])
    assert random_order.batches == bucketed.batches == 40  # 640 training snippets / 16
    assert random_order.padding_share == round(1 - random_order.real_tokens / random_order.padded_tokens, 3)
    with pytest.raises(ValueError, match="no batches"):
        padding_stats([])


def test_evaluation_goes_shortest_first_and_pads_less_with_the_same_metrics():
    from peftkit.training.metrics import evaluate
    from peftkit.bases.models import load_base
    splits = data.split(data.load_corpus("movies").sample(400, random_state=0))
    model, tok = load_base("tiny", seed=0)
    by_len, as_is = (make_loaders(tok, splits, batch_size=16, eval_batch_size=8, eval_by_length=e)["test"]
                     for e in (True, False))
    lengths = [int(m.sum()) for b in by_len for m in b["attention_mask"]]
    assert lengths == sorted(lengths) and len(lengths) == len(splits["test"])

    def padding(loader):
        return sum(int((b["attention_mask"] == 0).sum()) for b in loader)
    assert padding(by_len) < 0.5 * padding(as_is)
    a, b = evaluate(model, by_len, num_labels=2), evaluate(model, as_is, num_labels=2)
    assert a["accuracy"] == b["accuracy"] and a["confusion"] == b["confusion"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_sampler_epochs_skip_and_shards():
    s = EpochBatchSampler(list(range(50)), batch_size=8, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0 and sorted(sum(list(s), [])) == list(range(50))
    s.set_epoch(0, skip=2)
    assert list(s) == e0[2:] and len(s) == len(e0) - 2
    s.set_epoch(0)
    r0, r1 = s.shard(0, 2), s.shard(1, 2)
    for g, a, b in zip(e0, r0, r1):
        assert sorted(a + b) == sorted(g)
    with pytest.raises(ValueError, match="multiple"):
        s.shard(0, 3)
