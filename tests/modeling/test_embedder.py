"""The Embedder: EOS handling, pooling under both paddings, instructions, save/load, modes."""

import json

import numpy as np
import pytest
import torch

from rayembed.modeling.embedder import CONFIG_NAME, Embedder

TEXTS = ["short", "a somewhat longer sentence about aircraft wings", "", "mid length text"]


@pytest.fixture(scope="module")
def tiny():
    return Embedder.from_pretrained("tiny-llama", max_length=32)


def test_every_input_ends_in_exactly_one_eos(tiny):
    eos = tiny.tokenizer.eos_token_id
    texts = TEXTS + ["x" * 500, "ends with eos " + tiny.tokenizer.eos_token]
    for ids in tiny.tokenize_ids(texts):
        assert ids[-1] == eos
        assert ids[-2] != eos
        assert len(ids) <= 32


def test_eos_added_even_when_the_tokenizer_adds_its_own(tiny):
    tok = tiny.tokenizer
    from tokenizers import processors

    backend = tok.backend_tokenizer
    saved = backend.post_processor
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    try:
        ids = tiny.tokenize_ids(["hello"])[0]
    finally:
        backend.post_processor = saved
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id


def test_truncation_keeps_room_for_eos(tiny, caplog):
    ids = tiny.tokenize_ids(["y" * 1000], max_length=16)[0]
    assert len(ids) == 16 and ids[-1] == tiny.tokenizer.eos_token_id


