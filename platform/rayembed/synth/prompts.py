"""Prompt templates and seeded placeholder sampling for the six synthetic task types.

The structure follows E5-mistral (MISSION.md §1): asymmetric types are brainstormed first (a
list of one-sentence task definitions), then each task is turned into one JSON example;
symmetric types (STS, bitext) are written in one step. The wording is our own; the output keys
are the paper's, because downstream tools expect them.

Every prompt is a pure function of (seed, spec id, task, config): the same seed and config
give byte-identical prompts, which is what makes resuming a run safe.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from rayembed.synth.languages import NAMES

PROMPT_VERSION = "1"

# Placeholder value sets (MISSION.md §1).
QUERY_TYPES = ("extremely long-tail", "long-tail", "common")
QUERY_LENGTHS = ("less than 5 words", "5 to 15 words", "at least 10 words")
CLARITY = ("clear", "understandable with some effort", "ambiguous")
NUM_WORDS = (50, 100, 200, 300, 400, 500)
DIFFICULTY = ("high school", "college", "PhD")
UNITS = ("sentence", "phrase", "passage")
STS_HIGH = (4.0, 4.5, 5.0)
STS_LOW = (2.5, 3.0, 3.5)
BITEXT_HIGH = (4.0, 4.5, 5.0)
BITEXT_LOW = (1.5, 2.0, 2.5)

# Brainstorm calls each get a few domains to lean toward, so repeated calls for one type do
# not all return the same list (identical prompts at temperature 1 still converge).
DOMAINS = (
    "medicine", "law", "finance", "software engineering", "cooking", "travel", "sports", "music",
    "history", "physics", "biology", "chemistry", "education", "e-commerce", "real estate",
    "agriculture", "climate", "politics", "film", "literature", "gaming", "automotive", "fashion",
    "parenting", "mental health", "customer support", "human resources", "aviation", "religion",
    "mathematics", "linguistics", "art", "energy", "logistics", "insurance", "social media",
)

# Output keys per type; the row mapping is (query key, positive key, negative key).
OUTPUT_KEYS: dict[str, tuple[str, str, str]] = {
    "short-long": ("user_query", "positive_document", "hard_negative_document"),
    "long-short": ("input_text", "label", "misleading_label"),
    "short-short": ("input", "positive_document", "hard_negative_document"),
    "long-long": ("input", "positive_document", "hard_negative_document"),
    "sts": ("S1", "S2", "S3"),
    "bitext": ("S1", "S2", "S3"),
}
SYMMETRIC_INSTRUCTIONS = {
    "sts": "Retrieve semantically similar text.",
    "bitext": "Retrieve parallel sentences.",
}

# ---------------------------------------------------------------------------------- brainstorm

_BRAINSTORM_WHAT = {
    "short-long": (
        "text retrieval tasks in which a short query is used to find a longer document that "
        "answers or serves it",
        [
            "Given a question about a household appliance, find troubleshooting guides that fix the problem.",
            "Given the name of a historical event, retrieve encyclopedia articles that describe its causes.",
            "Given a symptom a patient describes, find medical explainers that discuss likely conditions.",
        ],
    ),
    "long-short": (
        "text classification tasks in which a passage of text must be assigned a short label",
        [
            "Decide which cuisine a restaurant review is mainly about.",
            "Classify a customer support email by the product area it concerns.",
            "Label a news paragraph with the political stance it takes.",
        ],
    ),
    "short-short": (
        "retrieval tasks in which both the query and the target are short texts (a phrase, a title "
        "or one sentence)",
        [
            "Given a forum question title, find other titles that ask the same thing.",
            "Given the name of a chemical compound, retrieve its common trade names.",
            "Given a slang expression, find its plain-language equivalent.",
        ],
    ),
    "long-long": (
        "retrieval tasks in which both the query and the target are long documents",
        [
            "Given a research abstract, find abstracts of papers that use a similar method.",
            "Given a news report, retrieve other reports covering the same event from another angle.",
            "Given a legal contract clause set, find contracts with equivalent obligations.",
        ],
    ),
}


def brainstorm_prompt(task_type: str, n: int, json_mode: bool = False, domains: list[str] | None = None) -> str:
    """Ask for ``n`` distinct one-sentence task definitions of an asymmetric type."""
    what, examples = _BRAINSTORM_WHAT[task_type]
    shown = "\n".join(f"- {e}" for e in examples)
    fmt = (
        'a JSON object {"tasks": [...]} whose "tasks" value is a list of strings'
        if json_mode
        else "a JSON list of strings"
    )
    return (
        f"Think up {n} different {what}.\n\n"
        f"A few examples of the kind of task meant:\n{shown}\n\n"
        "Guidelines:\n"
        "- Each task is one sentence that says what the input is and what should be found or decided.\n"
        "- Cover many domains, audiences and intents; no two tasks may be near-duplicates.\n"
        "- Do not repeat the examples above.\n"
        + (f"- Lean toward these areas, without limiting yourself to them: {', '.join(domains)}.\n" if domains else "")
        + "\n"
        f"Reply with {fmt}, one task per element, and nothing else."
    )


# ---------------------------------------------------------------------------------- generation


def _lang(code: str) -> str:
    return NAMES.get(code, code)


def generation_prompt(task_type: str, task: str | None, ph: dict[str, Any], json_mode: bool = False) -> str:
    """The prompt for one example of ``task_type``; ``ph`` holds the sampled placeholders."""
    if task_type == "short-long":
        body = (
            "You are writing one training example for a text retrieval system.\n"
            f"Task: {task}\n\n"
            "Return a JSON object with these keys:\n"
            f'- "user_query": a string; a {ph["query_type"]} query for this task, {ph["query_length"]}, '
            f'and {ph["clarity"]}.\n'
            f'- "positive_document": a string; a document of about {ph["num_words"]} words that '
            "fully satisfies the query.\n"
            '- "hard_negative_document": a string; a document that shares topic and wording with the '
            "query but does not satisfy it.\n\n"
            "Rules:\n"
            f'- Write everything in {_lang(ph["language"])}.\n'
            f'- Pitch the content at {ph["difficulty"]} level.\n'
            "- The query must not copy the task description or the document's opening words.\n"
        )
    elif task_type == "long-short":
        body = (
            "You are writing one training example for a text classification system.\n"
            f"Task: {task}\n\n"
            "Return a JSON object with these keys:\n"
            f'- "input_text": a string; a text of about {ph["num_words"]} words to be classified, '
            f'{ph["clarity"]}.\n'
            '- "label": a string; the correct label for input_text, a few words at most.\n'
            '- "misleading_label": a string; a label from the same label set that looks plausible '
            "but is wrong for input_text.\n\n"
            "Rules:\n"
            f'- Write input_text in {_lang(ph["language"])}.\n'
            f'- Pitch the content at {ph["difficulty"]} level.\n'
            "- Do not state the label inside input_text.\n"
        )
    elif task_type == "short-short":
        body = (
            "You are writing one training example for a retrieval system over short texts.\n"
            f"Task: {task}\n\n"
            "Return a JSON object with these keys:\n"
            '- "input": a string; a short query (a phrase or one sentence) for this task.\n'
            '- "positive_document": a string; a short text that is the right match for input.\n'
            '- "hard_negative_document": a string; a short text that looks like a match but is not.\n\n'
            "Rules:\n"
            f'- Write everything in {_lang(ph["language"])}.\n'
            "- All three texts differ from each other.\n"
        )
    elif task_type == "long-long":
        body = (
            "You are writing one training example for a retrieval system over long documents.\n"
            f"Task: {task}\n\n"
            "Return a JSON object with these keys:\n"
            f'- "input": a string; a long query document of at least {ph["min_words"]} words.\n'
            f'- "positive_document": a string; a document of at least {ph["min_words"]} words that '
            "is the right match for input.\n"
            f'- "hard_negative_document": a string; a document of at least {ph["min_words"]} words '
            "that looks related but is not a match.\n\n"
            "Rules:\n"
            f'- Write everything in {_lang(ph["language"])}.\n'
            f'- Pitch the content at {ph["difficulty"]} level.\n'
        )
    elif task_type == "sts":
        unit = ph["unit"]
        body = (
            "You are writing one training example for a semantic similarity dataset. Similarity is "
            "rated from 0 (unrelated) to 5 (same meaning).\n\n"
            "Return a JSON object with these keys:\n"
            f'- "S1": a string; a {unit} at {ph["difficulty"]} level.\n'
            f'- "S2": a string; a {unit} whose similarity to S1 is {ph["high_score"]}.\n'
            f'- "S3": a string; a {unit} whose similarity to S1 is {ph["low_score"]}.\n'
            '- "S2_score" and "S3_score": numbers; your own rating of S1 against S2 and against S3.\n\n'
            "Rules:\n"
            f'- Write all three in {_lang(ph["language"])}.\n'
            "- Do not make S2 a word-for-word copy of S1.\n"
        )
    elif task_type == "bitext":
        unit = ph["unit"]
        src, tgt = _lang(ph["src_lang"]), _lang(ph["tgt_lang"])
        body = (
            "You are writing one training example for a translation retrieval dataset. Similarity is "
            "rated from 0 (unrelated) to 5 (same meaning).\n\n"
            "Return a JSON object with these keys:\n"
            f'- "S1": a string; a {unit} in {src} at {ph["difficulty"]} level.\n'
            f'- "S2": a string; a translation of S1 into {tgt}, similarity {ph["high_score"]} to S1.\n'
            f'- "S3": a string; a {unit} in {tgt} on a nearby topic, similarity {ph["low_score"]} to S1.\n'
        )
    else:
        raise ValueError(f"Unknown task type {task_type!r}.")
    tail = "Reply with the JSON object only." if json_mode else "Reply with the JSON object only, no other text."
    return body + "\n" + tail


# ---------------------------------------------------------------------------------- specs


@dataclass
class PromptSpec:
    """One request: what to ask, plus what the reply will be checked against."""

    id: str
    stage: str  # "brainstorm" or "generate"
    task_type: str
    prompt: str
    max_tokens: int
    language: str = "en"
    instruction: str = ""
    placeholders: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stage": self.stage,
            "task_type": self.task_type,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "language": self.language,
            "instruction": self.instruction,
            "placeholders": self.placeholders,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSpec:
        return cls(**d)


def spec_rng(seed: int, *parts: Any) -> random.Random:
    """An RNG seeded from (seed, parts): independent of the order specs are built in."""
    h = hashlib.sha256("\x1f".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def spec_id(seed: int, *parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, ("spec", PROMPT_VERSION, seed, *parts))).encode()).hexdigest()[:16]


def sample_placeholders(task_type: str, rng: random.Random, languages, long_long_min_words: int) -> dict[str, Any]:
    """Draw the placeholders of one example (MISSION.md §1 value sets)."""
    ph: dict[str, Any] = {"difficulty": rng.choice(DIFFICULTY)}
    if task_type == "bitext":
        ph["src_lang"], ph["tgt_lang"] = languages.sample_pair(rng)
        ph["language"] = f'{ph["src_lang"]}-{ph["tgt_lang"]}'
    else:
        ph["language"] = languages.sample(rng)
    if task_type == "short-long":
        ph.update(
            query_type=rng.choice(QUERY_TYPES),
            query_length=rng.choice(QUERY_LENGTHS),
            clarity=rng.choice(CLARITY),
            num_words=rng.choice(NUM_WORDS),
        )
    elif task_type == "long-short":
        ph.update(clarity=rng.choice(CLARITY), num_words=rng.choice(NUM_WORDS))
    elif task_type == "long-long":
        ph["min_words"] = long_long_min_words
    elif task_type == "sts":
        ph.update(unit=rng.choice(UNITS), high_score=rng.choice(STS_HIGH), low_score=rng.choice(STS_LOW))
    elif task_type == "bitext":
        ph.update(unit=rng.choice(UNITS), high_score=rng.choice(BITEXT_HIGH), low_score=rng.choice(BITEXT_LOW))
    return ph


def brainstorm_specs(counts: dict[str, int], seed: int, n_per_call: int, examples_per_task: int,
                     max_tokens: int, json_mode: bool = False) -> list[PromptSpec]:
    """Brainstorm requests for every asymmetric type with a positive target count."""
    specs = []
    for task_type in ("short-long", "long-short", "short-short", "long-long"):
        target = counts.get(task_type, 0)
        if target <= 0:
            continue
        per_call = n_per_call * examples_per_task
        calls = -(-target // per_call)
        for i in range(calls):
            sid = spec_id(seed, "brainstorm", task_type, i)
            domains = spec_rng(seed, sid).sample(DOMAINS, 3)
            specs.append(
                PromptSpec(
                    id=sid,
                    stage="brainstorm",
                    task_type=task_type,
                    prompt=brainstorm_prompt(task_type, n_per_call, json_mode, domains),
                    max_tokens=max_tokens,
                    placeholders={"n": n_per_call, "call": i, "domains": domains},
                )
            )
    return specs


def generation_specs(counts: dict[str, int], seed: int, tasks: dict[str, list[str]], languages,
                     examples_per_task: int, max_tokens: int, long_long_min_words: int,
                     json_mode: bool = False) -> list[PromptSpec]:
    """Generation requests: asymmetric ones from brainstormed ``tasks``, symmetric ones directly.

    Spec ids and placeholders depend only on (seed, type, position), so a resumed run rebuilds
    exactly the same list.
    """
    specs = []
    for task_type in ("short-long", "long-short", "short-short", "long-long", "sts", "bitext"):
        target = counts.get(task_type, 0)
        if target <= 0:
            continue
        if task_type in SYMMETRIC_INSTRUCTIONS:
            slots = [(SYMMETRIC_INSTRUCTIONS[task_type], i) for i in range(target)]
        else:
            slots = [(t, k) for t in tasks.get(task_type, []) for k in range(examples_per_task)][:target]
        for i, (task, k) in enumerate(slots):
            sid = spec_id(seed, "generate", task_type, i, task, k)
            rng = spec_rng(seed, sid)
            ph = sample_placeholders(task_type, rng, languages, long_long_min_words)
            specs.append(
                PromptSpec(
                    id=sid,
                    stage="generate",
                    task_type=task_type,
                    prompt=generation_prompt(task_type, task, ph, json_mode),
                    max_tokens=max_tokens,
                    language=ph["language"],
                    instruction=task,
                    placeholders=ph,
                )
            )
    return specs
