"""Prompt templates and seeded placeholder sampling for the six synthetic task types.

The structure follows E5-mistral (MISSION.md §1): asymmetric types are brainstormed first (a
list of one-sentence task definitions), then each task is turned into one JSON example;
symmetric types (STS, bitext) are written in one step. The wording is our own; the output keys
are the paper's, because downstream tools expect them.

Every prompt is a pure function of (seed, spec id, task, config): the same seed and config
give byte-identical prompts, which is what makes resuming a run safe.

Each spec also carries the JSON schema of the reply it asks for (:func:`response_schema`),
derived from what :mod:`rayembed.synth.validate` accepts: the keys, string types and lengths
(sized to fit ``max_tokens``), the STS score sets, the brainstorm list's length. With
``synth.structured_output=json_schema`` the client sends it as ``response_format`` and a server
that decodes under constraints (serve-llm, vLLM) returns only replies of that shape. A schema
fixes the shape, not the sense: the prompts still say what good content is, and minimum lengths
keep a small model from answering "S1" for S1. (A worked example in the prompt was tried and
dropped: SmolLM2-135M copied it verbatim into most replies, which the dedup then rejects.)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from rayembed.synth.languages import NAMES, NO_SPACE_LANGUAGES

PROMPT_VERSION = "2"

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


def _wants_object(structured_output: str | bool | None) -> bool:
    """Whether replies must be one JSON object (json_schema, json_object; ``True`` for the old json_mode)."""
    return bool(structured_output) and structured_output != "off"


def brainstorm_prompt(task_type: str, n: int, structured_output: str | bool | None = None,
                      domains: list[str] | None = None) -> str:
    """Ask for ``n`` distinct one-sentence task definitions of an asymmetric type."""
    what, examples = _BRAINSTORM_WHAT[task_type]
    shown = "\n".join(f"- {e}" for e in examples)
    fmt = (
        'a JSON object {"tasks": [...]} whose "tasks" value is a list of strings'
        if _wants_object(structured_output)
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


def generation_prompt(task_type: str, task: str | None, ph: dict[str, Any],
                      structured_output: str | bool | None = None) -> str:
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
    tail = (
        "Reply with the JSON object only." if _wants_object(structured_output)
        else "Reply with the JSON object only, no other text."
    )
    return body + "\n" + tail


# ---------------------------------------------------------------------------------- schemas

# Characters one token carries, on the low side, so a reply that fills every field to its
# maxLength still closes inside max_tokens (JSON punctuation and keys take the rest).
_CHARS_PER_TOKEN = 3
_KEY_OVERHEAD_TOKENS = 12  # per field: its key, quotes, separators
# Share of the character budget per field, by type (query, positive, negative).
_SHARES: dict[str, tuple[float, float, float]] = {
    "short-long": (0.1, 0.5, 0.4),
    "long-short": (0.8, 0.1, 0.1),
    "short-short": (0.34, 0.33, 0.33),
    "long-long": (0.34, 0.33, 0.33),
    "sts": (0.34, 0.33, 0.33),
    "bitext": (0.34, 0.33, 0.33),
}
_MIN_CHARS_PER_WORD = 5  # a word and its space, a little under English's average
_MIN_TEXT_CHARS = 10  # no field is shorter: a placeholder such as "S1" or "label" never fits
_MIN_LABEL_CHARS = 3
_MIN_SENTENCE_WORDS = 2  # a query or sentence: two words at least
_SHORT_FIELD_CHARS = 80  # labels (long-short)
_SCORE_KEYS = ("S2_score", "S3_score")


_MAX_WORD_CHARS = 16
# Words allowed per character of budget: a word may cost 3 tokens (digits are one token each in
# SmolLM2's vocabulary), and a token is budgeted at 3 characters.
_CHARS_PER_WORD_BUDGET = 9
_TASK_MIN_WORDS = 4  # parse_task_list keeps tasks of at least 4 words


def _string(min_len: int, max_len: int) -> dict[str, Any]:
    return {"type": "string", "minLength": min_len, "maxLength": max(min_len, max_len)}


def words_schema(min_words: int, max_chars: int, digits: bool = True) -> dict[str, Any]:
    """A string of ``min_words`` or more space-separated words, at most about ``max_chars`` long.

    A pattern, because llguidance cannot intersect a pattern with minLength/maxLength; the word
    count is what the validator checks (and what stops a small model answering with one
    CamelCase token). ``digits=False`` (task definitions): letters only. The text opens with no digit or punctuation (no runs of numbers: "1, 2, 3, ..." is how a
    small model loses its budget). Words hold no quote or backslash: the reply needs no escapes.
    """
    min_words = max(1, min_words)
    max_words = max(min_words, max_chars // _CHARS_PER_WORD_BUDGET)
    if not digits:
        # Letters only, with inner hyphens or apostrophes and a closing comma or full stop: words a
        # token or two each. Symbols let a small model spell "help_d_d_t" runs at a token a
        # character, past any token budget.
        letters = "A-Za-z\u00c0-\u024f"
        word = f"[{letters}][{letters}'-]{{0,{_MAX_WORD_CHARS - 2}}}[,.;:]?"
        return {"type": "string", "pattern": f"^{word}( {word}){{{min_words - 1},{max_words - 1}}}$"}
    # A number is a token a digit: at most 4 in a word ("2023", "COVID-19").
    word = f'(?:[^ "\\\\0-9]{{1,{_MAX_WORD_CHARS}}}|[^ "\\\\0-9]{{0,8}}[0-9]{{1,4}}[^ "\\\\0-9]{{0,4}})'
    first = f'[^ 0-9"\\\\,.;:!?(){{}}\\[\\]-][^ "\\\\0-9]{{0,{_MAX_WORD_CHARS - 1}}}'
    return {"type": "string", "pattern": f"^{first}( {word}){{{min_words - 1},{max_words - 1}}}$"}


def response_schema(stage: str, task_type: str, ph: dict[str, Any], max_tokens: int, *,
                    min_document_words: int = 10, long_long_min_words: int = 300,
                    max_text_chars: int = 20000) -> dict[str, Any]:
    """The JSON schema of the reply a spec asks for (OpenAI strict-mode style: every key
    required, no others), derived from what :func:`rayembed.synth.validate.reply_to_row` and
    :func:`~rayembed.synth.validate.parse_task_list` accept.

    String lengths are sized so that a reply that fills every field still fits ``max_tokens``;
    a spec whose minimum lengths cannot fit gets them anyway (its reply will be cut and rejected
    as ``truncated_json``, which says to raise ``max_tokens``).
    """
    budget = max(0, max_tokens - 8)
    if stage == "brainstorm":
        n = int(ph.get("n", 1))
        per_item = max(40, min(400, (budget // max(1, n) - 4) * _CHARS_PER_TOKEN))
        # Task definitions need no digits; forbidding them stops "(1) (2) (3) ..." runs.
        item = words_schema(_TASK_MIN_WORDS, per_item, digits=False)
        return {
            "type": "object",
            "properties": {"tasks": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
            "required": ["tasks"],
            "additionalProperties": False,
        }
    keys = OUTPUT_KEYS[task_type]
    n_fields = len(keys) + (len(_SCORE_KEYS) if task_type == "sts" else 0)
    chars = max(0, budget - n_fields * _KEY_OVERHEAD_TOKENS) * _CHARS_PER_TOKEN
    mins = {
        "short-long": (1, min_document_words, min_document_words),
        "long-short": (min_document_words, 1, 1),
        "long-long": (long_long_min_words,) * 3,
    }.get(task_type, (1, 1, 1))  # in words
    spaced = not set(str(ph.get("language", "en")).split("-")) & NO_SPACE_LANGUAGES
    props: dict[str, Any] = {}
    for key, share, min_words in zip(keys, _SHARES[task_type], mins):
        label = task_type == "long-short" and key != keys[0]
        lo = max(_MIN_LABEL_CHARS if label else _MIN_TEXT_CHARS, min_words * _MIN_CHARS_PER_WORD)
        hi = max(lo, min(max_text_chars, int(chars * share)))
        if label:
            hi = min(hi, _SHORT_FIELD_CHARS)
        if spaced:
            props[key] = words_schema(min_words if min_words > 1 else (1 if label else _MIN_SENTENCE_WORDS), hi)
        else:  # Chinese, Japanese, Thai...: no spaces to count words by, and about a token a character
            props[key] = _string(min(lo, max_text_chars), hi // _CHARS_PER_TOKEN)
    if task_type == "sts":
        # The score sets of the prompts: S2 always rates above S3, as the validator demands.
        props["S2_score"] = {"type": "number", "enum": list(STS_HIGH)}
        props["S3_score"] = {"type": "number", "enum": list(STS_LOW)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


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
    schema: dict[str, Any] | None = None  # the reply's JSON schema (response_schema)

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
            "schema": self.schema,
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
                     max_tokens: int, structured_output: str | bool | None = None) -> list[PromptSpec]:
    """Brainstorm requests for every asymmetric type with a positive target count.

    ``structured_output`` (json_schema, json_object, off) decides whether the prompt asks for
    ``{"tasks": [...]}`` (a JSON object, as response_format requires) or a bare list.
    """
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
                    prompt=brainstorm_prompt(task_type, n_per_call, structured_output, domains),
                    max_tokens=max_tokens,
                    placeholders={"n": n_per_call, "call": i, "domains": domains},
                    schema=response_schema("brainstorm", task_type, {"n": n_per_call}, max_tokens),
                )
            )
    return specs


def generation_specs(counts: dict[str, int], seed: int, tasks: dict[str, list[str]], languages,
                     examples_per_task: int, max_tokens: int, long_long_min_words: int,
                     structured_output: str | bool | None = None, *, min_document_words: int = 10,
                     max_text_chars: int = 20000) -> list[PromptSpec]:
    """Generation requests: asymmetric ones from brainstormed ``tasks``, symmetric ones directly.

    Each spec carries its reply schema, bounded by the validation settings given here.

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
                    prompt=generation_prompt(task_type, task, ph, structured_output),
                    max_tokens=max_tokens,
                    language=ph["language"],
                    instruction=task,
                    placeholders=ph,
                    schema=response_schema("generate", task_type, ph, max_tokens,
                                           min_document_words=min_document_words,
                                           long_long_min_words=long_long_min_words,
                                           max_text_chars=max_text_chars),
                )
            )
    return specs
