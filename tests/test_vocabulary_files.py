"""Vocabulary text files: one class per line, aliases after '|', '#' starts a comment anywhere on a line."""
import warnings

from vilseg.inference.vocabularies import load_vocabulary


def test_inline_comments_in_vocabulary_files_are_dropped(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# header\ncat # pet\ndog|puppy   # two names\n\n  # indented comment\ncat\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vocab = load_vocabulary(str(path))
    assert vocab == {"cat": ["cat"], "dog": ["dog", "puppy"]}  # 'cat # pet' is the class 'cat'
    assert any("the name 'cat' is given twice" in str(w.message) for w in caught)  # so its repeat is a duplicate
