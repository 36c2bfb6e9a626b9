"""Evaluation: metrics (``instructkit.evaluate.metrics``) and bootstrap confidence intervals
(``instructkit.evaluate.bootstrap``)."""

SCORING_VERSION = 3
"""Raised whenever the same model, examples and eval settings can score differently. It is written to
eval.json (`settings.scoring_version`) and is part of the run's evaluation fingerprint, so an evaluation an
earlier version scored runs again (the earlier one is kept beside the run) instead of counting as up to date.

    1   (no version written) everything before 2
    2   k-shot choices end with the demonstrations' separator, not EOS; a reasoning block before a
        generated answer is not scored; k-shot generation stops at the demonstration end
    3   BLEU tokenizes Chinese and Japanese references with sacrebleu's zh, Thai/Lao/Myanmar/Khmer by character;
        exact match and token F1 delete Unicode punctuation too and count each character of a script
        written without spaces as a word; rougeLsum splits a text without newlines at its sentence ends;
        a bootstrap resample's macro-F1 leaves out the classes it lacks; all-right / all-wrong intervals are exact;
        a generated answer names its choice through quotes and brackets of any script and full-width forms,
        and "4.5" names no choice
"""
