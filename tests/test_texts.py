"""The texts quality is measured on and fine-tuned on stay apart: no fine-tuning text shares a run of eight
words with the evaluation corpus, so a fine-tuned model is never measured on text it was trained on."""

from pathlib import Path

import pytest

from tokenpass.texts import _word_runs, finetune_text, licence_prose, read_text


@pytest.mark.parametrize("source", [finetune_text, licence_prose], ids=["pydoc", "licence-prose"])
def test_fine_tuning_texts_share_no_eight_word_run_with_the_evaluation_corpus(source):
    if source is licence_prose and not list(Path("/usr/share/doc").glob("*/copyright")):
        pytest.skip("no Debian package docs on this machine")
    text = source()
    assert len(text.split()) > 5000
    assert not _word_runs(text) & _word_runs(read_text())


def test_licence_prose_drops_the_paragraphs_it_is_told_to_exclude():
    if not list(Path("/usr/share/doc").glob("*/copyright")):
        pytest.skip("no Debian package docs on this machine")
    paragraphs = licence_prose().split("\n\n")
    kept = licence_prose(exclude="\n\n".join([read_text(), paragraphs[0], paragraphs[-1]])).split("\n\n")
    assert paragraphs[0] not in kept and paragraphs[-1] not in kept and len(kept) < len(paragraphs)
    assert not [p for p in paragraphs if "Files:" in p or "@" in p]  # fields and addresses are not prose
