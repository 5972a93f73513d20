"""Text -> MindRecord -> loader, checked against a separate computation."""
import os
import re

import numpy as np
import pytest

import data
from conftest import ROOT

VALID = os.path.join(ROOT, 'assets', 'wikitext-2', 'wiki.valid.tokens')


def test_clean_wikitext_examples():
    assert data.clean_wikitext(' the 1 @,@ 000 @-@ year old , 3 @.@ 5 m high . \n') == ' the 1,000-year old, 3.5 m high.\n'
    assert data.clean_wikitext(' = = Early life = = \n') == ' == Early life ==\n'
    assert data.clean_wikitext('it was ( in 1900 ) " good "') == 'it was (in 1900) "good"'


def test_wiki_mindrecord_rows_and_tokens(tmp_path, tok512):
    seq = 64
    out = str(tmp_path / 'wiki.mindrecord')
    n = data.write_mindrecord(data.wiki_rows(VALID, tok512, seq), out, data.SCHEMAS['wiki'])
    # The same stream computed another way: the whole file cleaned at once, blank-line paragraphs by regex.
    with open(VALID, encoding='utf-8') as f:
        text = data.clean_wikitext(f.read())
    paragraphs = [p for p in re.split(r'\n\n', text) if p and not p.lstrip().startswith('=')]
    stream = [t for p in paragraphs for t in [tok512.bos_id] + tok512.sp.EncodeAsIds(p) + [tok512.eos_id]]
    assert n == len(stream) // (seq + 1)
    assert sorted(os.listdir(tmp_path)) == ['wiki.mindrecord', 'wiki.mindrecord.db']
    rows = next(iter(data.Loader(out, batch_size=n, shuffle=False)))[0]
    assert rows.shape == (n, seq + 1) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows.reshape(-1), stream[:n * (seq + 1)])


def test_loader_shuffles_by_epoch_and_resumes(tmp_path, tok512):
    out = str(tmp_path / 'wiki.mindrecord')
    data.write_mindrecord(data.wiki_rows(VALID, tok512, 256), out, data.SCHEMAS['wiki'])
    loader = data.Loader(out, batch_size=4, seed=7)
    it = iter(loader)
    first = [next(it)[0] for _ in range(loader.batches_per_epoch + 3)]  # into the second epoch
    seen = np.concatenate(first[:loader.batches_per_epoch])
    assert len({r.tobytes() for r in seen}) == len(seen)  # an epoch visits each row once
    assert not np.array_equal(first[0], first[loader.batches_per_epoch])  # epochs are reshuffled
    resumed = data.Loader(out, batch_size=4, seed=7)
    resumed.restore({'epoch': 0, 'batch': 5})
    it2 = iter(resumed)
    for expected in first[5:]:
        np.testing.assert_array_equal(next(it2)[0], expected)


def test_missing_inputs_are_clear_errors(tmp_path, tok512):
    with pytest.raises(data.DataError, match='no input file matches'):
        list(data.wiki_rows(str(tmp_path / '*.txt'), tok512, 16))
    with pytest.raises(data.DataError, match='seq_length must be at least 1'):
        list(data.wiki_rows(VALID, tok512, 0))
    with pytest.raises(data.DataError, match='not found'):
        data.Loader(str(tmp_path / 'x.mindrecord'), 4)
    with pytest.raises(data.DataError, match='tokenizer .* not found'):
        data.Tokenizer(str(tmp_path / 'nope.model'))
