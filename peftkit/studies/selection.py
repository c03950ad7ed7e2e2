"""Choosing a method, two ways: from rules, and from measured evidence.

Rules. The seed article ended with `choose_finetuning_method(model_size, available_resources,
task_complexity, deployment_constraints)`, a chain of three if/elif tests and a default (lines
486-509 of the text in shared/seed/). Here a chain is data: a table of `Rule`s, each with its
conditions, the method it recommends and the reason in words, tried top to bottom (the first rule
whose conditions all hold wins). `ARTICLE_RULES` is the article's chain in its order and its words
(outcomes LoRA or Adapter only); `RULES` is peftkit's, which adds what people actually weigh: zero
added inference latency, many tasks served from one base, an update that must be inspectable, and
whether a full fine-tune fits in memory at all. `choose_method(**answers)` walks a table and
returns a `Recommendation` with the path it took.

Two vocabularies. The article answers in its own words (resources limited/normal/good, task
simple/complex, deployment strict/normal/loose); peftkit's questions use a fuller scale
(limited/moderate/abundant, low/medium/high, strict/moderate/flexible). `ARTICLE_WORDS` maps each
article word to peftkit's word for the same answer, so either vocabulary is accepted everywhere.

Evidence. `recommend(results, ...)` reads a `compare()` DataFrame, keeps the rows that meet the
constraints, and returns their Pareto front and a choice whose reasons cite the measured numbers;
when nothing is feasible it says which limit to relax, and by how much. It lives in
`evidence.py` and is re-exported here, so both answers come from one module.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import pandas as pd

from ..core.methods import Adapter, FullFineTune, Hybrid, LoRA, Method
from ..style import readable
from .recommend import Constraints, Evidence, pareto, recommend  # noqa: F401  (re-exported)

# --- the questions ----------------------------------------------------------------------------

# name -> (choices, default, what it asks). The first four are the article's inputs.
QUESTIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "model_size": (("small", "medium", "large"), "small",
                   "the base model: small (< 1B parameters), medium (1-10B), large (> 10B)"),
    "available_resources": (("limited", "moderate", "abundant"), "moderate",
                            "training compute and accelerator memory at hand"),
    "task_complexity": (("low", "medium", "high"), "medium",
                        "how far the task is from what the base already does"),
    "deployment_constraints": (("strict", "moderate", "flexible"), "moderate",
                               "how tight storage and memory are where the model is served"),
    "zero_latency": (("no", "yes"), "no", "must inference cost exactly what the base costs?"),
    "multi_task": (("no", "yes"), "no", "are many tasks served from one shared base?"),
    "inspectable": (("no", "yes"), "no", "must the learned change be inspectable and removable?"),
    "full_ft_fits": (("unknown", "yes", "no"), "unknown",
                     "does a full fine-tune (weights, gradients, AdamW state) fit in memory?"),
}
ARTICLE_INPUTS = ("model_size", "available_resources", "task_complexity", "deployment_constraints")

# The article's vocabulary (the docstring of its choose_finetuning_method, lines 496-499), in its
# order, each word -> peftkit's word for the same answer. The article has no middle task complexity.
ARTICLE_WORDS: dict[str, dict[str, str]] = {
    "model_size": {"small": "small", "medium": "medium", "large": "large"},
    "available_resources": {"limited": "limited", "normal": "moderate", "good": "abundant"},
    "task_complexity": {"simple": "low", "complex": "high"},
    "deployment_constraints": {"strict": "strict", "normal": "moderate", "loose": "flexible"},
}
ARTICLE_CHOICES = {q: tuple(words) for q, words in ARTICLE_WORDS.items()}
# the article's names for the methods its chain (or peftkit's) can answer
METHOD_LABELS = {"lora": "LoRA", "adapter": "Adapter", "full": "full fine-tune", "hybrid": "hybrid", "head_only": "head only"}
# peftkit's word -> the article's, to show an answer in the article's words where it has one
ARTICLE_SAYS = {q: {ours: theirs for theirs, ours in words.items()} for q, words in ARTICLE_WORDS.items()}


class AnswerError(ValueError):
    """An answer to the decision tree names an unknown question or an invalid choice."""


def vocabulary_frame() -> pd.DataFrame:
    """The word table: one row per article word, with peftkit's word for the same answer."""
    return pd.DataFrame([{"question": q, "article's word": a, "peftkit's word": p}
                         for q, words in ARTICLE_WORDS.items() for a, p in words.items()])


