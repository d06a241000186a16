"""The LLM reranker and train.mode=rerank's task, in process (no Ray): prompts, truncation, answer
tokens, padding invariance, learning on a tiny Llama, and the export/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayembed.config import load_config
from rayembed.rerank import rank_results, rerank
from rayembed.rerank.llm import LLMReranker, resolve_answer_tokens
from rayembed.train.engine import DDPEngine

TOPICS = ["volcanoes", "violins", "glaciers", "compilers"]
QUERIES = [f"about {t}" for t in TOPICS]
POSITIVES = [f"{t} and more {t}" for t in TOPICS]
NEGATIVES = [f"{TOPICS[(i + 1) % 4]} and more {TOPICS[(i + 1) % 4]}" for i in range(4)]
INSTRUCTION = "Find the topic"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_reranker():
    return LLMReranker.from_pretrained("tiny-llama", max_length=160)


def test_prompt_keeps_the_answer_cue_when_truncating(tiny_reranker):
    rr = tiny_reranker
    tok = rr.tokenizer
    cue = tok("\nIs the document relevant to the query? Answer yes or no.\nAnswer:", add_special_tokens=False)[
        "input_ids"
    ]
    short = rr.prompt_ids("bees", "Bees make honey.")
    assert tok.decode(short, skip_special_tokens=True) == (
        "Query: bees\nDocument: Bees make honey.\nIs the document relevant to the query? Answer yes or no.\nAnswer:"
    )
    long_doc = rr.prompt_ids("bees", "honey " * 200)
    assert len(long_doc) == 160 and long_doc[-len(cue):] == cue
    assert "Query: bees\nDocument: honey honey" in tok.decode(long_doc)
    both_long = rr.prompt_ids("q" * 300, "d" * 300, instruction=INSTRUCTION)
    text = tok.decode(both_long, skip_special_tokens=True)
    assert len(both_long) == 160 and both_long[-len(cue):] == cue
    assert text.startswith(f"Instruction: {INSTRUCTION}\nQuery: q")
    assert 0 < text.count("q") - text.count("query") <= text.count("d") + 5  # the query takes at most half
    with pytest.raises(ValueError, match="max_length"):
        LLMReranker.from_pretrained("tiny-llama", max_length=40)


def test_answer_tokens_must_be_single_tokens(tiny_reranker):
    tok = tiny_reranker.tokenizer
    assert resolve_answer_tokens(tok)[:2] == ("y", "n")  # byte-level: " yes" is four tokens
    with pytest.raises(ValueError, match="yes_token=' yes' encodes to 4 tokens"):
        resolve_answer_tokens(tok, " yes", " no")
    with pytest.raises(ValueError, match="same token"):
        resolve_answer_tokens(tok, "y", "y")
    with pytest.raises(ValueError, match="yes_token"):
        LLMReranker.from_pretrained("tiny-llama", max_length=160, yes_token=" yes", no_token=" no")
    with pytest.raises(ValueError, match="decoder"):
        LLMReranker.from_pretrained("tiny-bert")


def test_scores_do_not_depend_on_batching(tiny_reranker):
    docs = [POSITIVES[0], "x", NEGATIVES[0] * 3, "short"]
    together = tiny_reranker.score(QUERIES[0], docs, batch_size=4)
    alone = np.array([tiny_reranker.score(QUERIES[0], [d], batch_size=1)[0] for d in docs])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    assert together.dtype == np.float32 and tiny_reranker.score(QUERIES[0], []).shape == (0,)
    ranked = rerank(QUERIES[0], docs, model="llm", reranker=tiny_reranker, top_n=2)
    assert ranked == rank_results(together, 2) and len(ranked) == 2
    assert ranked[0]["score"] >= ranked[1]["score"]
    with pytest.raises(TypeError, match="list of strings"):
        tiny_reranker.score(QUERIES[0], "one string")


def test_lora_adapts_only_the_top_layers_when_asked(tmp_path):
    lora = load_config(None, ["model.lora.enabled=true", "model.lora.top_layers=1"]).model.lora
    rr = LLMReranker.from_pretrained("tiny-llama", max_length=160, lora=lora)
    trainable = [n for n, p in rr.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)
    loaded = LLMReranker.from_pretrained(rr.save_pretrained(tmp_path / "top1"))
    np.testing.assert_array_equal(loaded.score("q", ["a", "bb"]), rr.score("q", ["a", "bb"]))


def _cfg(*over: str):
    base = [
        "model.name_or_path=tiny-llama", "model.max_length=160", "model.lora.enabled=true", "model.lora.r=8",
        "model.lora.dropout=0.0", "train.mode=rerank", "train.batch_size=4", "train.max_steps=30",
        "train.warmup_steps=0", "train.lr=0.01", "train.num_negatives=1",
    ]
    return load_config(None, base + list(over))


def _stream_batch():
    """A batch laid out as rayembed.data.stream yields it: instructed queries, then d = positives + negatives."""
    from rayembed.data.stream import load_text_encoder

    enc = load_text_encoder("tiny-llama")
    queries = [enc.format_query(q, INSTRUCTION) if i % 2 == 0 else q for i, q in enumerate(QUERIES)]
    q = enc.pad(enc.tokenize_ids(queries, max_length=128))
    d = enc.pad(enc.tokenize_ids(POSITIVES + NEGATIVES, max_length=64))
    return {
        "q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
        "d_input_ids": d["input_ids"], "d_attention_mask": d["attention_mask"],
        "id": [str(i) for i in range(4)], "num_tokens": 0,
    }


def test_rerank_task_learns_and_exports(tmp_path):
    from rayembed.rerank.task import RerankTask
    from rayembed.train.tasks import make_task

    cfg = _cfg()
    torch.manual_seed(0)  # the LoRA initialisation
    task = make_task(cfg, torch.device("cpu"))
    assert isinstance(task, RerankTask) and task.reranker.is_peft
    batch = _stream_batch()
    # The task's prompts are exactly the ones inference builds from the raw texts.
    prompts, group = task.prompts(batch)
    assert group == 2
    for i, q in enumerate(QUERIES):
        instruction = INSTRUCTION if i % 2 == 0 else None
        assert prompts[2 * i : 2 * i + 2] == task.reranker.prompts(q, [POSITIVES[i], NEGATIVES[i]], instruction)

    engine = DDPEngine(task.model, cfg.train, torch.device("cpu"))
    losses = []
    for _ in range(cfg.train.max_steps):
        out = task.step(engine, batch)
        engine.step()
        losses.append(out["loss"])
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], losses
    for i, q in enumerate(QUERIES):
        instruction = INSTRUCTION if i % 2 == 0 else None
        pos, neg = task.reranker.score(q, [POSITIVES[i], NEGATIVES[i]], instruction=instruction)
        assert pos > neg, (q, pos, neg)
    assert task.reranker.training, "scoring puts the model back in training mode"

    out = task.export(tmp_path / "reranker")
    loaded = LLMReranker.from_pretrained(out)
    assert loaded.config.weights == "lora" and loaded.config.base_model == "tiny-llama"
    task.reranker.eval()
    docs = POSITIVES + NEGATIVES
    np.testing.assert_array_equal(loaded.score(QUERIES[1], docs), task.reranker.score(QUERIES[1], docs))
    merged_dir = task.export(tmp_path / "merged", merge_lora=True)
    merged = LLMReranker.from_pretrained(merged_dir)
    assert merged.config.weights == "full"
    np.testing.assert_allclose(merged.score(QUERIES[1], docs), loaded.score(QUERIES[1], docs), atol=1e-4)

    # Training continues from the merged folder (a new adapter names it as its base), not from an adapter.
    again = RerankTask(_cfg(f"model.name_or_path={merged_dir}"), torch.device("cpu"))
    assert again.reranker.config.base_model == str(merged_dir.resolve())
    assert again.prompts(batch)[0] == prompts
    with pytest.raises(ValueError, match="LoRA reranker"):
        RerankTask(_cfg(f"model.name_or_path={out}"), torch.device("cpu"))


def test_rerank_mode_needs_negatives_and_refuses_embedder_options():
    from rayembed.rerank.task import RerankTask

    task = RerankTask(_cfg(), torch.device("cpu"))
    batch = _stream_batch()
    batch["d_input_ids"], batch["d_attention_mask"] = batch["d_input_ids"][:4], batch["d_attention_mask"][:4]
    with pytest.raises(ValueError, match="num_negatives"):
        task.prompts(batch)
    with pytest.raises(ValueError, match="chunk_size"):
        RerankTask(_cfg("train.chunk_size=2"), torch.device("cpu"))


def test_local_rerank_recipe_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "jobs/configs/local/rerank.yaml")
    assert cfg.train.mode == "rerank" and cfg.train.num_negatives >= 1 and cfg.serve.reranker.path


def test_rerank_mode_streams_hard_negatives(tmp_path):
    """The trainer asks the stream for train.num_negatives negatives in rerank mode, as in contrastive."""
    from rayembed.train.trainer import stream_spec

    assert stream_spec(_cfg("train.num_negatives=3"), [str(tmp_path)]).num_negatives == 3
    assert stream_spec(_cfg("train.mode=mntp"), [str(tmp_path)]).num_negatives == 0
