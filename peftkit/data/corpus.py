"""The sentiment corpus: four domains of human-rated snippets, fetched, verified and split.

Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media
Text" (ICWSM 2014), collected mean human ratings (about -4 to +4) for movie-review snippets,
Amazon review snippets, New York Times editorial snippets and tweets. The files ship inside the
vaderSentiment 3.3.2 source distribution on PyPI (MIT licence), so `fetch()` downloads that
sdist with pip, checks two pinned sha256 digests, and extracts the four ground-truth files
under `data/`. Nothing is fetched at import time.
"""

from __future__ import annotations

import hashlib
import html
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]  # the repository: peftkit/<layer>/<module>.py
SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
FILES = {  # domain -> file inside hutto_ICWSM_2014/ (rows in the file)
    "movies": "movieReviewSnippets_GroundTruth.txt",   # 10,605
    "amazon": "amazonReviewSnippets_GroundTruth.txt",  # 3,708
    "nyt": "nytEditorialSnippets_GroundTruth.txt",     # 5,190
    "tweets": "tweets_GroundTruth.txt",                # 4,200
}
DOMAINS = tuple(FILES) + ("all",)
HOW_TO_GET = ("Run `make data` (it needs PyPI), or by hand: `pip download --no-deps --no-binary :all: "
              "vadersentiment==3.3.2 -d /tmp/v` and then `python -m peftkit data --sdist "
              f"/tmp/v/{SDIST}`. The folder can be moved with PEFTKIT_DATA=/path.")


class CorpusError(FileNotFoundError):
    """The corpus is missing, cannot be fetched, or failed its checksum."""


def data_dir() -> Path:
    return Path(os.environ.get("PEFTKIT_DATA", ROOT / "data"))


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def install_sdist(sdist: Path, dest: Path | None = None) -> Path:
    """Verify the vaderSentiment sdist and extract the four ground-truth files into `dest`."""
    dest = Path(dest or data_dir())
    blob = Path(sdist).read_bytes()
    if _sha256(blob) != SDIST_SHA256:
        raise CorpusError(f"{sdist} does not have the pinned sha256 {SDIST_SHA256} (got "
                          f"{_sha256(blob)}); refusing to use it. Download it again. {HOW_TO_GET}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as outer:
        inner = outer.extractfile(INNER).read()
    if _sha256(inner) != INNER_SHA256:
        raise CorpusError(f"{INNER} inside {sdist} failed its pinned sha256; refusing to use it.")
    out = dest / "hutto_ICWSM_2014"
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
        for name in FILES.values():
            data = tar.extractfile(f"hutto_ICWSM_2014/{name}").read()
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(out / name)  # atomic: a killed fetch never leaves half a file
    (dest / "SHA256SUMS").write_text(f"{SDIST_SHA256}  {SDIST}\n{INNER_SHA256}  {INNER}\n")
    return dest


def fetch(dest: Path | None = None, quiet: bool = True) -> Path:
    """Download the vaderSentiment 3.3.2 sdist with pip, verify it and extract the corpus."""
    dest = Path(dest or data_dir())
    if all((dest / "hutto_ICWSM_2014" / f).exists() for f in FILES.values()):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "vadersentiment==3.3.2", "-d", tmp] + (["-q"] if quiet else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdist = Path(tmp) / SDIST
        if proc.returncode != 0 or not sdist.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CorpusError(f"could not download the corpus with pip ({tail[0]}). {HOW_TO_GET}")
        return install_sdist(sdist, dest)


def _read_domain(path: Path, domain: str) -> pd.DataFrame:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip("\r\n").split("\t", 2)
        if len(parts) != 3 or not parts[2].strip():
            continue
        text = parts[2].strip()
        for _ in range(2):  # some snippets are escaped twice ("&amp;amp;")
            text = html.unescape(text)
        rows.append((int(parts[0]), float(parts[1]), text))
    return pd.DataFrame(rows, columns=["id", "rating", "text"]).assign(domain=domain)


def load_corpus(domain: str = "movies", fetch_missing: bool = True) -> pd.DataFrame:
    """A DataFrame with columns text, rating, label, domain (and id).

    label is 1 for a mean rating above 0 and 0 below it; exact zeros are dropped, and their
    count is kept in `df.attrs["dropped_zero"]` (per domain in `df.attrs["dropped_by_domain"]`).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {list(DOMAINS)}.")
    root = data_dir() / "hutto_ICWSM_2014"
    names = list(FILES) if domain == "all" else [domain]
    if not all((root / FILES[d]).exists() for d in names):
        if not fetch_missing:
            raise CorpusError(f"the sentiment corpus is not in {root}. {HOW_TO_GET}")
        fetch()
    frames, dropped = [], {}
    for d in names:
        df = _read_domain(root / FILES[d], d)
        dropped[d] = int((df.rating == 0).sum())
        frames.append(df[df.rating != 0])
    df = pd.concat(frames, ignore_index=True)
    df["label"] = (df.rating > 0).astype(int)
    df = df[["text", "rating", "label", "domain", "id"]]
    df.attrs.update(dropped_zero=sum(dropped.values()), dropped_by_domain=dropped)
    return df


def summary() -> pd.DataFrame:
    """Per domain: rows kept, zeros dropped, share positive, median length in words."""
    rows = []
    for d in FILES:
        df = load_corpus(d)
        rows.append({"domain": d, "rows": len(df), "dropped_zero": df.attrs["dropped_zero"],
                     "positive": round(df.label.mean(), 4),
                     "median_words": int(df.text.str.split().str.len().median())})
    return pd.DataFrame(rows)


def split(df: pd.DataFrame, seed: int = 0, fractions=(0.8, 0.1, 0.1)):
    """Stratified (by label, and by domain when there are several), deterministic split.

    Returns a dict with "train", "val" and "test" DataFrames.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}.")
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    keys = ["domain", "label"] if "domain" in df else ["label"]
    for _, group in df.groupby(keys, sort=True):
        idx = group.index.to_numpy()[rng.permutation(len(group))]
        n_val, n_test = int(round(fractions[1] * len(idx))), int(round(fractions[2] * len(idx)))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {k: df.loc[np.sort(np.concatenate(v))].reset_index(drop=True) for k, v in parts.items()}


def sample_rows(df: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of `n` rows of `df` (its own index kept), or `df` itself when n is None or
    not smaller: the one way every study caps an evaluation split."""
    return df if n is None or len(df) <= n else df.sample(n, random_state=seed)


def subset(splits: dict, n_train: int | None = None, n_eval: int | None = None, seed: int = 0,
           domain: str = "this domain") -> dict:
    """`splits` with the training split sampled down to `n_train` rows (re-indexed 0..n-1) and
    every other split capped at `n_eval`, all seeded by `seed`. Refuses an impossible n_train."""
    out = {k: sample_rows(v, n_eval, seed) if k != "train" else v for k, v in splits.items()}
    if n_train is not None and "train" in out:
        train = out["train"]
        if not isinstance(n_train, int) or isinstance(n_train, bool) or not 2 <= n_train <= len(train):
            raise ValueError(f"n_train must be between 2 and {len(train)} for {domain}, got {n_train!r}.")
        out["train"] = train.sample(n_train, random_state=seed).reset_index(drop=True)
    return out
