"""Loading a model never runs code from it unless asked; secrets are redacted everywhere."""

import json

import pytest

from rayembed.config import load_config, save_resolved
from rayembed.modeling.embedder import Embedder
from rayembed.security import REDACTED, redact_config, redact_text, register_secret


def _model_with_custom_code(folder, marker):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "rayembed-untrusted",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }))
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'rayembed-untrusted'\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    assert load_config().model.trust_remote_code is False
    marker = tmp_path / "code-ran"
    _model_with_custom_code(tmp_path / "untrusted", marker)
    with pytest.raises(ValueError, match="trust_remote_code"):
        Embedder.from_pretrained(tmp_path / "untrusted")
    assert not marker.exists()
    cfg = load_config(overrides=[f"model.name_or_path={tmp_path / 'untrusted'}"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        Embedder.from_config(cfg.model)
    assert not marker.exists()


def test_secrets_are_redacted_from_configs_and_text(tmp_path):
    register_secret("planted-secret-value-42")
    cfg = load_config(overrides=["synth.api_key=sk-live-abcdefgh12345678"])
    path = save_resolved(cfg, tmp_path)
    text = path.read_text()
    assert "sk-live-abcdefgh12345678" not in text and REDACTED in text
    assert redact_config({"nested": {"hf_token": "hf_abcdefghijk", "mntp_mask_token": "_"}}) == {
        "nested": {"hf_token": REDACTED, "mntp_mask_token": "_"}
    }
    msg = redact_text("failed with Authorization: Bearer planted-secret-value-42 and sk-abcdefghijklmnop")
    assert "planted-secret-value-42" not in msg and "sk-abcdefghijklmnop" not in msg


def test_a_log_call_that_cannot_be_formatted_is_still_redacted(capsys):
    """A wrong format string must not carry its (secret) arguments to stderr unredacted."""
    import io
    import logging

    from rayembed.security import RedactingFilter

    secret = "tok-unformattable-0123456789abcdef"
    register_secret(secret)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("rayembed.test.redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting with %d", secret)  # %d of a string: formatting raises
    finally:
        log.removeHandler(handler)
    out = stream.getvalue() + capsys.readouterr().err
    assert secret not in out
    assert "connecting with %d [unformattable log call (TypeError" in out and REDACTED in out
