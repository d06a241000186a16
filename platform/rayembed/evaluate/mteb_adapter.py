"""Run a rayembed embedder through ``mteb`` (the ``eval`` extra), on MTEB's tasks or local files.

:class:`MTEBEncoder` gives an :class:`~rayembed.modeling.embedder.Embedder` the encoder interface
mteb calls: ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type)``. Queries get
the task's instruction (the paper's conventions, :mod:`.instructions`); documents get none.
:func:`local_retrieval_task` builds an mteb retrieval task whose ``load_data`` fills the
dataset from a local BEIR folder or SMART collection, so MTEB users can compare directly.

Example::

    import mteb
    enc = MTEBEncoder.from_pretrained("runs/demo/model")
    task = local_retrieval_task(DatasetSpec(name="cranfield", path="cranfield"), data_dir)
    mteb.evaluate(enc, [task])

mteb is imported only inside these functions; without it they raise an ImportError that
says ``pip install rayembed[eval]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.evaluate.instructions import instruction_for

logger = logging.getLogger(__name__)

INSTALL_HINT = "mteb is not installed; install the eval extra: pip install 'rayembed[eval]'"


def require_mteb():
    """Import mteb, or raise an ImportError naming the extra to install."""
    try:
        import mteb
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return mteb


def _texts(inputs: Any) -> list[str]:
    """Flatten what mteb passes: a list of strings, or a DataLoader of batches with a 'text' key."""
    if isinstance(inputs, str):
        return [inputs]
    out: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            texts = item.get("text")
            if texts is None:
                raise ValueError(f"An mteb batch without a 'text' field (keys {sorted(item)}); only text is supported.")
            out.extend([texts] if isinstance(texts, str) else list(texts))
        else:
            raise TypeError(f"Cannot encode an input of type {type(item).__name__}; pass strings.")
    return out


def _prompt_name(prompt_type: Any) -> str | None:
    if prompt_type is None:
        return None
    return str(getattr(prompt_type, "value", prompt_type)).lower()


class MTEBEncoder:
    """mteb's encoder interface over an Embedder (works without mteb installed).

    ``instructions``: task name -> instruction overrides. ``instruct``: whether queries get one
    (False for encoders trained without instructions, such as all-MiniLM-L6-v2).
    """

    def __init__(self, embedder, *, batch_size: int = 32, instructions: dict[str, str] | None = None,
                 instruct: bool | None = None):
        self.embedder = embedder
        self.batch_size = batch_size
        self.instructions = dict(instructions or {})
        self.instruct = embedder.takes_instructions if instruct is None else instruct

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> MTEBEncoder:
        from rayembed.modeling.embedder import Embedder

        return cls(Embedder.from_pretrained(name_or_path), **kwargs)

    def instruction(self, task_metadata: Any, prompt_type: Any) -> str | None:
        """The instruction for one encode call: queries of any task, and both sides of STS."""
        if not self.instruct or task_metadata is None:
            return None
        name = getattr(task_metadata, "name", str(task_metadata))
        task_type = str(getattr(task_metadata, "type", "Retrieval"))
        if task_type == "STS":
            return instruction_for(name, self.instructions, kind="sts")
        if _prompt_name(prompt_type) in ("document", "passage", "corpus"):
            return None
        return instruction_for(name, self.instructions)

    def encode(self, inputs: Iterable[Any], *, task_metadata: Any = None, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Embed ``inputs``: (n, dim) float32, L2-normalised, in input order."""
        texts = _texts(inputs)
        batch_size = int(kwargs.get("batch_size", self.batch_size))
        return self.embedder.encode(texts, instruction=self.instruction(task_metadata, prompt_type),
                                    batch_size=batch_size)

    def similarity(self, a, b) -> np.ndarray:
        return np.asarray(a) @ np.asarray(b).T  # (n, m): cosine on normalised vectors

    def similarity_pairwise(self, a, b) -> np.ndarray:
        return (np.asarray(a) * np.asarray(b)).sum(axis=-1)  # (n,)


def local_retrieval_task(spec, data_dir: str | Path | None = None):
    """An mteb retrieval task whose ``load_data`` reads ``spec`` (a DatasetSpec) from local files."""
    mteb = require_mteb()
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    from rayembed.evaluate.datasets import RetrievalData, load_dataset

    metadata = mteb.TaskMetadata(
        name=spec.name,
        description=f"Local retrieval collection {spec.name} ({spec.path}).",
        reference=None,
        dataset={"path": str(spec.path), "revision": "local"},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[spec.split],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None,
        dialect=None, sample_creation=None, bibtex_citation="",
    )

    class LocalRetrieval(AbsTaskRetrieval):
        def load_data(self, **kwargs: Any) -> None:
            if getattr(self, "data_loaded", False):
                return
            data = load_dataset(spec, data_dir)
            if not isinstance(data, RetrievalData):
                raise ValueError(f"'{spec.name}' is not a retrieval collection; mteb tasks here are retrieval only.")
            ids = data.doc_ids()
            corpus = Dataset.from_dict({"id": ids, "title": [data.corpus[d].get("title", "") for d in ids],
                                        "text": [data.corpus[d].get("text", "") for d in ids]})
            qids = data.judged_query_ids()
            queries = Dataset.from_dict({"id": qids, "text": [data.queries[q] for q in qids]})
            split = {"corpus": corpus, "queries": queries,
                     "relevant_docs": {q: data.qrels[q] for q in qids}, "top_ranked": None}
            self.dataset = {"default": {spec.split: split}}
            self.data_loaded = True

    LocalRetrieval.metadata = metadata
    return LocalRetrieval()
