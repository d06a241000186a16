"""ELI5: Reddit "Explain Like I'm Five" questions and their highest-voted answers.

Offline layout: the Hugging Face ``eli5`` JSONL dump, one question a line:
``{"q_id", "title", "selftext", "answers": {"a_id": [...], "text": [...], "score": [...]}}``.
The query is the title (plus the self text when there is one); the positive is the answer with
the highest score.
"""

from rayembed.data.formats import read_jsonl
from rayembed.data.registry import PublicDataset, register


def _read(path, bad, **_):
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    for f in files:
        for i, rec in enumerate(read_jsonl(f, bad)):
            ans = rec.get("answers") or {}
            texts, scores = ans.get("text") or [], ans.get("score") or []
            title = (rec.get("title") or "").strip()
            if not title or not texts:
                bad.reject(f"{f.name}:{i + 1}", "no title or no answers")
                continue
            best = max(range(len(texts)), key=lambda k: scores[k] if k < len(scores) else 0)
            body = (rec.get("selftext") or "").strip()
            query = f"{title} {body}".strip() if body else title
            if not texts[best].strip():
                bad.reject(f"{f.name}:{i + 1}", "empty best answer")
                continue
            yield DATASET.row(query, texts[best].strip())


DATASET = register(PublicDataset(
    name="eli5",
    instruction="Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    ratio=0.1,
    read_offline=_read,
    layout="the HF eli5 JSONL (title, selftext, answers.text, answers.score)",
    hub_id="sentence-transformers/eli5",
    hub_columns={"query": "question", "positive": "answer"},
))