def canonical(name: str, value) -> str:
    """`value` in peftkit's words: a peftkit word as is, an article word mapped; else AnswerError
    naming the valid words and, when `value` is close to one, saying which."""
    choices = QUESTIONS[name][0]
    if isinstance(value, str) and value in choices:
        return value
    article = ARTICLE_WORDS.get(name, {})
    if isinstance(value, str) and value in article:
        return article[value]
    extra = [w for w in article if w not in choices]
    msg = f"{name}={value!r} is not a valid answer; choose one of {list(choices)}"
    if extra:
        msg += f" (or the article's words {list(article)})"
    known = list(choices) + extra
    close = difflib.get_close_matches(str(value).strip().lower(), known, n=1, cutoff=0.6)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    else:
        elsewhere = [q for q in QUESTIONS if q != name and isinstance(value, str)
                     and (value in QUESTIONS[q][0] or value in ARTICLE_WORDS.get(q, {}))]
        msg += f"; {value!r} answers {' and '.join(elsewhere)}, not {name}." if elsewhere else "."
    raise AnswerError(msg)


def validate_answers(answers: dict) -> dict:
    """Every question answered (defaults filled in) in peftkit's words: article words mapped,
    booleans read as yes/no; raise AnswerError."""
    unknown = sorted(set(answers) - set(QUESTIONS))
    if unknown:
        close = [difflib.get_close_matches(str(u), list(QUESTIONS), n=1) for u in unknown]
        hint = "".join(f" Did you mean {c[0]!r} for {u!r}?" for u, c in zip(unknown, close) if c)
        raise AnswerError(f"unknown question(s) {unknown}; the questions are {list(QUESTIONS)}.{hint}")
    out = {}
    for name, (choices, default, _) in QUESTIONS.items():
        value = answers.get(name, default)
        if isinstance(value, bool) and "yes" in choices:
            value = "yes" if value else "no"
        out[name] = canonical(name, value)
    return out


# --- the rules ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """If every answer named in `when` is one of its values, recommend `method`, because `reason`."""

    name: str
    when: dict
    method: Method
    reason: str
    source: str = "peftkit"  # "article": the seed article's own rule

    def __post_init__(self):
        # the conditions may use either vocabulary; `_accepts` holds them in peftkit's words
        accepts = {}
        for q, values in self.when.items():
            words = set(QUESTIONS[q][0]) | set(ARTICLE_WORDS.get(q, {})) if q in QUESTIONS else set()
            if not values or not set(values) <= words:
                raise AnswerError(f"rule {self.name!r}: {q} in {values} is not a valid condition.")
            accepts[q] = {canonical(q, v) for v in values}
        object.__setattr__(self, "_accepts", accepts)

    def _say(self, q: str, value: str) -> str:
        """An answer as this rule's source says it: the article's rules speak the article's words."""
        return ARTICLE_SAYS.get(q, {}).get(value, value) if self.source == "article" else value

    def check(self, answers: dict) -> tuple[bool, str]:
        """(matched, why) for answers in peftkit's words (as validate_answers returns them): why
        names the first condition that failed, or all that held."""
        for q, values in self.when.items():
            if answers[q] not in self._accepts[q]:
                return False, f"{q} is {self._say(q, answers[q])}, not {' or '.join(values)}"
        return True, " and ".join(f"{q} is {self._say(q, answers[q])}" for q in self.when) or "no earlier rule applied"


LORA, ADAPTER, HYBRID, FULL = LoRA(r=8, alpha=16), Adapter(), Hybrid(), FullFineTune()

# The article's chain (section 6.1, lines 502-509 of the seed text), in its order and in its
# words. Its outcomes are LoRA and Adapter only. The reasons are the article's own: the comments
# on its two examples (lines 513, 517) and its list of where each method fits (section 5.1,
# lines 363-375); it gives none for its second test.
ARTICLE_RULES: tuple[Rule, ...] = (
    Rule("large-and-limited", {"model_size": ("large",), "available_resources": ("limited",)}, LORA,
         "a large model with limited resources (the article's scenario 1); LoRA suits environments "
         "with limited compute (section 5.1)", "article"),
    Rule("strict-and-simple", {"deployment_constraints": ("strict",), "task_complexity": ("simple",)}, LORA,
         "strict deployment constraints and a simple task; LoRA suits settings with strict "
         "requirements on model size (section 5.1)", "article"),
    Rule("complex-and-good", {"task_complexity": ("complex",), "available_resources": ("good",)}, ADAPTER,
         "a complex task with ample resources (the article's scenario 2); adapters suit projects "
         "that need fine control of the fine-tuning (section 5.1)", "article"),
    Rule("otherwise", {}, LORA, "none of the three tests held: the article's default choice", "article"),
)

