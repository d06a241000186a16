"""BGE-M3-style heads: sparse lexical weights and multi-vector tokens, scored as their formulas
say, special tokens left out, saved and loaded back in full and LoRA modes."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from rayembed.config import ConfigError, load_config
from rayembed.config.model import LoRAConfig
from rayembed.modeling.embedder import CONFIG_NAME, Embedder
from rayembed.modeling.heads import (
    HEADS_FILE,
    SparseHead,
    maxsim,
    maxsim_torch,
    sparse_scores,
    sparse_scores_torch,
)

TEXTS = ["abcab", "the wing and the wing", "", "lift comes from pressure differences"]


def _with_heads(**kw) -> Embedder:
    emb = Embedder.from_pretrained("tiny-llama", sparse=True, multivector=True, multivector_dim=16, **kw)
    with torch.no_grad():  # weights that differ per token; the bias keeps all of them (special too) positive
        w = emb.sparse_head.linear.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        emb.sparse_head.linear.bias.fill_(2.0)
    return emb


@pytest.fixture(scope="module")
def emb():
    return _with_heads()


def _hidden_one(emb, text):
    """Hidden states of one unpadded text, and its ids."""
    ids = emb.tokenize_ids([text])[0]
    t = torch.tensor([ids])
    with torch.no_grad():
        hidden = emb.hidden_states(t, torch.ones_like(t))[0].numpy()  # (L, H)
    return ids, hidden


def test_sparse_weights_are_the_max_relu_linear_per_token_id(emb):
    w = emb.sparse_head.linear.weight.detach().numpy()[0]  # (H,)
    b = float(emb.sparse_head.linear.bias.detach())
    special = {emb.tokenizer.pad_token_id, emb.tokenizer.bos_token_id, emb.tokenizer.eos_token_id}
    got = emb.encode_sparse(TEXTS, batch_size=3)  # mixed lengths: padding inside batches
    assert isinstance(got, sp.csr_matrix) and got.dtype == np.float32 and got.shape == (4, emb.vocab_size)
    for row, text in enumerate(TEXTS):
        ids, hidden = _hidden_one(emb, text)
        want: dict[int, float] = {}
        for tok, h in zip(ids, hidden):
            if tok in special:
                continue
            want[tok] = max(want.get(tok, 0.0), max(0.0, float(h @ w + b)))
        want = {t: v for t, v in want.items() if v > 0}
        r = got.getrow(row)
        assert dict(zip(r.indices.tolist(), r.data.tolist())) == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert not special & set(r.indices.tolist())
    assert got.getrow(2).nnz == 0  # an empty text holds only special tokens
    # Repeated tokens count once, at their best position ("abcab": a and b twice).
    ids = emb.tokenize_ids([TEXTS[0]])[0]
    assert got.getrow(0).nnz == len(set(ids) - special)


def test_a_new_sparse_head_starts_with_every_token_alive():
    emb = Embedder.from_pretrained("tiny-llama", sparse=True)
    got = emb.encode_sparse(["the wing and the wing"])
    ids = set(emb.tokenize_ids(["the wing and the wing"])[0]) - emb.special_token_ids
    assert set(got.indices.tolist()) == ids
    np.testing.assert_allclose(got.data, SparseHead.INIT_BIAS)


def test_multivector_rows_are_normalised_linear_of_real_tokens(emb):
    w = emb.multivector_head.linear.weight.detach().numpy()  # (16, H)
    b = emb.multivector_head.linear.bias.detach().numpy()
    special = emb.special_token_ids
    got = emb.encode_multivector(TEXTS, batch_size=3)
    assert len(got) == 4
    for vecs, text in zip(got, TEXTS):
        ids, hidden = _hidden_one(emb, text)
        keep = [i for i, tok in enumerate(ids) if tok not in special]
        raw = hidden[keep] @ w.T + b
        want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        assert vecs.dtype == np.float32 and vecs.shape == (len(keep), 16)
        np.testing.assert_allclose(vecs, want, rtol=1e-4, atol=1e-5)
    assert got[2].shape == (0, 16)


def test_queries_are_formatted_like_encode(emb):
    inst = "Given a question, retrieve answers"
    q = emb.format_query("wing lift", inst)
    assert (emb.encode_sparse(["wing lift"], instruction=inst) != emb.encode_sparse([q])).nnz == 0
    np.testing.assert_array_equal(
        emb.encode_multivector(["wing lift"], instruction=inst)[0], emb.encode_multivector([q])[0]
    )


def test_scoring_functions_on_hand_made_inputs():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    d = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    assert maxsim(q, d) == pytest.approx((1.0 + 0.8) / 2)
    assert maxsim(q[:0], d) == 0.0 and maxsim(q, d[:0]) == 0.0
    qs = sp.csr_matrix(([2.0, 1.0], ([0, 0], [5, 7])), shape=(1, 10))
    ds = sp.csr_matrix(([3.0, 4.0, 0.5], ([0, 0, 1], [5, 9, 7])), shape=(2, 10))
    np.testing.assert_allclose(sparse_scores(qs, ds), [[6.0, 0.5]])
    with pytest.raises(ValueError, match="vocabulary"):
        sparse_scores(qs, sp.csr_matrix((1, 11)))
    # Torch twins on the same hand-made numbers, batched and masked.
    qv = torch.tensor(q)[None]  # (1, 2, 2)
    dv = torch.stack([torch.tensor(d), torch.tensor([[0.0, 1.0], [9.0, 9.0]])])  # (2, 2, 2)
    dmask = torch.tensor([[True, True], [True, False]])  # the 9s are padding
    got = maxsim_torch(qv, torch.ones(1, 2, dtype=torch.bool), dv, dmask)
    torch.testing.assert_close(got, torch.tensor([[0.9, 0.5]]))
    got = sparse_scores_torch(
        torch.tensor([[2.0, 1.0, 1.5]]), torch.tensor([[5, 7, 5]]),  # id 5 twice: max 2.0, not 3.5
        torch.tensor([[3.0, 4.0], [0.5, 8.0]]), torch.tensor([[5, 9], [7, 5]]),
        d_mask=torch.tensor([[True, True], [True, False]]),
    )
    torch.testing.assert_close(got, torch.tensor([[6.0, 0.5]]))


def test_torch_twins_agree_with_encoded_outputs(emb):
    queries, docs = ["wing lift", "abcab"], TEXTS
    q = emb.tokenize(queries)
    d = emb.tokenize(docs)
    with torch.no_grad():
        qo = emb.forward_all(q["input_ids"], q["attention_mask"])
        do = emb.forward_all(d["input_ids"], d["attention_mask"])
    assert not (qo["mask"] & ~q["attention_mask"].bool()).any()
    s = sparse_scores_torch(qo["sparse"], q["input_ids"], do["sparse"], d["input_ids"], qo["mask"], do["mask"])
    want = sparse_scores(emb.encode_sparse(queries), emb.encode_sparse(docs))
    np.testing.assert_allclose(s.numpy(), want, rtol=1e-4, atol=1e-6)
    m = maxsim_torch(qo["multivector"], qo["mask"], do["multivector"], do["mask"], max_elements=64)  # sliced
    qv, dv = emb.encode_multivector(queries), emb.encode_multivector(docs)
    want = np.array([[maxsim(a, b) for b in dv] for a in qv])
    np.testing.assert_allclose(m.numpy(), want, rtol=1e-4, atol=1e-5)
    assert want[:, 2].tolist() == [0.0, 0.0]  # the empty document


def test_dense_output_is_untouched_by_heads(emb):
    plain = Embedder.from_pretrained("tiny-llama")
    np.testing.assert_array_equal(emb.encode(TEXTS), plain.encode(TEXTS))
    batch = emb.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(emb.forward_all(**batch)["dense"], emb(**batch), rtol=0, atol=0)


def test_encode_all_runs_the_backbone_once_per_batch(emb, monkeypatch):
    """Dense, sparse and multi-vector outputs from one forward pass per batch (what the index
    build's actors use), each equal to its own encode_* call."""
    dense, sparse, mv = emb.encode(TEXTS, batch_size=2), emb.encode_sparse(TEXTS, batch_size=2), \
        emb.encode_multivector(TEXTS, batch_size=2)
    calls = []
    real = emb.hidden_states
    monkeypatch.setattr(emb, "hidden_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = emb.encode_all(TEXTS, batch_size=2, sparse=True, multivector=True)
    assert len(calls) == 2  # 4 texts, batches of 2: one backbone pass each, not one per output
    np.testing.assert_array_equal(out["dense"], dense)
    np.testing.assert_array_equal(out["sparse"].toarray(), sparse.toarray())
    for a, b in zip(out["multivector"], mv):
        np.testing.assert_array_equal(a, b)


def _outputs(e):
    return e.encode(TEXTS), e.encode_sparse(TEXTS).toarray(), e.encode_multivector(TEXTS)


@pytest.mark.parametrize("mode", ["full", "adapter", "merged"])
def test_save_and_load_keep_every_output(tmp_path, mode):
    emb = _with_heads(lora=LoRAConfig(r=4, alpha=8, dropout=0.0)) if mode != "full" else _with_heads()
    with torch.no_grad():  # move every trainable weight off its init so the round trip matters
        for n, p in emb.named_parameters():
            if "lora_B" in n or "_head." in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    if mode != "full":
        trainable = {n for n, p in emb.named_parameters() if p.requires_grad}
        assert {n for n in trainable if "_head." in n} == {
            "sparse_head.linear.weight", "sparse_head.linear.bias",
            "multivector_head.linear.weight", "multivector_head.linear.bias",
        }, "heads stay trainable beside the LoRA adapter"
    want = _outputs(emb)
    folder = emb.save_pretrained(tmp_path / mode, merge_lora=mode == "merged")
    assert (folder / HEADS_FILE).exists()
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["sparse"] and cfg["multivector"] and cfg["multivector_dim"] == 16
    assert cfg["weights"] == ("lora" if mode == "adapter" else "full")
    again = Embedder.from_pretrained(folder)
    assert again.has_sparse and again.has_multivector and again.multivector_dim == 16
    got = _outputs(again)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    for a, b in zip(got[2], want[2]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_heads_weights_are_part_of_the_identity(tmp_path):
    emb = _with_heads()
    first = emb.save_pretrained(tmp_path / "a")
    ident = Embedder.from_pretrained(first).identity()["weights_sha256"]
    with torch.no_grad():
        emb.multivector_head.linear.bias.add_(0.01)
    second = emb.save_pretrained(tmp_path / "b")
    assert Embedder.from_pretrained(second).identity()["weights_sha256"] != ident


def test_absent_heads_give_clear_errors(tmp_path):
    plain = Embedder.from_pretrained("tiny-llama")
    assert not plain.has_sparse and not plain.has_multivector
    with pytest.raises(ValueError, match=r"no sparse head.*model\.heads\.sparse=true"):
        plain.encode_sparse(["x"])
    with pytest.raises(ValueError, match=r"no multivector head.*model\.heads\.multivector=true"):
        plain.encode_multivector(["x"])
    folder = _with_heads().save_pretrained(tmp_path / "m")
    (folder / HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="heads.safetensors is missing"):
        Embedder.from_pretrained(folder)
    with pytest.raises(ValueError, match="has dim 16"):
        _with_heads().set_heads(multivector_dim=8)


def test_heads_config_section(tmp_path):
    with pytest.raises(ConfigError, match="model.heads.multivector_dim is set but model.heads.multivector is false"):
        load_config(None, ["model.heads.multivector_dim=8"])
    with pytest.raises(ConfigError, match="model.heads.multivector_dim must be a positive"):
        load_config(None, ["model.heads.multivector=true", "model.heads.multivector_dim=0"])
    cfg = load_config(None, ["model.name_or_path=tiny-llama", "model.heads.sparse=true"])
    emb = Embedder.from_config(cfg.model)
    assert emb.has_sparse and not emb.has_multivector
    # A saved embedder keeps its heads when the config leaves them at their defaults.
    folder = _with_heads().save_pretrained(tmp_path / "m")
    again = Embedder.from_config(load_config(None, [f"model.name_or_path={folder}"]).model)
    assert again.has_sparse and again.has_multivector
