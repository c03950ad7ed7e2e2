"""Measuring and exercising a `Deployer`: switch timings, resident memory, and a simulated
stream of requests recorded by a `Monitor`. Notebook 07 and benchmarks/bench_serve.py use these;
serving itself is in serve.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..serving.deployer import Deployer, check_texts


def swap_times(deployer: Deployer, names, repeats: int = 200) -> np.ndarray:
    """Seconds per switch, cycling through `names` (at least two) `repeats` times."""
    names = list(names)
    if len(names) < 2:
        raise ValueError("swap_times needs at least two adapter names to switch between.")
    for n in names:
        deployer.activate(n)  # build the live modules and warm the copies once
    cycle = itertools.islice(itertools.cycle(names), repeats)
    return np.array([deployer.activate(n) for n in cycle])


def serve_stream(deployer: Deployer, monitor, texts, labels, adapter: str, batch: int = 20,
                 stop_on: str | None = None) -> tuple[pd.DataFrame, list]:
    """Serve `texts` in requests of `batch` with `adapter`, recording every request in `monitor`
    with its true labels (here they arrive with the request; in production they come later).

    stop_on: "degradation" or "drift" stops after the first request that raises that kind of alert.
    Returns (one row per text served, with `truth`, `correct` and the monitor's position `n`;
    the alerts raised).
    """
    if stop_on not in (None, "degradation", "drift"):
        raise ValueError(f"stop_on must be None, 'degradation' or 'drift', got {stop_on!r}.")
    texts, labels = check_texts(texts), list(labels)
    if len(labels) != len(texts):
        raise ValueError(f"serve_stream got {len(texts)} texts and {len(labels)} labels; pass one label per text.")
    frames, raised = [], []
    for start in range(0, len(texts), batch):
        y = labels[start:start + batch]
        df = deployer.predict(texts[start:start + batch], adapter=adapter, batch_size=batch)
        new = monitor.record_frame(df, labels=y)
        frames.append(df.assign(truth=y, correct=df["label"].to_numpy() == np.asarray(y), n=monitor.seen))
        raised += new
        if stop_on and any(a["kind"] == stop_on for a in new):
            break
    served = pd.concat(frames, ignore_index=True) if frames else deployer.predict([], adapter=adapter)
    return served, raised
