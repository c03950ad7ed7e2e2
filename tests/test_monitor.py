"""Monitor: rolling accuracy, degradation and drift alerts with reasons, exports that several
processes can share, and a dashboard. Streams here are synthetic with known answers."""

import itertools
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from peftkit.serving.drift import kolmogorov_sf, ks_2samp, psi, psi_categorical
from peftkit.serving.monitor import Monitor, read_export

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def stream(mon, n, accuracy, conf=(0.85, 0.08), words=12, unk=0.0, batch=20, seed=0, labels=True, tag=None, start=0):
    """Feed `n` examples whose predictions are right with probability `accuracy`."""
    rng = np.random.default_rng(seed)
    raised = []
    for b in range(0, n, batch):
        k = min(batch, n - b)
        y = rng.integers(0, 2, k)
        right = rng.random(k) < accuracy
        pred = np.where(right, y, 1 - y)
        p = np.clip(rng.normal(*conf, k), 0.5, 1.0)
        texts = [" ".join(["w"] * max(1, int(rng.normal(words, 2)))) for _ in range(k)]
        u = (rng.random(k) < 5 * unk) * rng.uniform(0.1, 0.3, k)  # most texts have no unknown token
        raised += mon.record(texts, pred, p, y if labels else None, unk_rates=u, tag=tag,
                             now=T0 + timedelta(seconds=start + b))
    return raised


# -- the statistics -------------------------------------------------------------------------------

def test_psi_by_hand_and_its_behaviour():
    ref = np.arange(100.0)  # deciles split it into ten equal bins
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    cur = np.concatenate([np.arange(50.0), np.arange(50.0)])  # all mass in the lower five bins
    p, q = np.full(10, 0.1), np.array([0.2] * 5 + [1e-4] * 5)
    assert psi(ref, cur) == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-3)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    assert psi(a, b) < 0.05 < 0.25 < psi(a, b + 1.0)


def test_psi_keeps_a_point_mass_in_its_own_bin():
    zeros = np.zeros(200)  # no unknown tokens in the reference
    some = np.concatenate([np.zeros(100), np.full(100, 0.2)])
    assert psi(zeros, zeros) == pytest.approx(0.0, abs=1e-12)
    assert psi(zeros, some) > 1.0


def test_psi_categorical():
    assert psi_categorical([0, 1] * 50, [1, 0] * 50) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([0.5, 0.5]), np.array([0.1, 0.9])
    assert psi_categorical([0, 1] * 50, [0] * 10 + [1] * 90) == pytest.approx(np.sum((q - p) * np.log(q / p)))


def test_ks_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for shift, n, m in ((0.0, 200, 200), (0.3, 200, 150), (1.0, 80, 300)):
        a, b = rng.normal(0, 1, n), rng.normal(shift, 1, m)
        d, p = ks_2samp(a, b)
        assert d == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
        # the limiting Kolmogorov distribution (scipy's own "asymp" uses a finite-n one instead)
        assert p == pytest.approx(stats.kstwobign.sf(d * np.sqrt(n * m / (n + m))), rel=1e-9, abs=1e-15)
        assert p == pytest.approx(stats.ks_2samp(a, b, method="asymp").pvalue, abs=0.05)
    assert kolmogorov_sf(0) == 1.0 and kolmogorov_sf(3) < 1e-6


# -- rolling metrics and degradation ---------------------------------------------------------------

def test_rolling_accuracy_covers_the_last_window():
    mon = Monitor(window=50, drift_test="ks", min_accuracy=0.0)
    texts = ["a b"] * 10
    for i in range(10):  # batches of 10: the first 5 all right, the next 5 all wrong
        right = i < 5
        mon.record(texts, [1] * 10, [0.9] * 10, [1 if right else 0] * 10)
    df = mon.frame()
    assert df["accuracy"].tolist()[:5] == [1.0] * 5
    assert df["accuracy"].tolist()[5:] == [0.8, 0.6, 0.4, 0.2, 0.0]
    assert df["n"].tolist() == list(range(10, 101, 10)) and (df["labeled"].iloc[-1] == 50)
    assert df["batch_accuracy"].tolist()[-1] == 0.0 and df["length"].iloc[-1] == 2


def test_labels_may_arrive_for_some_examples_only():
    mon = Monitor(window=20, drift_test="ks", min_accuracy=0.0)
    mon.record(["x"] * 4, [1, 1, 0, 0], [0.9] * 4, [1, None, 1, float("nan")])
    row = mon.frame().iloc[-1]
    assert row["labeled"] == 2 and row["accuracy"] == 0.5


