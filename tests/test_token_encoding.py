"""Token classification, model side: words -> sub-words -> windows -> model -> words -> entities.

The tiny model here has a WordPiece vocabulary in which some words split ("newyork" -> new ##york,
"playing" -> play ##ing), so the first-sub-word rule and the windowing are exercised for real.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tuneforge.tasks.token_classification.encoding import (IGNORE_INDEX, LabelSet, encode_windows, repair_bio,
                                                            stitch, tags_from_logits)
from tuneforge.tasks.token_classification.predictor import TokenPredictor, split_words
from tuneforge.tasks.token_classification.sentence import entities

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["new", "york", "paris", "london", "berlin", "john", "mary", "smith", "anna", "lives", "in", "the", "city",
         "of", "and", "went", "to", "with", "a", "big", "old", "house", "near", "river", "met", "visited", "play",
         "work", "game", "today", "is", ",", ".", "!"]
PIECES = ["##york", "##ing", "##er", "##s", "##ed", "##ton"]
LABELS = LabelSet.from_types(["LOC", "PER"])


@pytest.fixture(scope="module")
def wp_model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) for token classification with a WordPiece tokenizer, as an HF directory.

    The classifier weights are drawn larger than BERT's init (std 0.5 rather than 0.02), so that the
    random model's logits are well separated (no near-ties that padding noise could flip), and its bias
    centres each label's logits over sentences of the whole vocabulary and then favours O: the random
    model predicts a mix of O, B- and I- tags (including I- tags that need repair), not B-LOC everywhere."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert-ner")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + PIECES)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, id2label=LABELS.id2label,
                        label2id=LABELS.label2id)
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        model.classifier.bias.zero_()
        rng = np.random.default_rng(0)
        calibration = [" ".join(rng.permutation(WORDS)) for _ in range(4)]
        batch = fast(calibration, return_tensors="pt", padding=True)
        logits = model.eval()(**batch).logits[batch["attention_mask"].bool()]
        model.classifier.bias.copy_(-logits.mean(0) + torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0]))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tokenizer(wp_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(wp_model_dir))


def test_label_set_is_o_then_b_i_per_sorted_type():
    labels = LabelSet.from_types(["PER", "LOC", "PER"])
    assert labels.tags == ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
    assert labels.id2label == {0: "O", 1: "B-LOC", 2: "I-LOC", 3: "B-PER", 4: "I-PER"}
    assert labels.label2id == {"O": 0, "B-LOC": 1, "I-LOC": 2, "B-PER": 3, "I-PER": 4}
    assert LabelSet.from_id2label({"1": "B-X", "0": "O", "2": "I-X"}).tags == ("O", "B-X", "I-X")
    with pytest.raises(ValueError):
        LabelSet.from_types(["B-PER"])


def test_label_goes_on_the_first_sub_word_only(tokenizer):
    words = ["John", "went", "playing", "in", "NewYork", "."]
    tags = ["B-PER", "O", "O", "O", "B-LOC", "O"]
    [window] = encode_windows(tokenizer, [words], [tags], LABELS, max_length=64, stride=8)
    assert tokenizer.convert_ids_to_tokens(window.input_ids) == [
        "[CLS]", "john", "went", "play", "##ing", "in", "new", "##york", ".", "[SEP]"]
    assert window.input_ids == tokenizer(words, is_split_into_words=True)["input_ids"]
    o, b_loc, b_per = LABELS.label2id["O"], LABELS.label2id["B-LOC"], LABELS.label2id["B-PER"]
    x = IGNORE_INDEX
    assert window.labels == [x, b_per, o, o, x, o, b_loc, x, o, x]
    assert window.word_index == [-1, 0, 1, 2, 2, 3, 4, 4, 5, -1]
    assert (window.word_start, window.word_end, window.own_start, window.own_end) == (0, 6, 0, 6)
    assert window.truncated_words == ()
    # without tags: the same ids, no labels
    [plain] = encode_windows(tokenizer, [words], None, LABELS, max_length=64, stride=8)
    assert plain.labels is None and plain.input_ids == window.input_ids


def test_empty_word_and_over_long_word_keep_a_labelled_first_piece(tokenizer):
    long_word = "play" + "ing" * 20  # play + 20 x ##ing: longer than a window
    words = ["john", "", long_word, "paris"]
    tags = ["B-PER", "O", "B-LOC", "B-LOC"]
    windows = encode_windows(tokenizer, [words], tags=[tags], label_set=LABELS, max_length=12, stride=2)
    assert all(len(w) <= 12 for w in windows)
    owned = sorted(i for w in windows for i in range(w.own_start, w.own_end))
    assert owned == [0, 1, 2, 3]
    holder = next(w for w in windows if w.word_start <= 2 < w.word_end)
    assert holder.truncated_words == (2,)
    pieces = [p for p, i in zip(holder.input_ids, holder.word_index) if i == 2]
    assert tokenizer.convert_ids_to_tokens(pieces) == ["play"] + ["##ing"] * 9  # 12 - [CLS] - [SEP]
    first = holder.word_index.index(2)
    assert holder.labels[first] == LABELS.label2id["B-LOC"]
    assert all(holder.labels[p] == IGNORE_INDEX for p in range(first + 1, first + len(pieces)))
    # the empty word stands as [UNK], with its tag
    empty_holder = next(w for w in windows if w.word_start <= 1 < w.word_end)
    p = empty_holder.word_index.index(1)
    assert empty_holder.input_ids[p] == tokenizer.unk_token_id and empty_holder.labels[p] == LABELS.label2id["O"]


def _sentence(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    choices = ["john", "paris", "newyork", "playing", "worked", "games", "london", "the", "city", ",",
               "visited", "mary", "playinging"]  # 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 3 pieces
    return [choices[i] for i in rng.integers(0, len(choices), size=n)]


def _context(window, word: int, n_words: int) -> float:
    """min(sub-words left of the word's first piece, sub-words right of it) in the window; a sentence
    edge is unlimited context."""
    body = [i for i in window.word_index if i >= 0]
    p = body.index(word)
    left = np.inf if window.word_start == 0 else p
    right = np.inf if window.word_end == n_words else len(body) - p - 1
    return min(left, right)


def test_long_sentence_is_windowed_over_whole_words_and_stitched_back(tokenizer):
    words = _sentence(60)
    pieces = [tokenizer.tokenize(w) for w in words]
    assert sum(len(p) for p in pieces) > 3 * 14 and max(len(p) for p in pieces) > 1
    tags = [LABELS.tags[i % len(LABELS)] for i in range(60)]
    short = ["mary", "visited", "paris"]
    windows = encode_windows(tokenizer, [short, words], [["B-PER", "O", "B-LOC"], tags], LABELS,
                             max_length=16, stride=4)
    assert [w.sentence for w in windows][0] == 0 and windows[1].sentence == 1
    long_windows = [w for w in windows if w.sentence == 1]
    assert len(long_windows) >= 4
    for w in long_windows:
        assert len(w) <= 16
        # whole words only: the same ids the tokenizer gives for that slice of words
        assert w.input_ids == tokenizer(words[w.word_start:w.word_end], is_split_into_words=True)["input_ids"]
        assert w.word_index == [-1] + [i for i in range(w.word_start, w.word_end) for _ in pieces[i]] + [-1]
        assert [lab for lab in w.labels if lab != IGNORE_INDEX] == [LABELS.label2id[t] for t in
                                                                    tags[w.word_start:w.word_end]]
    for a, b in zip(long_windows, long_windows[1:]):
        assert b.word_start < a.word_end  # overlap ...
        assert sum(len(pieces[i]) for i in range(b.word_start, a.word_end)) <= 4  # ... of at most `stride` sub-words
        assert a.word_start < b.word_start and a.word_end < b.word_end
    owned = [i for w in long_windows for i in range(w.own_start, w.own_end)]
    assert owned == list(range(60))  # every word owned exactly once, in order
    for w in long_windows:  # the owner gives the word the most context on its poorer side
        for i in range(w.own_start, w.own_end):
            others = [v for v in long_windows if v is not w and v.word_start <= i < v.word_end]
            assert all(_context(w, i, 60) >= _context(v, i, 60) for v in others)
    shared = [i for a, b in zip(long_windows, long_windows[1:]) for i in range(b.word_start, a.word_end)]
    assert shared, "the test needs words seen by two windows"

    # stitching: fake logits that encode (window, position) so a row says where it came from
    fake = [np.stack([np.full(len(LABELS), 1000.0 * k + p) for p in range(len(w) + 3)])  # + padding rows
            for k, w in enumerate(windows)]
    rows = stitch(windows, fake, [3, 60])
    assert [r.shape for r in rows] == [(3, len(LABELS)), (60, len(LABELS))]
    for i in range(60):
        k = next(k for k, w in enumerate(windows) if w.sentence == 1 and w.own_start <= i < w.own_end)
        assert rows[1][i][0] == 1000.0 * k + windows[k].word_index.index(i)
    assert rows[0][:, 0].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="owned by 0 windows"):
        stitch(windows[:-1], fake[:-1], [3, 60])


def test_overlap_is_split_where_each_word_has_the_most_context_ties_to_the_earlier_window(tokenizer):
    # 12 one-piece words, room 8 - 2 specials = 6, stride 3: windows [0,6) [3,9) [6,12).
    # word 4: window 0 gives min(inf, 1) = 1, window 1 min(1, 4) = 1: a tie, kept by the earlier window;
    # word 5: 0 vs 2 -> window 1; word 7: min(4, 1) = 1 vs min(1, inf) = 1: tie -> window 1; word 8 -> window 2.
    windows = encode_windows(tokenizer, [["john"] * 12], None, LABELS, max_length=8, stride=3)
    assert [(w.word_start, w.word_end) for w in windows] == [(0, 6), (3, 9), (6, 12)]
    assert [(w.own_start, w.own_end) for w in windows] == [(0, 5), (5, 8), (8, 12)]
    with pytest.raises(ValueError, match="stride"):
        encode_windows(tokenizer, [["john"] * 12], None, LABELS, max_length=8, stride=6)


def test_tags_from_logits_takes_argmax_then_repairs_bio():
    order = ["I-LOC", "O", "I-PER", "I-PER", "B-LOC", "I-PER", "I-LOC", "I-LOC"]
    logits = np.full((len(order), len(LABELS)), -2.0)
    for r, tag in enumerate(order):
        logits[r, LABELS.label2id[tag]] = 1.0 + r / 10
    [tags], [scores] = tags_from_logits([logits], LABELS)
    assert tags == ["B-LOC", "O", "B-PER", "I-PER", "B-LOC", "B-PER", "B-LOC", "I-LOC"]
    z = np.exp(logits)
    assert np.allclose(scores, (z.max(1) / z.sum(1)))  # the argmax label's probability, before repair
    assert repair_bio(["O", "B-PER", "I-PER", "O"]) == ["O", "B-PER", "I-PER", "O"]  # valid stays valid
    assert entities(tags) == [("LOC", 0, 1), ("PER", 2, 4), ("LOC", 4, 5), ("PER", 5, 6), ("LOC", 6, 8)]


# Texts for the pipeline comparison. `simple` aggregation labels every SUB-WORD token on its own (a
# "##ing" can start or end an entity mid-word), while tuneforge labels words by their first sub-word,
# so the two agree exactly only where every word is a single piece: SINGLE_PIECE_TEXTS. On texts with
# split words, tuneforge's rule is transformers' `first` strategy, compared on SPLIT_TEXTS.
SINGLE_PIECE_TEXTS = [
    "John Smith lives in Paris, near the river.",
    "Mary went to London with Anna and John today!",
    "The old house in Berlin is big.",
    "Anna met Mary Smith in the city of New York.",
    "Paris London Berlin John Mary Anna Smith the city",
]
SPLIT_TEXTS = [
    "Anna visited NewYork and played games in Berlin.",
    "John Smithton works in the city of Londons, playing games.",
    "Mary playinging with Johns near the river!",
]


def _pipeline(model_dir, strategy):
    from transformers import pipeline

    return pipeline("token-classification", model=str(model_dir), aggregation_strategy=strategy, device="cpu")


def _same_entities(ours, theirs, text):
    assert [(e["entity_group"], e["start"], e["end"]) for e in ours] == \
           [(e["entity_group"], int(e["start"]), int(e["end"])) for e in theirs], text
    for a, b in zip(ours, theirs):
        assert abs(a["score"] - float(b["score"])) < 1e-4, text
        assert a["word"] == text[a["start"]:a["end"]]
        assert set(a) == {"entity_group", "start", "end", "word", "score"}


def test_predict_matches_transformers_pipeline_simple_on_single_piece_words(wp_model_dir, tokenizer):
    for text in SINGLE_PIECE_TEXTS:
        words, _ = split_words(text)
        assert all(len(tokenizer.tokenize(w)) == 1 and tokenizer.tokenize(w) != ["[UNK]"] for w in words), text
    predictor = TokenPredictor.load(wp_model_dir)
    ours = predictor.predict(SINGLE_PIECE_TEXTS, batch_size=2)
    theirs = _pipeline(wp_model_dir, "simple")(SINGLE_PIECE_TEXTS)
    # the comparison must have teeth: entities of both types, a multi-word one, and raw tags that need repair
    found = [e for text_entities in ours for e in text_entities]
    assert {e["entity_group"] for e in found} == {"LOC", "PER"}
    assert any(len(split_words(e["word"])[0]) > 1 for e in found)
    raw = _pipeline(wp_model_dir, "none")(SINGLE_PIECE_TEXTS)
    assert any(t["entity"].startswith("I-") and (i == 0 or toks[i - 1]["index"] != t["index"] - 1
                                                or toks[i - 1]["entity"][2:] != t["entity"][2:])
               for toks in raw for i, t in enumerate(toks)), "no I- tag that needs repair: the test is too easy"
    for text, a, b in zip(SINGLE_PIECE_TEXTS, ours, theirs):
        _same_entities(a, b, text)


def test_predict_labels_split_words_by_their_first_piece_like_pipeline_first(wp_model_dir, tokenizer):
    assert any(len(tokenizer.tokenize(w)) > 1 for t in SPLIT_TEXTS for w in split_words(t)[0])
    ours = TokenPredictor.load(wp_model_dir).predict(SPLIT_TEXTS)
    theirs = _pipeline(wp_model_dir, "first")(SPLIT_TEXTS)
    spans_split_word = False
    for text, a, b in zip(SPLIT_TEXTS, ours, theirs):
        _same_entities(a, b, text)
        spans_split_word |= any(len(tokenizer.tokenize(w)) > 1 for e in a for w in split_words(e["word"])[0])
    assert spans_split_word, "no entity covers a split word: the test is too easy"


def test_predict_windows_long_texts_and_keeps_input_order(wp_model_dir, tmp_path, tokenizer):
    model_dir = tmp_path / "windowed"
    shutil.copytree(wp_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["tuneforge"] = {"max_length": 16, "stride": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    predictor = TokenPredictor.load(model_dir)
    assert (predictor.max_length, predictor.stride) == (16, 4)

    long_text = " ".join(_sentence(45, seed=3)) + " John Smith lives in Paris."
    texts = [long_text, "Mary met Anna.", "", long_text.upper()]
    got = predictor.predict(texts, batch_size=3)
    assert got[2] == []

    # the same by hand: every window on its own (no padding, no batching), stitched, tagged, grouped
    sentences = [split_words(t)[0] for t in texts]
    windows = encode_windows(tokenizer, sentences, None, LABELS, 16, 4)
    assert sum(w.sentence == 0 for w in windows) >= 3
    with torch.no_grad():
        logits = [predictor.model(input_ids=torch.tensor([w.input_ids])).logits[0].numpy() for w in windows]
    tags, scores = tags_from_logits(stitch(windows, logits, [len(s) for s in sentences]), LABELS)
    for text, text_tags, text_scores, result in zip(texts, tags, scores, got):
        spans = split_words(text)[1]
        expected = [(kind, spans[a][0], spans[b - 1][1], float(np.mean(text_scores[a:b])))
                    for kind, a, b in entities(text_tags)]
        assert [(e["entity_group"], e["start"], e["end"]) for e in result] == [x[:3] for x in expected]
        assert np.allclose([e["score"] for e in result], [x[3] for x in expected], atol=1e-5)
    assert len(tags[0]) == len(sentences[0])
    assert got[0] and max(e["end"] for e in got[0]) > len(long_text) // 2, "entities only at the start"