# peftkit's table: hard requirements first (they exclude methods outright), then the cases that
# decide among the methods that remain, then the defaults. Where and why it parts from the
# article's chain is computed in peftkit.article.article_vs_peftkit (notebook 06).
RULES: tuple[Rule, ...] = (
    Rule("zero-latency", {"zero_latency": ("yes",)}, LORA,
         "only LoRA folds into the base weight (W + (alpha/r)·BA): merged, the model has the base's "
         "exact shape and cost. Adapters add layers on the forward path that cannot be folded in."),
    Rule("inspectable", {"inspectable": ("yes",)}, LORA,
         "LoRA's change is one matrix per adapted layer, ΔW = (alpha/r)·BA of rank at most r: its "
         "norm and singular values can be read off, compared across tasks, and removed exactly (unmerge)."),
    Rule("large-and-limited", {"model_size": ("large",), "available_resources": ("limited",)}, LORA,
         "a large model on limited hardware (also the article's first test): a low-rank update on the "
         "attention projections needs no gradients or optimizer state for the frozen weights."),
    Rule("no-room-for-full", {"full_ft_fits": ("no",), "task_complexity": ("high",)}, HYBRID,
         "a hard task, and a full fine-tune does not fit: LoRA on attention plus adapters after the "
         "feed-forward blocks give the most capacity of the methods that do fit."),
    Rule("complex-and-flexible", {"task_complexity": ("high",), "deployment_constraints": ("flexible",)},
         ADAPTER, "a hard task and room at deployment: adapters add non-linear capacity as small new "
         "layers, and their extra latency is acceptable here. (The article asks for ample training "
         "resources instead; what adapters cost is paid at inference, where deployment decides.)"),
    Rule("many-tasks", {"multi_task": ("yes",)}, LORA,
         "many tasks on one base: each task is a small file of LoRA factors swapped into the one "
         "frozen base; the base is stored and loaded once."),
    Rule("small-and-abundant", {"model_size": ("small",), "available_resources": ("abundant",),
                                "full_ft_fits": ("yes", "unknown")}, FULL,
         "a small model, plenty of compute and the memory for it: updating every weight is the "
         "quality reference, and its cost is affordable (the article never recommends it)."),
    Rule("strict-deployment", {"deployment_constraints": ("strict",)}, LORA,
         "tight storage or memory where it is served: LoRA's factors are the smallest artefact, and "
         "merged they add nothing at run time."),
    Rule("otherwise", {}, LORA,
         "no requirement points elsewhere: LoRA r=8 on query and value is the usual starting point; "
         "measure it against the alternatives (recommend() on compare() results)."),
)

# Extra notes attached to a recommendation when their conditions hold and its method matches.
CAVEATS: tuple[tuple[dict, str, str], ...] = (
    ({"zero_latency": ("yes",), "multi_task": ("yes",)}, "lora",
     "zero latency and many tasks pull apart: keep one merged copy per task, or serve the tasks "
     "unmerged from one base and accept a small extra cost per layer."),
    ({"full_ft_fits": ("no",)}, "", "a full fine-tune was ruled out: it does not fit in memory."),
    ({"deployment_constraints": ("strict",)}, "adapter",
     "deployment is strict, and adapters add layers at run time: check their latency (notebook 03)."),
)


@dataclass(frozen=True)
class Step:
    rule: str
    matched: bool
    why: str


@dataclass(frozen=True)
class Recommendation:
    """The method a rule table recommends, why, and the path of rules tried to get there."""

    method: Method
    rule: Rule
    reasons: list[str]
    path: list[Step]
    answers: dict

    @property
    def label(self) -> str:
        return self.method.describe()

    @property
    def name(self) -> str:
        """The method as people read it ("LoRA r=8"; `label` is the key, "lora r=8")."""
        return readable(self.label)

    def text(self) -> str:
        lines = [f"Recommended: {self.name} (rule '{self.rule.name}').", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def choose_method(rules: tuple[Rule, ...] = RULES, **answers) -> Recommendation:
    """Walk `rules` top to bottom with the given answers; the first rule that holds decides."""
    answers = validate_answers(answers)
    path = []
    for rule in rules:
        matched, why = rule.check(answers)
        path.append(Step(rule.name, matched, why))
        if matched:
            reasons = [f"{why}: {rule.reason}"]
            reasons += [text for when, method, text in CAVEATS
                        if (not method or method == rule.method.name)
                        and all(answers[q] in v for q, v in when.items())]
            return Recommendation(rule.method, rule, reasons, path, answers)
    raise AnswerError(f"no rule matched {answers}; a rule table must end with an unconditional rule.")


def rules_frame(rules: tuple[Rule, ...] = RULES) -> pd.DataFrame:
    """The table, one row per rule, in the order it is tried."""
    return pd.DataFrame([{"rule": r.name, "if": " and ".join(f"{q} in {list(v)}" for q, v in r.when.items())
                          or "(always)", "recommend": r.method.describe(), "because": r.reason,
                          "source": r.source} for r in rules])