def test_min_accuracy_alert_fires_once_with_time_and_reason_then_recovers():
    mon = Monitor(window=200, min_accuracy=0.8, drop_tolerance=0.5)
    assert stream(mon, 200, 0.95) == []
    fired = stream(mon, 300, 0.55, seed=1, start=200)
    deg = [a for a in fired if a["kind"] == "degradation" and a["statistic"] == "accuracy"]
    assert len(deg) == 1  # raised when it started to hold, not on every batch after
    a = deg[0]
    assert isinstance(a["time"], datetime) and a["time"] > T0 + timedelta(seconds=200)
    assert "below min_accuracy 0.80" in a["reason"] and a["value"] < 0.8 and 200 < a["n"] <= 400
    back = stream(mon, 300, 0.95, seed=2, start=500)
    assert any(x["kind"] == "recovered" and x["statistic"] == "accuracy" for x in back)
    assert mon.alerts(active_only=True).query("statistic == 'accuracy'").empty


def test_drop_below_the_baseline_alerts_even_above_min_accuracy():
    mon = Monitor(window=200, min_accuracy=0.7, drop_tolerance=0.05, baseline=0.95)
    stream(mon, 200, 0.96)
    fired = stream(mon, 200, 0.84, seed=3, start=200)
    kinds = {(a["kind"], a["statistic"]) for a in fired}
    assert ("degradation", "accuracy_drop") in kinds and ("degradation", "accuracy") not in kinds
    reason = next(a["reason"] for a in fired if a["statistic"] == "accuracy_drop")
    assert "baseline 0.950 (given)" in reason and "floor is 0.900" in reason


def test_baseline_defaults_to_the_first_labelled_window():
    mon = Monitor(window=200, min_accuracy=0.5, drop_tolerance=0.05)
    stream(mon, 200, 0.9)
    assert mon.baseline == pytest.approx(mon.frame()["accuracy"].iloc[-1]) and mon.baseline_source == "first labelled window"


def test_no_labels_no_accuracy_alerts():
    mon = Monitor(window=50, drift_test="ks", min_accuracy=0.99)
    assert [a for a in stream(mon, 300, 0.1, labels=False) if a["kind"] == "degradation"] == []
    assert mon.frame()["accuracy"].isna().all()


# -- drift ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("test", ["psi", "ks"])
def test_no_drift_on_the_same_distribution(test):
    mon = Monitor(window=200, min_accuracy=0.0, drift_test=test)
    fired = stream(mon, 2000, 0.9, unk=0.02)
    assert [a for a in fired if a["kind"] == "drift"] == []
    assert {"psi_confidence", "ks_p_length", "psi_unk_rate", "psi_prediction"} <= set(mon.frame().columns)


@pytest.mark.parametrize("test", ["psi", "ks"])
def test_confidence_and_input_drift_are_seen(test):
    mon = Monitor(window=200, min_accuracy=0.0, drift_test=test)
    stream(mon, 400, 0.9, conf=(0.9, 0.05), words=12, unk=0.0)
    fired = stream(mon, 300, 0.9, conf=(0.7, 0.08), words=25, unk=0.1, seed=5, start=400)
    drifted = {a["statistic"]: a for a in fired if a["kind"] == "drift"}
    assert {"confidence", "length", "unk_rate"} <= set(drifted)
    assert ("PSI" if test == "psi" else "KS D=") in drifted["confidence"]["reason"]
    assert "reference" in drifted["unk_rate"]["reason"]


def test_class_balance_drift_and_rebase():
    mon = Monitor(window=100, min_accuracy=0.0, bins=4)
    rng = np.random.default_rng(0)
    for _ in range(10):
        mon.record(["t"] * 20, rng.integers(0, 2, 20), [0.9] * 20)
    fired = []
    for _ in range(10):
        fired += mon.record(["t"] * 20, [1] * 20, [0.9] * 20)
    assert any(a["statistic"] == "prediction" for a in fired)
    assert mon.frame()["positive_share"].iloc[-1] == 1.0
    mon.rebase()  # the new balance is accepted as normal: the alert resolves on the next batches
    later = []
    for _ in range(5):
        later += mon.record(["t"] * 20, [1] * 20, [0.9] * 20)
    assert any(a["kind"] == "recovered" and a["statistic"] == "prediction" for a in later)


# -- bad input ------------------------------------------------------------------------------------

def test_a_window_too_small_for_the_psi_threshold_is_warned_about():
    with pytest.warns(UserWarning, match="false drift alerts"):
        Monitor(window=50)
    with pytest.warns(UserWarning, match="window >= 145"):
        Monitor(window=100, psi_threshold=0.25)