@pytest.mark.parametrize("pooling", ["last", "mean", "weighted_mean"])
def test_left_and_right_padding_agree(pooling):
    left = Embedder.from_pretrained("tiny-llama", padding_side="left", pooling=pooling)
    right = Embedder.from_pretrained("tiny-llama", padding_side="right", pooling=pooling)
    a = left.encode(TEXTS, batch_size=4)
    b = right.encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Batched equals one-by-one: padding never leaks into the result.
    single = np.stack([left.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(a, single, atol=1e-5)


def test_left_padding_does_not_shift_absolute_positions():
    """GPT-2 learns a vector per absolute position: a left-padded row must still start at 0, or its
    vector would depend on the longest text it was batched with."""
    from transformers import GPT2Config, GPT2Model

    from rayembed.modeling.backbones import byte_tokenizer
    from rayembed.modeling.embedder import EmbedderConfig

    tok = byte_tokenizer("decoder")
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    emb = Embedder(model, tok, EmbedderConfig(base_model="tiny-gpt2", model_type="gpt2", is_decoder=True))
    tok.padding_side = "left"
    batched = emb.encode(TEXTS, batch_size=4)
    single = np.stack([emb.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # Without the position ids, padding does shift them: the check above can fail.
    batch = emb.tokenize(TEXTS)
    with torch.no_grad():
        shifted = emb.pool(model(**batch).last_hidden_state, batch["attention_mask"])
        shifted = torch.nn.functional.normalize(shifted, dim=-1).numpy()
    assert np.abs(shifted[0] - single[0]).max() > 1e-2


def test_last_token_pooling_picks_the_eos_position(tiny):
    batch = tiny.tokenize(["ab", "abcdef"])
    hidden = tiny.hidden_states(batch["input_ids"], batch["attention_mask"])
    pooled = tiny.pool(hidden, batch["attention_mask"])
    # Left padding: the EOS of every row sits in the last column.
    torch.testing.assert_close(pooled, hidden[:, -1])
    right = Embedder.from_pretrained("tiny-llama", padding_side="right")
    batch = right.tokenize(["ab", "abcdef"])
    hidden = right.hidden_states(batch["input_ids"], batch["attention_mask"])
    pooled = right.pool(hidden, batch["attention_mask"])
    lengths = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(pooled, hidden[torch.arange(2), lengths])
    assert (batch["input_ids"][torch.arange(2), lengths] == right.tokenizer.eos_token_id).all()


def test_outputs_are_normalised_float32_in_input_order(tiny):
    vecs = tiny.encode(TEXTS, batch_size=2)
    assert vecs.dtype == np.float32 and vecs.shape == (4, tiny.dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs[1], tiny.encode([TEXTS[1]])[0], atol=1e-5)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_the_vectors(tiny):
    """model.autocast=bfloat16: weights stay float32, the linear layers compute in bf16, and the
    float32 output stays close to plain fp32 encoding (the index and eval stages rely on that)."""
    from rayembed.config.model import ModelConfig
    from rayembed.modeling.loading import pretrained_kwargs

    assert pretrained_kwargs(ModelConfig(autocast="bfloat16"))["autocast"] == "bfloat16"
    fast = Embedder.from_pretrained("tiny-llama", max_length=32, autocast="bfloat16")
    seen = []
    linear = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    fp32, bf16 = tiny.encode(TEXTS), fast.encode(TEXTS)
    assert fast.dtype == torch.float32 and seen and set(seen) == {torch.bfloat16}
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert float((fp32 * bf16).sum(axis=1).min()) > 0.99
    with pytest.raises(ValueError, match="autocast must be none, bfloat16 or float16"):
        Embedder.from_pretrained("tiny-llama", autocast="int8")


def test_instruction_template_is_applied(tiny):
    q = tiny.format_query("what is lift", "Given a question, retrieve answers")
    assert q == "Instruct: Given a question, retrieve answers\nQuery: what is lift"
    with_inst = tiny.encode(["what is lift"], instruction="Given a question, retrieve answers")
    by_hand = tiny.encode([q])
    plain = tiny.encode(["what is lift"])
    np.testing.assert_allclose(with_inst, by_hand, atol=1e-6)
    assert not np.allclose(with_inst, plain, atol=1e-3)


def test_save_then_load_gives_identical_embeddings(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert cfg["pooling"] == "last" and cfg["attention"] == "causal" and cfg["base_model"] == "tiny-llama"
    again = Embedder.from_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(tiny.encode(TEXTS), again.encode(TEXTS))
    ident = again.identity()
    assert ident["path"] == str((tmp_path / "m").resolve())
    # The identity is the saved files': an unsaved in-memory model with other weights differs.
    assert ident["weights_sha256"] != Embedder.from_pretrained("tiny-llama", max_length=32).identity()["weights_sha256"]
    # ... and a copy of the same folder elsewhere has the same identity (contents, not location).
    import shutil

    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    assert Embedder.from_pretrained(tmp_path / "copy").identity()["weights_sha256"] == ident["weights_sha256"]
    with torch.no_grad():
        next(p for p in again.model.parameters()).add_(0.01)
    again.save_pretrained(tmp_path / "copy")
    assert Embedder.from_pretrained(tmp_path / "copy").identity()["weights_sha256"] != ident["weights_sha256"]


def test_lora_adapter_saves_alone_or_merged(tmp_path):
    from rayembed.config.model import LoRAConfig

    emb = Embedder.from_pretrained("tiny-llama", lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapter off its zero init so it matters
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    want = emb.encode(TEXTS)
    emb.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    emb.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert (tmp_path / "merged" / "model.safetensors").exists()
    for folder in ("adapter", "merged"):
        got = Embedder.from_pretrained(tmp_path / folder).encode(TEXTS)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_lora_top_layers_adapts_only_the_top_and_round_trips(tmp_path):
    from rayembed.config.model import LoRAConfig

    emb = Embedder.from_pretrained("tiny-llama", lora=LoRAConfig(r=4, alpha=8, dropout=0.0, top_layers=1))
    n_layers = emb.model.config.num_hidden_layers
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert trainable and all(f"layers.{n_layers - 1}." in n for n in trainable)
    # every linear module of the top layer is adapted, as all-linear would
    assert {n.split(".")[-4] for n in trainable} >= {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    with torch.no_grad():
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    want = emb.encode(TEXTS)
    emb.save_pretrained(tmp_path / "adapter")
    np.testing.assert_allclose(Embedder.from_pretrained(tmp_path / "adapter").encode(TEXTS), want, atol=1e-5)
    # the top layer's adapter trains
    batch = emb.tokenize(TEXTS)
    emb(batch["input_ids"], batch["attention_mask"]).sum().backward()
    assert all(p.grad is not None for n, p in emb.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="top_layers"):
        Embedder.from_pretrained("tiny-llama", lora=LoRAConfig(r=4, top_layers=n_layers + 1))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_bidirectional_changes_outputs(name):
    causal = Embedder.from_pretrained(name, pooling="mean")
    bidir = Embedder.from_pretrained(name, pooling="mean", attention="bidirectional")
    a, b = causal.encode(TEXTS), bidir.encode(TEXTS)
    assert not np.allclose(a, b, atol=1e-4)
    # The first token's state sees the future only in bidirectional mode.
    batch = bidir.tokenize(["abc", "abd"])
    h_bi = bidir.hidden_states(batch["input_ids"], batch["attention_mask"])
    h_ca = causal.hidden_states(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(h_ca[0, 0], h_ca[1, 0])
    assert not torch.allclose(h_bi[0, 0], h_bi[1, 0])
    # And padding is still masked: same text, different batch-mates, same vector.
    np.testing.assert_allclose(bidir.encode(["abc", "a much longer neighbour"])[0], bidir.encode(["abc"])[0], atol=1e-5)


def test_unsupported_architecture_is_refused():
    with pytest.raises(ValueError, match="Bidirectional attention is supported for llama, mistral, qwen2.*'bert'"):
        Embedder.from_pretrained("tiny-bert", attention="bidirectional")


def test_encoder_backbone_defaults_to_mean_pooling():
    emb = Embedder.from_pretrained("tiny-bert")
    assert emb.config.pooling == "mean" and not emb.config.append_eos
    assert emb.encode(["hello"]).shape == (1, emb.dim)


@pytest.mark.parametrize(
    "texts, err, match",
    [
        ([1, "a"], TypeError, r"Text 0 is a int, not a string"),
        (["a", None], TypeError, r"Text 1 is a NoneType"),
        (12, TypeError, r"Expected a string or a list of strings"),
    ],
)
def test_bad_text_input(tiny, texts, err, match):
    with pytest.raises(err, match=match):
        tiny.encode(texts)


def test_empty_text_warns_but_embeds(tiny, caplog):
    with caplog.at_level("WARNING"):
        vecs = tiny.encode(["", "hello"])
    assert vecs.shape == (2, tiny.dim)
    assert "empty" in caplog.text


def test_missing_or_bad_model_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither embedder_config.json"):
        Embedder.from_pretrained(tmp_path / "empty")
    with pytest.raises((FileNotFoundError, OSError), match="Could not load model"):
        Embedder.from_pretrained(str(tmp_path / "does-not-exist"))


def test_from_config_keeps_what_a_saved_embedder_says(tmp_path):
    from rayembed.config import load_config

    Embedder.from_pretrained("tiny-llama", attention="bidirectional", pooling="mean", max_length=48).save_pretrained(
        tmp_path / "bi"
    )
    emb = Embedder.from_config(load_config(overrides=[f"model.name_or_path={tmp_path / 'bi'}"]).model)
    assert (emb.config.attention, emb.config.pooling, emb.config.max_length) == ("bidirectional", "mean", 48)
    # An encoder keeps its right padding unless the config asks for another side.
    bert = Embedder.from_config(load_config(overrides=["model.name_or_path=tiny-bert"]).model)
    assert bert.config.padding_side == "right"
    over = Embedder.from_config(load_config(overrides=[f"model.name_or_path={tmp_path / 'bi'}", "model.max_length=32"]).model)
    assert over.config.max_length == 32


# ----------------------------------------------------------------------------- identity and safe saving


def _swap_vocab(folder, a: str, b: str) -> None:
    """Swap two tokens' ids in tokenizer.json: the same weights then embed text differently."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))


def test_identity_covers_tokenizer_files(tiny, tmp_path):
    import shutil

    tiny.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _swap_vocab(tmp_path / "b", "a", "e")
    a, b = Embedder.from_pretrained(tmp_path / "a"), Embedder.from_pretrained(tmp_path / "b")
    assert not np.allclose(a.encode(["a plane"]), b.encode(["a plane"]))  # it does change the vectors
    assert a.identity()["weights_sha256"] != b.identity()["weights_sha256"]
    assert a.identity()["config_sha256"] == b.identity()["config_sha256"]


def test_identity_covers_sharded_weights(tiny, tmp_path):
    import shutil

    def sharded(name: str, scale: float):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "src", folder)
        (folder / "model.safetensors").unlink()
        model = Embedder.from_pretrained(tmp_path / "src").model
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        model.save_pretrained(folder, max_shard_size="100KB")
        assert len(list(folder.glob("model-0000*-of-0000*.safetensors"))) > 1
        return Embedder.from_pretrained(folder)

    tiny.save_pretrained(tmp_path / "src")
    one, two = sharded("one", 1.0), sharded("two", 1.5)
    assert not np.allclose(one.encode(["a plane"]), two.encode(["a plane"]))
    assert one.identity()["weights_sha256"] != two.identity()["weights_sha256"]
    assert one.identity()["weights_sha256"] == sharded("one-again", 1.0).identity()["weights_sha256"]


def test_saved_folder_without_safetensors_is_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(tiny.model.state_dict(), tmp_path / "m" / "pytorch_model.bin")  # a pickle
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors\. It holds pytorch_model\.bin \(pickles\)"):
        Embedder.from_pretrained(tmp_path / "m")


def test_a_failed_swap_keeps_the_old_folder(tiny, tmp_path, monkeypatch):
    """The old model folder is never deleted before its replacement is in place."""
    import os

    target = tmp_path / "m"
    tiny.save_pretrained(target)
    before = tiny.encode(TEXTS)
    real_rename = os.rename

    def failing_rename(src, dst):  # the new folder cannot be moved in (a crash, a full disk)
        if os.fspath(dst) == os.fspath(target) and ".old-" not in os.fspath(src):
            raise OSError("simulated failure moving the new folder into place")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    other = Embedder.from_pretrained("tiny-llama", max_length=32, pooling="mean")
    with pytest.raises(OSError, match="simulated"):
        other.save_pretrained(target)
    monkeypatch.undo()
    np.testing.assert_array_equal(Embedder.from_pretrained(target).encode(TEXTS), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or aside folder left


def test_a_save_never_touches_another_saves_temporary_folder(tiny, tmp_path):
    """Temporary folders have unique names: a concurrent save's work in progress survives."""
    busy = tmp_path / ".m.tmp"  # a fixed temporary name another save could be writing to right now
    busy.mkdir()
    (busy / "model.safetensors").write_bytes(b"in progress")
    tiny.save_pretrained(tmp_path / "m")
    assert (busy / "model.safetensors").read_bytes() == b"in progress"
    assert Embedder.from_pretrained(tmp_path / "m").config.pooling == "last"


@pytest.mark.gpu
def test_cuda_embeddings_match_the_cpu(tiny_embedder_dir):
    cpu = Embedder.from_pretrained(tiny_embedder_dir, device="cpu").encode(TEXTS)
    gpu = Embedder.from_pretrained(tiny_embedder_dir, device="cuda", dtype="float32")
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.encode(TEXTS), cpu, atol=1e-4)
