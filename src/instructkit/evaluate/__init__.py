"""Evaluation: metrics (``instructkit.evaluate.metrics``) and bootstrap confidence intervals
(``instructkit.evaluate.bootstrap``)."""

SCORING_VERSION = 5
"""The version of the scoring rules, raised in each release whose scoring differs for the same model, examples
and eval settings. It is written to eval.json (`settings.scoring_version`) and is part of the run's
evaluation fingerprint: when it has changed, `instructkit run` evaluates again (the earlier evaluation kept
beside the run) instead of counting the earlier one as up to date.

    1   (no version written) everything before 2
    2   k-shot choices end with the demonstrations' separator, not EOS; a reasoning block before a
        generated answer is not scored; k-shot generation stops at the demonstration end
    3   BLEU tokenizes Chinese and Japanese references with sacrebleu's zh, Thai/Lao/Myanmar/Khmer by character;
        exact match and token F1 delete Unicode punctuation too and count each character of a script
        written without spaces as a word; rougeLsum splits a text without newlines at its sentence ends;
        a bootstrap resample's macro-F1 leaves out the classes it lacks; all-right / all-wrong intervals are exact;
        a generated answer names its choice through quotes and brackets of any script and full-width forms,
        and "4.5" names no choice
    4   a generated answer that hedges between choices ("positive/negative", "4 or 5") names none; one that
        does not start with a choice is read after its last "answer is" / "answer:" ("... The answer is 4.");
        rougeLsum and the lead-sentence baseline end no sentence at an abbreviation or initial ("Dr.", "J.")
    5   BLEU tokenizes Japanese references with ja-mecab and Korean ones with ko-mecab, sacrebleu's own
        defaults for them, where instructkit[cjk] is installed (else zh / 13a as before, with a warning);
        accuracy, exact match, token F1, ROUGE, BLEU and chrF compare texts in Unicode NFC, and predictions,
        references and classes are kept in NFC
"""