def test_bad_input_is_named():
    mon = Monitor(window=20, drift_test="ks")
    with pytest.raises(ValueError, match=r"3 texts but \{'probabilities': 2\}"):
        mon.record(["a", "b", "c"], [0, 1, 1], [0.9, 0.8])
    with pytest.raises(ValueError, match=r"probabilities\[1\]"):
        mon.record(["a", "b"], [0, 1], [0.9, 1.5])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        mon.record(["a", 5], [0, 1], [0.9, 0.8])
    with pytest.raises(TypeError, match="single string"):
        mon.record("a", [0], [0.9])
    with pytest.raises(ValueError, match="columns"):
        mon.record_frame(pd.DataFrame({"text": ["a"]}))
    for kw, match in (({"window": 3}, "window"), ({"min_accuracy": 1.5}, "min_accuracy"),
                      ({"drift_test": "chi2"}, "drift_test"), ({"baseline": 2}, "baseline")):
        with pytest.raises(ValueError, match=match):
            Monitor(**kw)


def test_two_dimensional_probabilities_and_record_frame():
    mon = Monitor(window=20, drift_test="ks", min_accuracy=0.0)
    mon.record(["a", "b"], [0, 1], [[0.7, 0.3], [0.2, 0.8]], [0, 0])
    assert mon.frame()["confidence"].iloc[-1] == pytest.approx(0.75)
    df = pd.DataFrame({"text": ["x y", "z"], "label": [1, 0], "probability": [0.9, 0.6], "unk_rate": [0.0, 0.5],
                       "adapter": "movies"})
    mon.record_frame(df, labels=[1, 1])
    row = mon.frame().iloc[-1]
    assert row["tag"] == "movies" and row["unk_rate"] == pytest.approx(0.25)  # the first batch had none and row["accuracy"] == pytest.approx(0.5)


# -- export and dashboard ---------------------------------------------------------------------------

def test_export_appends_only_what_is_new(tmp_path):
    mon = Monitor(window=50, drift_test="ks", min_accuracy=0.9, name="svc")
    stream(mon, 100, 0.5)
    mon.note("switched to tweets")
    f = tmp_path / "m.jsonl"
    n1 = mon.export(f)
    assert n1 == len(mon.frame()) + len(mon.alerts()) + 1
    assert mon.export(f) == 0
    stream(mon, 40, 0.5, seed=9)
    n2 = mon.export(f)
    lines = [json.loads(x) for x in f.read_text().splitlines()]  # strict JSON: NaN became null
    assert len(lines) == n1 + n2 and {x["type"] for x in lines} == {"metrics", "alert", "note"}
    assert all(x["monitor"] == "svc" for x in lines)
    back = read_export(f)
    assert (back["type"] == "metrics").sum() == len(mon.frame())
    assert pd.to_datetime(back.loc[back["type"] == "alert", "time"]).notna().all()


WRITER = """
import sys
from peftkit.serving.monitor import Monitor
name, path, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
mon = Monitor(window=20, drift_test="ks", min_accuracy=0.0, name=name)
for r in range(rounds):
    for _ in range(3):  # three metrics lines of ~6 KB per export: more than one page or pipe write
        mon.record(["x y"] * 40, [1] * 40, [0.9] * 40, [1] * 40, tag=name * 3000)
    mon.export(path)
"""


def test_several_processes_export_to_one_file(tmp_path):
    """Four processes export at once: every line parses, none is lost, and each export's lines
    stay together in order (one locked write per export)."""
    f = tmp_path / "shared.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, f"p{i}", str(f), "20"], cwd=str(ROOT),
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    rows = [json.loads(x) for x in f.read_text().splitlines()]  # a torn line would fail to parse here
    counts = pd.Series([r["monitor"] for r in rows]).value_counts()
    assert counts.to_dict() == {f"p{i}": 60 for i in range(4)}
    for name in counts.index:
        assert [r["n"] for r in rows if r["monitor"] == name] == [40 * (k + 1) for k in range(60)]
    runs = [(k, len(list(g))) for k, g in itertools.groupby(r["monitor"] for r in rows)]
    assert all(length % 3 == 0 for _, length in runs), runs


def test_dashboard_shows_metrics_alerts_and_notes():
    mon = Monitor(window=200, min_accuracy=0.8)
    stream(mon, 300, 0.95)
    mon.note("switched to tweets")
    stream(mon, 300, 0.5, seed=1, conf=(0.7, 0.1), start=300)
    fig = mon.figure("test")
    assert isinstance(fig, go.Figure)
    names = {t.name for t in fig.data}
    assert {"rolling accuracy", "mean confidence", "PSI confidence", "degradation alert"} <= names
    assert any(a.text == "switched to tweets" for a in fig.layout.annotations)
    titles = [fig.layout[f"yaxis{i if i > 1 else ''}"].title.text for i in range(1, 6)]
    assert titles == ["accuracy", "share", "PSI", "words", "unknown %"]  # every panel says what it measures
    assert isinstance(Monitor().figure(), go.Figure)  # empty: no crash
