"""The seed article's qualitative claims, set against what peftkit measures.

The article compared methods with words ("training time: shorter", "storage: extremely low").
`claims_table` turns each word into a testable threshold on a measured ratio against the full
fine-tune, and says whether the claim holds on this data and machine.
"""

from __future__ import annotations

import pandas as pd

# method -> the article's words for training time and storage
CLAIMS = {
    "full": {"training time": "long", "storage": "high"},
    "lora": {"training time": "shorter", "storage": "extremely low"},
    "adapter": {"training time": "medium", "storage": "low"},
}
# each word as a range of the measured ratio against the full fine-tune: [low, high)
TIME_WORDS = {"long": (0.9, float("inf")), "medium": (0.6, 0.9), "shorter": (0.0, 0.75)}
STORAGE_WORDS = {"high": (0.5, float("inf")), "low": (0.0, 0.10), "extremely low": (0.0, 0.01)}


def _holds(word: str, ratio: float, words: dict) -> bool:
    lo, hi = words[word]
    return lo <= ratio < hi


def claims_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method family present in `df` (a compare() result with a full fine-tune)."""
    full = df[df.method == "full"]
    if full.empty:
        raise ValueError("claims_table needs a full fine-tune row to compare against; include FullFineTune().")
    full = full.iloc[0]
    rows = []
    for method, words in CLAIMS.items():
        d = df[df.method == method]
        if d.empty:
            continue
        # the family's most typical member: the median step time, and its storage
        row = d.iloc[(d.sec_per_step - d.sec_per_step.median()).abs().argmin()]
        t = row.sec_per_step / full.sec_per_step
        s = row.adapter_bytes / full.adapter_bytes
        rows.append({"method": method, "measured run": row.label,
                     "claimed training time": words["training time"], "step time vs full": round(t, 3),
                     "time claim holds": _holds(words["training time"], t, TIME_WORDS),
                     "claimed storage": words["storage"], "storage vs full": round(s, 5),
                     "storage claim holds": _holds(words["storage"], s, STORAGE_WORDS),
                     "accuracy": round(row.accuracy, 4), "accuracy vs full (pt)": round(100 * (row.accuracy - full.accuracy), 2)})
    return pd.DataFrame(rows)
