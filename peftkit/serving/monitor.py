"""Watching a served model: rolling quality, degradation and drift alerts, export (the dashboard
figure is in monitor_dashboard.py).

Every prediction adds one example to a rolling window of the last `window` examples: its
confidence (the predicted label's probability), predicted label, input length in words, the
share of unknown tokens (from the Deployer's `unk_rate`), and, once a label arrives, whether it
was right. Two kinds of alert, each raised when its condition starts to hold (with a timestamp
and a reason) and answered by a "recovered" entry when it stops:

- degradation: rolling accuracy below `min_accuracy` (the article's rule), or more than
  `drop_tolerance` below the baseline (given, or the accuracy of the first full labelled window);
- drift: a statistic's distribution in the window has moved away from the reference window
  (the first `window` examples, or whatever `rebase()` sets), by the population stability index
  or the Kolmogorov-Smirnov test (equations in drift.py). Labels need not arrive for drift to be
  seen, which is why it is watched at all.

PSI's noise floor between two samples of one distribution is about (bins - 1)(1/n + 1/m): 0.09
for windows of 200 with 10 bins (measured 0.092, and above 0.2 in 2% of pairs), 0.18 for windows
of 100. Hence the defaults: window 200, threshold 0.25 (the convention's "major shift"), and a
warning for windows too small for the threshold. The checks run after every batch, so the KS
level is 0.001, not 0.05.

The predicted-label balance is always compared by PSI (it is categorical). Labels are the
ground truth of a sample; None marks an example whose label has not arrived.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..storage import append_lines, read_jsonl
from .dashboard import dashboard
from .drift import ks_2samp, psi, psi_categorical

CONTINUOUS = ("confidence", "length", "unk_rate")  # drift by `drift_test`; "prediction" by PSI


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _clean(v):
    """JSON-safe: NaN and inf become null, numpy scalars plain numbers, times ISO strings."""
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (datetime, pd.Timestamp)):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


class Monitor:
    """Rolling metrics of a served model, with degradation and drift alerts.

    Args:
        window: how many of the latest examples the rolling statistics cover (and the reference holds).
        min_accuracy: alert when rolling accuracy falls below this (the seed article's rule).
        drop_tolerance: alert when rolling accuracy falls more than this below `baseline`.
        baseline: the accuracy to hold; None takes the first full window of labelled examples.
        drift_test: "psi" or "ks", for confidence, length and unknown-token rate.
        psi_threshold: PSI above this is drift (0.25: the convention's "major shift").
        ks_alpha: a KS p-value below this is drift (0.001: every batch is a new test).
        min_labeled: labelled examples the window needs before accuracy alerts (None: the whole
            window; at 200 the rolling accuracy's standard error is about 0.03, under the 0.05 tolerance).
        name: written into every exported line, to tell monitors (and processes) apart.
    """

    def __init__(self, window: int = 200, min_accuracy: float = 0.8, drop_tolerance: float = 0.05,
                 baseline: float | None = None, drift_test: str = "psi", psi_threshold: float = 0.25,
                 ks_alpha: float = 0.001, min_labeled: int | None = None, name: str = "monitor", bins: int = 10):
        if not isinstance(window, int) or isinstance(window, bool) or window < 10:
            raise ValueError(f"window must be an integer of at least 10 examples, got {window!r}; 200 is a good start.")
        for label, v in (("min_accuracy", min_accuracy), ("drop_tolerance", drop_tolerance)):
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{label} must be a number in [0, 1], got {v!r}.")
        if baseline is not None and not (isinstance(baseline, (int, float)) and 0 <= baseline <= 1):
            raise ValueError(f"baseline must be an accuracy in [0, 1] or None, got {baseline!r}.")
        if drift_test not in ("psi", "ks"):
            raise ValueError(f"drift_test must be 'psi' or 'ks', got {drift_test!r}.")
        if not psi_threshold > 0 or not 0 < ks_alpha < 1:
            raise ValueError(f"psi_threshold must be positive and ks_alpha in (0, 1); got {psi_threshold!r}, {ks_alpha!r}.")
        floor = (bins - 1) * 2 / window  # PSI's mean between two same-distribution windows
        if drift_test == "psi" and floor > psi_threshold / 2:
            warnings.warn(f"window={window} with {bins} bins: PSI between two samples of the same distribution "
                          f"averages {floor:.2f}, so psi_threshold={psi_threshold} will raise false drift alerts. "
                          f"Use window >= {int(4 * (bins - 1) / psi_threshold) + 1} or fewer bins.", stacklevel=2)
        self.window, self.min_accuracy, self.drop_tolerance = window, float(min_accuracy), float(drop_tolerance)
        self.baseline = None if baseline is None else float(baseline)
        self.baseline_source = "given" if baseline is not None else None
        self.drift_test, self.psi_threshold, self.ks_alpha, self.bins = drift_test, psi_threshold, ks_alpha, bins
        self.min_labeled = min_labeled if min_labeled is not None else window
        self.name = name
        self._win: deque = deque(maxlen=window)
        self._ref: list | None = []  # filling up; a frozen list once it holds `window` examples
        self._ref_frozen = False
        self._ref_end = 0  # examples seen when the reference was taken
        self._rows: list[dict] = []
        self._alerts: list[dict] = []
        self._notes: list[dict] = []
        self._firing: dict = {}  # (kind, statistic) -> the alert that is holding
        self._n = 0
        self._exported = {"metrics": 0, "alert": 0, "note": 0}
        self._lock = threading.RLock()

    # -- input --------------------------------------------------------------------------------

    def record(self, texts, predictions, probabilities, labels=None, *, unk_rates=None, tag=None, now=None) -> list[dict]:
        """Add a batch of served examples. Returns the alerts this batch raised (or resolved).

        probabilities: the predicted label's probability per example, or a (n, classes) array.
        labels: the true labels, where known (None entries: not arrived yet).
        unk_rates: each text's unknown-token share (the Deployer's `unk_rate` column).
        """
        rows = self._check(texts, predictions, probabilities, labels, unk_rates)
        with self._lock:
            now = now or _now()
            for r in rows:
                self._win.append(r)
                if not self._ref_frozen:
                    self._ref.append(r)
                    if len(self._ref) == self.window:
                        self._ref_frozen, self._ref_end = True, self._n + 1
                self._n += 1
            row = self._metrics(rows, now, tag)
            self._rows.append(row)
            return self._judge(row, now, tag)

    def record_frame(self, df: pd.DataFrame, labels=None, *, tag=None, now=None) -> list[dict]:
        """`record` from a Deployer.predict frame (text, label, probability, unk_rate, adapter)."""
        missing = {"text", "label", "probability"} - set(df.columns)
        if missing:
            raise ValueError(f"record_frame needs the columns text, label and probability (as Deployer.predict "
                             f"returns); missing {sorted(missing)}.")
        if tag is None and "adapter" in df and len(df):
            tag = str(df["adapter"].iloc[0])
        unk = df["unk_rate"].tolist() if "unk_rate" in df else None
        return self.record(df["text"].tolist(), df["label"].tolist(), df["probability"].tolist(), labels,
                           unk_rates=unk, tag=tag, now=now)

    @property
    def seen(self) -> int:
        """Examples recorded so far."""
        return self._n

    def note(self, text: str, now=None) -> None:
        """Mark an event (say, "switched to tweets") at the current position; shown on the dashboard."""
        with self._lock:
            self._notes.append({"time": now or _now(), "n": self._n, "note": str(text)})

    def rebase(self) -> None:
        """Take the current window as the new drift reference (after a change you accept as normal),
        and its accuracy, when it has enough labels, as the new baseline."""
        with self._lock:
            self._ref, self._ref_frozen, self._ref_end = list(self._win), True, self._n
            acc, n_lab = self._accuracy(self._win)
            if n_lab >= self.min_labeled:
                self.baseline, self.baseline_source = acc, "rebased"

    def _check(self, texts, predictions, probabilities, labels, unk_rates) -> list[dict]:
        if isinstance(texts, str):
            raise TypeError("record takes a list of texts, got a single string; wrap it in a list.")
        texts, preds = list(texts), list(predictions)
        probs = np.asarray(probabilities, dtype=float)
        if probs.ndim == 2:
            probs = probs.max(axis=1)
        n = len(texts)
        given = {"predictions": len(preds), "probabilities": len(probs)}
        if labels is not None:
            labels = list(labels)
            given["labels"] = len(labels)
        if unk_rates is not None:
            unk_rates = list(unk_rates)
            given["unk_rates"] = len(unk_rates)
        wrong = {k: v for k, v in given.items() if v != n}
        if wrong:
            raise ValueError(f"record got {n} texts but {wrong}: pass one value per text.")
        rows = []
        for i in range(n):
            if not isinstance(texts[i], str):
                raise TypeError(f"texts[{i}] is {type(texts[i]).__name__}, not a string.")
            p = probs[i]
            if not 0 <= p <= 1:
                raise ValueError(f"probabilities[{i}] = {p!r} is not a probability in [0, 1].")
            y = labels[i] if labels is not None else None
            if y is not None and (isinstance(y, float) and math.isnan(y)):
                y = None
            u = float(unk_rates[i]) if unk_rates is not None and unk_rates[i] is not None else math.nan
            rows.append({"confidence": float(p), "prediction": int(preds[i]), "length": len(texts[i].split()),
                         "unk_rate": u, "correct": None if y is None else bool(int(y) == int(preds[i]))})
        return rows

    # -- statistics ---------------------------------------------------------------------------

    @staticmethod
    def _accuracy(examples) -> tuple[float, int]:
        done = [e["correct"] for e in examples if e["correct"] is not None]
        return (float(np.mean(done)) if done else math.nan), len(done)

    def _drift(self) -> dict:
        """Drift scores of the window against the reference, once there is enough to compare."""
        out = {}
        if not self._ref_frozen or self._n - self._ref_end < self.window // 2:
            return out
        for stat in CONTINUOUS:
            ref = np.array([e[stat] for e in self._ref], dtype=float)
            cur = np.array([e[stat] for e in self._win], dtype=float)
            ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
            if len(ref) < 10 or len(cur) < 10:
                continue  # e.g. no unknown-token rates were passed
            out[f"psi_{stat}"] = psi(ref, cur, self.bins)
            out[f"ks_{stat}"], out[f"ks_p_{stat}"] = ks_2samp(ref, cur)
        out["psi_prediction"] = psi_categorical([e["prediction"] for e in self._ref], [e["prediction"] for e in self._win])
        return out

    def _metrics(self, batch, now, tag) -> dict:
        acc, n_lab = self._accuracy(self._win)
        bacc, _ = self._accuracy(batch)
        preds = np.array([e["prediction"] for e in self._win])
        if self.baseline is None and n_lab >= self.window:
            self.baseline, self.baseline_source = acc, "first labelled window"
        row = {"time": now, "n": self._n, "batch": len(batch), "tag": tag, "accuracy": acc, "labeled": n_lab,
               "batch_accuracy": bacc, "confidence": float(np.mean([e["confidence"] for e in self._win])),
               "positive_share": float(np.mean(preds == 1)),
               "length": float(np.mean([e["length"] for e in self._win])),
               "unk_rate": float(np.nanmean([e["unk_rate"] for e in self._win]))
               if any(not math.isnan(e["unk_rate"]) for e in self._win) else math.nan,
               "baseline": self.baseline if self.baseline is not None else math.nan}
        row.update(self._drift())
        return row

    # -- alerts -------------------------------------------------------------------------------

    def _conditions(self, row) -> dict:
        """(kind, statistic) -> (holds, value, threshold, reason) for every check that can run now."""
        c = {}
        acc, n_lab = row["accuracy"], row["labeled"]
        if n_lab >= self.min_labeled:
            c[("degradation", "accuracy")] = (
                acc < self.min_accuracy, acc, self.min_accuracy,
                f"rolling accuracy {acc:.3f} over the last {n_lab} labelled examples is below min_accuracy {self.min_accuracy:.2f}")
            if self.baseline is not None:
                floor = self.baseline - self.drop_tolerance
                c[("degradation", "accuracy_drop")] = (
                    acc < floor, acc, floor,
                    f"rolling accuracy {acc:.3f} is more than {self.drop_tolerance:.2f} below the baseline "
                    f"{self.baseline:.3f} ({self.baseline_source}); the floor is {floor:.3f}")
        for stat in CONTINUOUS:
            if f"psi_{stat}" not in row:
                continue
            ref = np.array([e[stat] for e in self._ref], dtype=float)
            shift = f"mean {np.mean(ref[~np.isnan(ref)]):.3g} in the reference, {row[stat]:.3g} now"
            if self.drift_test == "psi":
                v = row[f"psi_{stat}"]
                c[("drift", stat)] = (v > self.psi_threshold, v, self.psi_threshold,
                                      f"{stat} drifted from the reference window: PSI {v:.3f} > {self.psi_threshold:.2f} ({shift})")
            else:
                d, p = row[f"ks_{stat}"], row[f"ks_p_{stat}"]
                c[("drift", stat)] = (p < self.ks_alpha, p, self.ks_alpha,
                                      f"{stat} drifted from the reference window: KS D={d:.3f}, p={p:.2g} < {self.ks_alpha:g} ({shift})")
        if "psi_prediction" in row:
            v = row["psi_prediction"]
            ref_share = float(np.mean([e["prediction"] == 1 for e in self._ref]))
            c[("drift", "prediction")] = (v > self.psi_threshold, v, self.psi_threshold,
                                          f"the predicted-label balance drifted: PSI {v:.3f} > {self.psi_threshold:.2f} "
                                          f"(label-1 share {ref_share:.2f} in the reference, {row['positive_share']:.2f} now)")
        return c

    def _judge(self, row, now, tag) -> list[dict]:
        raised = []
        for key, (holds, value, threshold, reason) in self._conditions(row).items():
            was = key in self._firing
            if holds and not was:
                alert = {"time": now, "n": row["n"], "kind": key[0], "statistic": key[1], "value": value,
                         "threshold": threshold, "reason": reason, "tag": tag}
                self._firing[key] = alert
            elif was and not holds:
                alert = {"time": now, "n": row["n"], "kind": "recovered", "statistic": key[1], "value": value,
                         "threshold": threshold, "tag": tag,
                         "reason": f"{key[0]} of {key[1]} resolved (raised at example {self._firing[key]['n']}): {value:.3f} now"}
                del self._firing[key]
            else:
                continue
            self._alerts.append(alert)
            raised.append(alert)
        return raised

    # -- output -------------------------------------------------------------------------------

    def frame(self) -> pd.DataFrame:
        """One row per `record` call: time, n (examples so far), tag, rolling accuracy, confidence,
        class balance, input length, unknown-token rate, baseline and drift scores."""
        with self._lock:
            return pd.DataFrame(self._rows)

    def alerts(self, active_only: bool = False) -> pd.DataFrame:
        """Every alert and recovery so far (time, n, kind, statistic, value, threshold, reason, tag)."""
        with self._lock:
            rows = list(self._firing.values()) if active_only else list(self._alerts)
        return pd.DataFrame(rows, columns=["time", "n", "kind", "statistic", "value", "threshold", "reason", "tag"])

    def notes(self) -> pd.DataFrame:
        with self._lock:
            return pd.DataFrame(self._notes, columns=["time", "n", "note"])

    def export(self, path) -> int:
        """Append everything not yet exported to `path` as JSON lines; returns the lines written.

        Each line is {"type": "metrics" | "alert" | "note", "monitor": name, "pid": ..., ...}. The
        whole batch goes out in one locked write (fcntl), so several processes can export to the
        same file at once without tearing each other's lines, and it starts on a fresh line, so a
        torn last line left by a killed writer never swallows the first new one
        (`storage.append_lines`).
        """
        with self._lock:
            parts = {"metrics": self._rows, "alert": self._alerts, "note": self._notes}
            lines = [json.dumps(_clean({"type": kind, "monitor": self.name, "pid": os.getpid(), **item}), allow_nan=False)
                     for kind, items in parts.items() for item in items[self._exported[kind]:]]
            append_lines(Path(path), lines, fsync=True)
            self._exported = {k: len(v) for k, v in parts.items()}
            return len(lines)

    def figure(self, title: str | None = None):
        """A plotly dashboard: accuracy, confidence and class balance, drift scores, inputs."""
        return dashboard(self, title)

    def __repr__(self):
        firing = ", ".join(f"{k}:{s}" for k, s in self._firing) or "none"
        return f"Monitor(window={self.window}, seen={self._n}, alerts holding: {firing})"


def read_export(path) -> pd.DataFrame:
    """The lines `Monitor.export` wrote, as one DataFrame. A line that is not a JSON object (torn
    by a killed writer, edited, invalid UTF-8) is skipped, and a warning says how many were;
    the count is also in the frame's attrs["skipped_lines"]."""
    rows, skipped = read_jsonl(path)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} line(s) that are not monitor records (torn by a killed "
                      f"writer, or edited); read the other {len(rows)}.", stacklevel=2)
    df = pd.DataFrame(rows)
    df.attrs["skipped_lines"] = skipped
    return df
