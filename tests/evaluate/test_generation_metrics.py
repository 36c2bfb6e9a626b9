"""Tests for instructkit.evaluate.generation_metrics.

Expected values are worked out by hand in the comments next to each assertion,
not obtained by running the wrapped libraries on the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from instructkit.evaluate import generation_metrics as gm
from instructkit.evaluate import metric_registry as reg

# ------------------------------------------------------------------------------ ROUGE


def test_rouge_by_hand():
    preds = ["the cat sat on the mat", "the cat sat"]
    refs = ["the cat lay on the mat", "the cat sat on the mat"]
    # (all tokens <= 3 chars, so the stemmer leaves them alone)
    # Example 1 (6 vs 6 tokens):
    #   rouge1: clipped unigram overlap the:2 cat on mat = 5 -> P=R=5/6, F=5/6
    #   rouge2: pred bigrams the-cat cat-sat sat-on on-the the-mat, shared with ref:
    #           the-cat on-the the-mat = 3 of 5 -> F=3/5
    #   rougeL: LCS "the cat on the mat" = 5 -> F=5/6
    # Example 2 (3 vs 6 tokens):
    #   rouge1: overlap 3 -> P=1, R=1/2, F=2/3
    #   rouge2: 2 of 2 pred bigrams, ref has 5 -> P=1, R=2/5, F=2*(2/5)/(7/5)=4/7
    #   rougeL: LCS 3 -> F=2/3
    got = gm.rouge(preds, refs)
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert got["rouge1"] == pytest.approx((5 / 6 + 2 / 3) / 2)
    assert got["rouge2"] == pytest.approx((3 / 5 + 4 / 7) / 2)
    assert got["rougeL"] == pytest.approx((5 / 6 + 2 / 3) / 2)
    # no newlines: each text is a single sentence, so rougeLsum == rougeL
    assert got["rougeLsum"] == pytest.approx(got["rougeL"])
    for key in got:
        assert reg.compute(key, preds, refs) == pytest.approx(got[key])


def test_rouge_stemming():
    # Porter stemmer maps "running" -> "run" (tokens > 3 chars are stemmed), so the
    # unigrams match: F=1. Unstemmed they would share nothing (F=0).
    assert gm.rouge(["running"], ["run"])["rouge1"] == pytest.approx(1.0)
    # Irregular forms are not conflated by the stemmer.
    assert gm.rouge(["ran"], ["run"])["rouge1"] == pytest.approx(0.0)


def test_rouge_lsum_splits_on_newlines():
    pred = "dog ran\ncat sat"
    ref = "cat sat\ndog ran"
    # rougeL (newline = whitespace): ref "cat sat dog ran" vs pred "dog ran cat sat";
    #   LCS = 2 ("cat sat" or "dog ran") -> P=R=2/4, F=1/2
    # rougeLsum: ref sentences {cat sat}, {dog ran}; pred sentences {dog ran}, {cat sat}.
    #   union-LCS of "cat sat" with the pred sentences = {cat, sat} (2 hits),
    #   of "dog ran" = {dog, ran} (2 hits) -> 4 hits of 4 -> P=R=1, F=1
    got = gm.rouge([pred], [ref])
    assert got["rougeL"] == pytest.approx(0.5)
    assert got["rougeLsum"] == pytest.approx(1.0)
    assert got["rouge1"] == pytest.approx(1.0)


def test_rouge_lsum_splits_a_text_without_newlines_at_its_sentence_ends():
    # A generated summary has no newlines (huggingface/evaluate#501): the same sentences as the newline
    # test above, written on one line, score the same: rougeL 1/2, rougeLsum 1 (not rougeL's 1/2).
    got = gm.rouge(["Dog ran. Cat sat!"], ["Cat sat. Dog ran."])
    assert got["rougeL"] == pytest.approx(0.5)
    assert got["rougeLsum"] == pytest.approx(1.0)
    # CJK sentences end at 。！ with no space: 天好。我们走！ vs 我们走。天好！ -> 2 + 3 characters, each
    # reference sentence found whole in one predicted sentence: rougeLsum 1; rougeL LCS 3 of 5 -> 0.6.
    got = gm.rouge(["天好。我们走！"], ["我们走。天好！"])
    assert got["rougeLsum"] == pytest.approx(1.0)
    assert got["rougeL"] == pytest.approx(0.6)


def test_sentence_lines_keeps_newlines_and_single_sentences():
    assert gm._sentence_lines("cat sat\ndog ran. it did") == "cat sat\ndog ran. it did"  # lines as written
    assert gm._sentence_lines("a greeting") == "a greeting"
    assert gm._sentence_lines("It costs 3.5 dollars. Fine? Yes!") == "It costs 3.5 dollars.\nFine?\nYes!"
    assert gm._sentence_lines("今天很好。我们走吧！好") == "今天很好。\n我们走吧！\n好"
    # an abbreviation or initial ends no sentence; a lowercase word after a full stop starts one
    assert gm._sentence_lines("Dr. Smith met J. K. Rowling, e.g. at the U.N. offices. Fine.") == \
        "Dr. Smith met J. K. Rowling, e.g. at the U.N. offices.\nFine."
    assert gm._sentence_lines("He scored 2. Then Mr. Li left etc. and so on. the end") == \
        "He scored 2.\nThen Mr. Li left etc. and so on.\nthe end"
    # rougeL and the n-gram scores see the same words either way
    one_line = gm.rouge(["the cat sat. a dog ran"], ["a dog ran. the cat sat"])
    lines = gm.rouge(["the cat sat.\na dog ran"], ["a dog ran.\nthe cat sat"])
    assert one_line == pytest.approx(lines)


# ----------------------------------------------------------------------- BLEU / chrF

BLEU_PREDS = ["the quick brown fox jumps over the lazy dog", "hello there"]
BLEU_REFS = ["the quick brown fox jumps over the lazy dog", "hello now friend"]


def test_corpus_bleu_by_hand():
    # Summed n-gram counts: sentence 1 is a 9-token exact match (9, 8, 7, 6 n-grams),
    # sentence 2 has 2 tokens, 1 matching unigram, 1 bigram (no match), no 3/4-grams.
    #   p1 = 10/11, p2 = 8/9, p3 = 7/7, p4 = 6/6
    #   hyp length 11 < ref length 12 -> BP = exp(1 - 12/11)
    expected = 100 * math.exp(1 - 12 / 11) * (10 / 11 * 8 / 9 * 1 * 1) ** 0.25
    assert gm.corpus_bleu(BLEU_PREDS, BLEU_REFS) == pytest.approx(expected)


def test_sentence_bleu_mean_by_hand_and_differs_from_corpus_bleu():
    # Sentence 1: perfect -> 100.
    # Sentence 2: effective order 2 (no 3-grams in the hypothesis);
    #   p1 = 1/2 -> 50; p2 = 0/1, exp smoothing -> 100 / (2 * 1) = 50;
    #   BP = exp(1 - 3/2); BLEU = exp(-1/2) * sqrt(50 * 50) = 50 exp(-1/2)
    expected = (100 + 50 * math.exp(-0.5)) / 2  # ~65.2
    mean = gm.sentence_bleu_mean(BLEU_PREDS, BLEU_REFS)
    assert mean == pytest.approx(expected)
    assert mean < gm.corpus_bleu(BLEU_PREDS, BLEU_REFS) - 10  # corpus ~86.6


def test_bleu_perfect_match_is_100():
    sents = ["the quick brown fox jumps", "over the lazy dog again"]
    assert gm.corpus_bleu(sents, sents) == pytest.approx(100.0)
    assert gm.sentence_bleu_mean(sents, sents) == pytest.approx(100.0)
    assert reg.compute("bleu", sents, sents) == pytest.approx(100.0)


def test_chrf_identical_is_100():
    sents = ["Ein kleiner Test.", "another sentence here"]
    assert gm.chrf(sents, sents) == pytest.approx(100.0)


def test_sacrebleu_resampler_reproduces_corpus_scores():
    # bootstrap fast path: identity resample == full-corpus score
    idx = np.arange(len(BLEU_PREDS))[None, :]
    for name, fn in (("bleu", gm.corpus_bleu), ("chrf", gm.chrf)):
        resample = reg.METRICS[name].resampler(BLEU_PREDS, BLEU_REFS)
        assert resample(idx)[0] == pytest.approx(fn(BLEU_PREDS, BLEU_REFS))
    # a resample repeating sentence 2 twice == corpus BLEU of that duplicated corpus
    resample = reg.METRICS["bleu"].resampler(BLEU_PREDS, BLEU_REFS)
    dup = [0, 1, 1]
    assert resample(np.array([dup]))[0] == pytest.approx(
        gm.corpus_bleu([BLEU_PREDS[i] for i in dup], [BLEU_REFS[i] for i in dup])
    )


# ------------------------------------------------- BLEU on scripts written without spaces (ragas#2101)


@pytest.mark.parametrize("text", ["今天天气很不错", "私は学生です", "ฉันชอบกินข้าว"])
def test_bleu_of_an_identical_unspaced_translation_is_100(text):
    # With sacrebleu's 13a each of these sentences is ONE token: no bigram, BLEU 0 for a perfect answer.
    assert gm.corpus_bleu([text, text], [text, text]) == pytest.approx(100.0)
    assert gm.sentence_bleu_mean([text], [text]) == pytest.approx(100.0)
    assert reg.compute("bleu", [text], [text]) == pytest.approx(100.0)


def test_bleu_of_chinese_counts_characters_by_hand():
    # zh tokens: hyp 今 天 天 气 很 不 错 (7), ref 今 天 天 气 很 好 (6); clipped matches 1-4 grams:
    # 5/7, 4/6, 3/5, 2/4; hyp longer than ref -> BP 1; BLEU = (5/7 * 4/6 * 3/5 * 2/4) ** (1/4).
    expected = 100 * (5 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert gm.corpus_bleu(["今天天气很不错"], ["今天天气很好"]) == pytest.approx(expected)


def test_bleu_tokenizer_follows_the_references_script():
    # sacrebleu's own default per language (ja-mecab and ko-mecab come with instructkit[cjk], in [test])
    assert gm.bleu_tokenizer(BLEU_REFS) == "13a"  # spaced text: sacrebleu's default, figures unchanged
    assert gm.bleu_tokenizer(["a man rides a bike", "今天天气很好"]) == "zh"
    assert gm.bleu_tokenizer(["私は学生です"]) == "ja-mecab"
    assert gm.bleu_tokenizer(["안녕하세요 세계"]) == "ko-mecab"
    assert gm.bleu_tokenizer(["ฉันชอบกินข้าว"]) == "char"
    assert gm.bleu_tokenizer(["Привет мир"]) == "13a"
    assert gm.bleu_tokenizer(["ｺﾝﾆﾁﾊ ｾｶｲ"]) == "ja-mecab"  # halfwidth katakana


def test_bleu_tokenizer_of_mixed_references_is_the_one_most_need():
    korean, japanese = "나는 어제 학교에 갔습니다.", "猫がマットの上に座っていた。"
    assert gm.bleu_tokenizer(["大韓民國은 民主共和國이다", korean]) == "ko-mecab"  # Hanja in Korean
    assert gm.bleu_tokenizer(["今天天气很好", "约翰・史密斯来了", "我们去公园散步吧"]) == "zh"  # ・ is not kana
    assert gm.bleu_tokenizer(["今天天气很好", "我们去公园散步吧", japanese]) == "zh"  # one Japanese of three
    assert gm.bleu_tokenizer([korean, korean, japanese]) == "ko-mecab"
    assert gm.bleu_tokenizer(["今天天气很好", japanese]) == "zh"  # a tie
    assert gm.bleu_tokenizer(["a man rides a bike"] * 5 + ["今天天气很好"]) == "zh"  # zh is 13a on spaced text
    # the corpus's figure follows: a Chinese majority scored with one stray Japanese reference
    preds, refs = ["今天天气很不错", "我们去公园吧", japanese], ["今天天气很好", "我们去公园散步吧", japanese]
    from sacrebleu.metrics import BLEU

    assert gm.corpus_bleu(preds, refs) == pytest.approx(BLEU(tokenize="zh").corpus_score(preds, [refs]).score)


def test_bleu_tokenizer_without_mecab_falls_back_and_says_so(monkeypatch, caplog):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    gm._mecab_installed.cache_clear()
    gm.installed_mecab.cache_clear()
    try:
        assert gm.installed_mecab() == ()
        with caplog.at_level("WARNING", logger=gm.__name__):
            assert gm.bleu_tokenizer(["私は学生です"]) == "zh"
            assert gm.bleu_tokenizer(["안녕하세요 세계"]) == "13a"
            assert gm.bleu_tokenizer(["私は先生です"]) == "zh"
            # Korean read as 13a: the one Chinese reference still needs zh
            assert gm.bleu_tokenizer(["안녕하세요 세계", "안녕 친구", "你好世界很大"]) == "zh"
    finally:
        gm._mecab_installed.cache_clear()
        gm.installed_mecab.cache_clear()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("pip install 'instructkit[cjk]'" in m for m in said)  # once per tokenizer


def test_bleu_of_japanese_counts_mecab_words_by_hand():
    # ja-mecab: ref 猫 が マット の 上 に 座っ て い た 。 (11), hyp 猫 が マット に 座っ て い た 。 (9);
    # clipped matches 9/9, 7/8, 5/7, 3/6; BP exp(1 - 11/9). Through zh (every kana a token) it was 28.6.
    expected = 100 * math.exp(1 - 11 / 9) * (9 / 9 * 7 / 8 * 5 / 7 * 3 / 6) ** 0.25
    assert gm.corpus_bleu(["猫がマットに座っていた。"], ["猫がマットの上に座っていた。"]) == pytest.approx(expected)


def test_bleu_of_korean_counts_mecab_morphemes_by_hand():
    # ko-mecab: 나 는 어제 학교 에/로 갔 습니다 . (8 each); matches 7/8, 5/7, 3/6, 1/5, BP 1 -> exactly 50
    # (13a, whole words: 30.2).
    assert gm.corpus_bleu(["나는 어제 학교로 갔습니다."], ["나는 어제 학교에 갔습니다."]) == pytest.approx(50.0)


def test_bleu_resampler_tokenizes_as_the_point_estimate():
    preds, refs = ["今天天气很不错", "我喜欢吃苹果"], ["今天天气很好", "我喜欢吃香蕉"]
    resample = reg.METRICS["bleu"].resampler(preds, refs)
    assert resample(np.array([[0, 1]]))[0] == pytest.approx(gm.corpus_bleu(preds, refs))
    assert gm.corpus_bleu(preds, refs) > 0


@pytest.mark.parametrize("name, perfect", [("accuracy", 1.0), ("exact_match", 1.0), ("token_f1", 1.0), ("rouge1", 1.0),
                                           ("rougeL", 1.0),
                                           ("rougeLsum", 1.0), ("bleu", 100.0), ("chrf", 100.0)])
def test_a_canonically_equivalent_spelling_is_the_same_text_to_every_text_metric(name, perfect):
    # the model writes "café" composed (NFC), the reference is stored decomposed ("cafe" + U+0301): the same
    # text; before, EM and token F1 were 0, ROUGE split "cafe" from a lone accent, BLEU and chrF fell
    composed = "Le caf\u00e9 ouvre \u00e0 huit heures et ferme \u00e0 midi ."
    decomposed = "Le cafe\u0301 ouvre a\u0300 huit heures et ferme a\u0300 midi ."
    assert composed != decomposed
    spec = reg.METRICS[name]
    assert spec.fn([composed], [decomposed]) == pytest.approx(perfect)
    assert spec.fn([decomposed], [composed]) == pytest.approx(perfect)
    if spec.resampler is not None:
        assert spec.resampler([composed] * 3, [decomposed] * 3)(np.array([[0, 1, 2]]))[0] == pytest.approx(perfect)
