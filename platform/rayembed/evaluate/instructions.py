"""Query instructions for evaluation, following the E5-mistral evaluation conventions.

Queries are formatted ``Instruct: {instruction}\\nQuery: {text}``; documents get no instruction,
except on symmetric tasks (STS), where both sides get one. The strings below are the paper's,
kept exactly: models trained on them expect them. Collections the paper never evaluated
(Cranfield) get an instruction written in the same style. Every one can be overridden in the
config (``eval.instructions.<dataset>=...`` or a dataset's own ``instruction`` key).
"""

from __future__ import annotations

import re

EVAL_INSTRUCTIONS: dict[str, str] = {
    "arguana": "Given a claim, find documents that refute the claim",
    "climatefever": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "dbpedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "fiqa2018": "Given a financial question, retrieve user replies that best answer the question",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "msmarco": "Given a web search query, retrieve relevant passages that answer the query",
    "nfcorpus": "Given a question, retrieve relevant documents that best answer the question",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "quoraretrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "scidocs": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "sts": "Retrieve semantically similar text.",
    # Not in the paper's list; written in the same style.
    "cranfield": "Given a question about aeronautics, retrieve abstracts that answer the question",
    "passkey": "Given a question about a person's passkey, retrieve the document that states that person's passkey",
}

# Common spellings of dataset names mapped to the keys above (BEIR folder names, MTEB names).
_ALIASES = {
    "climate-fever": "climatefever",
    "dbpedia-entity": "dbpedia",
    "fiqa": "fiqa2018",
    "quora": "quoraretrieval",
    "msmarco-subset": "msmarco",
    "ms-marco": "msmarco",
    "msmarco-passage": "msmarco",
    "cran": "cranfield",
    "stsb": "sts",
    "sts-b": "sts",
    "stsbenchmark": "sts",
}

#: Used for a retrieval collection with no known instruction.
GENERIC_RETRIEVAL_INSTRUCTION = "Given a query, retrieve relevant documents that answer the query"


def _key(name: str) -> str:
    k = re.sub(r"[\s_]+", "-", name.strip().lower())
    if k in _ALIASES:
        return _ALIASES[k]
    k2 = k.replace("-", "")
    if k2 in EVAL_INSTRUCTIONS:
        return k2
    if k2.startswith("sts"):
        return "sts"
    for prefix, target in (("msmarco", "msmarco"), ("cran", "cranfield")):
        if k2.startswith(prefix):
            return target
    return k


def instruction_for(name: str, overrides: dict[str, str] | None = None, kind: str = "retrieval") -> str:
    """The query instruction for dataset ``name``: an override, the paper's, or a generic one.

    ``overrides`` is matched on the exact name first, then on the normalised key, so both
    ``{"msmarco-subset": ...}`` and ``{"msmarco": ...}`` work.
    """
    overrides = overrides or {}
    if name in overrides:
        return overrides[name]
    key = _key(name)
    for k, v in overrides.items():
        if _key(k) == key:
            return v
    if kind == "sts":
        return EVAL_INSTRUCTIONS["sts"]
    return EVAL_INSTRUCTIONS.get(key, GENERIC_RETRIEVAL_INSTRUCTION)
