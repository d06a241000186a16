"""train.mode=rerank on Ray Train: the stream brings hard negatives, and the driver exports the
final checkpoint's reranker. The reranker and its task in process: tests/rerank/test_rerank.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayembed.config import load_config
from rayembed.rerank.llm import LLMReranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_rerank_fit_on_ray_train_exports_a_reranker(tmp_path, train_shards, ray_train_local):
    """One short Ray Train fit (about 50 s here): the stream brings hard negatives, the final
    checkpoint holds the reranker, and the driver copies it out as <output_dir>/model."""
    import json

    from rayembed.train import run_training

    cfg = load_config(None, [
        f"run_dir={tmp_path}", "model.name_or_path=tiny-llama", "model.max_length=192",
        "model.lora.enabled=true", "model.lora.dropout=0.0", "train.mode=rerank", "train.batch_size=4",
        "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2", "train.warmup_steps=0",
        "train.lr=0.005", "train.num_negatives=1", "train.query_max_length=48", "train.doc_max_length=64",
    ])
    model_dir = run_training(cfg, [str(train_shards)])
    hist = [json.loads(line) for line in (model_dir.parent / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3, 4] and all(np.isfinite(h["loss"]) for h in hist)
    trained = LLMReranker.from_pretrained(model_dir)
    assert trained.config.weights == "lora" and trained.config.max_length == 192
    # The exported adapter is exactly the final checkpoint's trained weights (the checkpoint's
    # safetensors state, keys without peft's adapter name), and training moved them: LoRA's B
    # matrices start at zero.
    from pathlib import Path

    from safetensors.torch import load_file

    from rayembed.train.engine import load_state

    summary = json.loads((model_dir.parent / "summary.json").read_text())
    ckpt = load_state(Path(summary["checkpoint"]) / "engine", "ddp_state")["trainable"]
    exported = load_file(str(model_dir / "adapter_model.safetensors"))
    def name(key: str) -> str:  # the model's state-dict name -> the adapter file's
        return key[key.index("base_model."):].replace(".default.", ".")

    lora = {name(k): v for k, v in ckpt.items() if ".lora_" in k}
    assert lora and set(lora) == set(exported)
    for k, v in lora.items():
        assert torch.equal(v, exported[k]), k
    assert all(v.abs().max() > 0 for k, v in exported.items() if ".lora_B." in k)
    base = LLMReranker.from_pretrained("tiny-llama", max_length=192)
    texts = ["A volcano is a rupture in the crust.", "Bread is baked from dough."]
    assert not np.allclose(trained.score("what is a volcano", texts), base.score("what is a volcano", texts))
