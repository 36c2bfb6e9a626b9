"""Crashes and holes the robustness suite found, with where and how each was fixed (written as found).

benchmarks/bench_robustness.py copies this list into benchmarks/results/robustness.json. Status:
"fixed" (fixed here, in the owning module; a regression test guards it), "fixed by the owner" (reported
with a strict-xfail test, then fixed by the module's owner; the test now guards it), or "reported"
(REPORTED: described to the module's owner, not fixed here).
"""

FINDINGS: list[dict[str, str]] = [
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "`~` concatenation was unbounded: doubling a namespace string 30x built a 1 GB string, 200x "
             "ran out of memory (the output cap only sees the printed result)",
     "fix": "`~` compiles to BoundedSandbox.bounded_concat (custom code generator), size-checked first",
     "test": "test_sandbox.py::test_payload_is_refused[doubling_tilde-*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "'%1000000000s' % x and |format allocated 1 GB; with constant operands Jinja even folded it at "
             "compile time (MemoryError while constructing the Template)",
     "fix": "`%` is an intercepted operator (never constant-folded); widths/precisions and '%*' arguments are "
            "checked against the cap; the format filter likewise",
     "test": "test_sandbox.py::test_payload_is_refused[percent_*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "str.format / format_map widths ('{:>1000000000}', '{0:{1}}' with a huge argument) allocated "
             "gigabytes before the output cap",
     "fix": "BoundedSandbox.wrap_str_format checks the format spec widths (and nested-width arguments)",
     "test": "test_sandbox.py::test_payload_is_refused[format_*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "integer growth (x = x * x or x ** 64 in a namespace loop) hung the CPU on multi-million-bit "
             "integers",
     "fix": "* and ** on integers are refused above MAX_INT_BITS = 10,000 bits",
     "test": "test_sandbox.py::test_payload_is_refused[int_*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "nested list/dict doubling ({% set ns.l = [ns.l, ns.l] %} 40x) stays small in memory but "
             "printing or |tojson needs 2^40 characters: hung, then out of memory",
     "fix": "list/dict/tuple literals go through bounded_literal: their printed size (shared parts counted "
            "per reference, cached per render) must stay under the cap; * and + use the same size",
     "test": "test_sandbox.py::test_payload_is_refused[doubling_nested_*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "CPU exhaustion without output: empty nested loops over a 100k-character string (1e10 "
             "iterations), macro fork bombs (2^60 calls), recursive-loop bombs",
     "fix": "per-render budget MAX_OPERATIONS = 100,000 on loop iterations (for-loop items go through "
            "bounded_iter), calls and operators",
     "test": "test_sandbox.py::test_payload_is_refused[nested_string_loops-*, macro_fork_bomb-*, "
             "recursive_loop_bomb-*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "a macro returning its own output twice per level doubled a string 60 times (2^60 characters) "
             "in 60 calls",
     "fix": "the result of every sandboxed call (macros included) is size-checked",
     "test": "test_sandbox.py::test_payload_is_refused[doubling_macro-*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "lipsum(10**9) (a Jinja default global) looped for hours building paragraphs",
     "fix": "lipsum removed from the sandbox globals (no use in prompts)",
     "test": "test_sandbox.py::test_payload_is_refused[lipsum_huge-*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "|batch(10**9, fill) ran out of memory, |slice(10**8) spun for minutes, |join and |replace "
             "with a long separator/replacement, |indent of many lines and |wordwrap with a long wrapstring "
             "amplified past the cap before it was checked",
     "fix": "bounded wrappers of batch, slice, join, replace (exact result size computed first); indent and "
            "wordwrap now count every line / break (indent(100000) of 100,000 lines was 1e10 characters)",
     "test": "test_sandbox.py::test_payload_is_refused[batch_fill-*, slice_many-*, join_amplify-*, "
             "replace_filter_amplify-*]"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "the |wordwrap filter failed on every use (AttributeError: 'str' object has no attribute "
             "'newline_sequence'): the size wrapper dropped Jinja's pass_environment marker",
     "fix": "explicit wrappers that keep each filter's signature and pass_* decorator",
     "test": "test_sandbox.py::test_bounded_constructs_still_render_exactly"},
    {"target": "templates sandbox", "module": "templates/template.py", "status": "fixed",
     "what": "str.replace was refused whenever len(text) x len(new) exceeded the cap, even with nothing to "
             "replace (a 10k-character review with a 50-character replacement)",
     "fix": "the exact result size is computed (count of matches) before replacing",
     "test": "test_sandbox.py::test_bounded_constructs_still_render_exactly"},
    {"target": "Template (Jinja source fuzz)", "module": "templates/template.py", "status": "fixed",
     "what": "deeply nested template source ('{{ ((((...1)))) }}', 5,000 chained filters or '+') raised "
             "RecursionError out of Template() / load_collection instead of a TemplateError",
     "fix": "compile_source maps RecursionError to a TemplateError naming the template; fields_read too",
     "test": "test_fuzz_templates.py::test_deeply_nested_source_is_a_template_error"},
    {"target": "template collections (YAML fuzz)", "module": "templates/library.py", "status": "fixed",
     "what": "malformed collection values crashed load_collection / TemplateLibrary.check with TypeError or "
             "AttributeError: PromptSource `metadata: 5` or `metrics: 7`, schema `samples: 5` or samples that "
             "are not mappings, `templates: 5`, a template's `metrics: 5`, a field type or label_field that is a "
             "list (unhashable); a null or numeric key (`&anchor: 5` parses as a null key) crashed the unknown-key "
             "check (found by the slow profile)",
     "fix": "each value is type-checked where it is read; a TemplateError names the file, schema or template "
            "and the key",
     "test": "test_fuzz_templates.py::test_malformed_collection_values_are_template_errors"},
    {"target": "Template (Jinja source fuzz)", "module": "templates/template.py", "status": "fixed",
     "what": "an undefined value in a constant expression (`{% if ('a'['b'] and x) %}`) raised jinja2's "
             "UndefinedError out of Template() at compile time (Jinja's constant folding evaluates it)",
     "fix": "compile_source maps any jinja2.TemplateError raised while compiling to a TemplateError naming "
            "the template; fields_read (jinja2.meta compiles too) returns an empty set instead of raising",
     "test": "test_fuzz_templates.py::test_constant_folding_errors_are_template_errors"},
    {"target": "data readers (file fuzz)", "module": "data/sources.py, data/build.py", "status": "fixed",
     "what": "JSON the parser refuses beyond syntax escaped as RecursionError (arrays nested 100,000 deep) or "
             "ValueError (an integer over 4,300 digits) from read_table / prepare / load_examples",
     "fix": "parse_jsonl, parse_json and load_examples map them to a DataError naming the file (and line); "
            "with skip_bad_rows a JSONL line is skipped and counted",
     "test": "test_fuzz_data.py::test_json_the_parser_refuses_is_a_data_error_naming_the_file"},
    {"target": "data readers", "module": "data/sources.py", "status": "fixed",
     "what": "a data path containing a NUL character raised ValueError out of read_bytes",
     "fix": "read_bytes maps ValueError to a DataError naming the path",
     "test": "test_fuzz_config.py::test_paths_with_nul_characters_are_instructkit_errors"},
    {"target": "config overrides (fuzz)", "module": "config.py", "status": "fixed",
     "what": "an override through a scalar (`datasets: 5` + datasets.0.path=x, `train: 5` + train.lr=1, "
             "`datasets: [null]`) raised AttributeError/TypeError from apply_override; `datasets: true` in a "
             "config file raised TypeError while resolving relative paths",
     "fix": "apply_override raises a ConfigError naming the override and the key that is not a section; "
            "_resolve_paths leaves a non-list `datasets` to validation (which names it)",
     "test": "test_fuzz_config.py::test_override_through_a_scalar_is_a_config_error"},
    {"target": "config values (fuzz)", "module": "config.py", "status": "fixed",
     "what": "a run name with a NUL/control character or over 255 bytes, or an output_dir with a NUL, passed "
             "validation and crashed later (ValueError: embedded null byte, OSError: File name too long) when "
             "the run folder was created",
     "fix": "RunConfig validates name (no control characters, <= 255 bytes) and output_dir (no NUL)",
     "test": "test_fuzz_config.py::test_run_name_cannot_escape_or_break_the_run_directory"},
    {"target": "config / collection YAML (fuzz)", "module": "config.py, templates/library.py", "status": "fixed",
     "what": "deeply nested YAML ([[[[...]]]] 10,000 deep) raised RecursionError out of load_config, "
             "parse_override and load_collection; a collection path that is a folder or unreadable raised "
             "IsADirectoryError/PermissionError; a config path that is unreadable raised PermissionError",
     "fix": "RecursionError -> ConfigError/TemplateError naming the file; OSError/ValueError on reading -> "
            "the same",
     "test": "test_fuzz_config.py::test_deep_yaml_is_a_config_error, "
             "test_fuzz_templates.py::test_unreadable_collection_files_name_the_file"},
    {"target": "CLI train (error paths)", "module": "data/tokenize.py", "status": "fixed",
     "what": "tokenize_examples called datasets.Dataset.from_dict(columns, fingerprint=...), which datasets 5.2 "
             "does not accept: every `instructkit train` / `run` and every test through tokenize_examples "
             "failed with TypeError",
     "fix": "from_dict(columns) (the fingerprint is still the cache key of the saved folder)",
     "test": "test_concurrency.py (trains through the CLI), tests/train"},
    {"target": "loading safety (damaged model folder)", "module": "models.py", "status": "fixed",
     "what": "a truncated model.safetensors (an interrupted copy or download) raised safetensors' "
             "SafetensorError out of load_model instead of a ModelError",
     "fix": "load_folder maps SafetensorError to a ModelError naming the folder",
     "test": "test_loading_safety.py::test_folder_without_config_or_weights_names_it"},
    # Reported with a strict-xfail test; the owner fixed them in train/loop.py and io.py (read_jsonl skip_torn).
    {"target": "fault injection (torn metrics line)", "module": "train/loop.py", "status": "fixed by the owner",
     "what": "MetricsLog reads metrics.jsonl with io.read_jsonl on resume; a torn last line (power loss or a full "
             "disk mid-append) raises JSONDecodeError and the run cannot resume",
     "fix": "skip (and warn about) an unparsable final line when resuming",
     "test": "test_fault_injection.py::test_resume_survives_a_torn_last_line_in_metrics_jsonl"},
    {"target": "concurrency (odd lock file)", "module": "train/loop.py", "status": "fixed by the owner",
     "what": "_pid_alive lets OverflowError escape from os.kill when .lock holds a number past a C long",
     "fix": "catch OverflowError (and ValueError) in _pid_alive and treat the lock as stale",
     "test": "test_concurrency.py::test_unreadable_lock_contents_are_treated_as_stale[9999...]"},
    # Reported (the suggestions were written down as found), then fixed by the owner with a regression test.
    {"target": "concurrency (whole pipeline)", "module": "pipeline.py, cli.py", "status": "fixed by the owner",
     "what": "the run lock was taken only inside train(): a second `instructkit run`/`prepare` on the same run "
             "directory re-ran prepare and the base evaluation into the same folder before it was refused",
     "fix": "pipeline.run holds run_lock (re-entrant) for the whole run; `instructkit prepare` takes it too",
     "test": "test_concurrency.py::test_run_and_prepare_refuse_a_folder_locked_by_a_live_process"},
    {"target": "fault injection (kill inside _seal)", "module": "train/checkpoint.py", "status": "fixed by the owner",
     "what": "a kill between the two renames of _seal (replacing an existing step folder after a resume) left "
             "checkpoints/.old-step-N-<pid> forever: save_checkpoint cleaned .tmp-* only",
     "fix": "checkpoint._tidy, before every save: .old-<name>-<pid> is renamed back when <name> is missing, "
            "else removed",
     "test": "test_checkpoint.py::test_folders_left_by_a_kill_between_renames_are_restored_or_removed"},
    {"target": "CLI compare", "module": "pipeline.py", "status": "fixed by the owner",
     "what": "compare_step loaded and evaluated the base model before resolving --tuned: a typo in --tuned was "
             "reported only after the whole base evaluation (minutes with a real model)",
     "fix": "compare_step resolves both models' configs (no weights) first",
     "test": "test_cli_errors.py::test_compare_checks_tuned_before_evaluating_the_base"},
    {"target": "config values", "module": "config.py", "status": "fixed by the owner",
     "what": "non-finite floats were accepted (train.lr=.inf, datasets.0.weight=1e400 -> inf); training then "
             "stopped at step 1 with a TrainingError instead of a ConfigError naming the key",
     "fix": "ConfigDict(allow_inf_nan=False) on Section",
     "test": "test_config.py::test_non_finite_numbers_are_config_errors_naming_the_key"},
    {"target": "prepare (empty train split)", "module": "data/build.py", "status": "fixed by the owner",
     "what": "prepare succeeded (exit 0) when split fractions left no training rows for a small dataset; the "
             "error appeared only at `train` (no training examples)",
     "fix": "prepare raises a DataError naming the run folder and writes nothing",
     "test": "tests/data/test_build.py::test_empty_train_split_is_an_error_and_writes_nothing"},
]

# Described to the module's owner and not fixed yet (none at present).
REPORTED: list[dict[str, str]] = []
