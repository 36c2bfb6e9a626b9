"""`instructkit templates list | show | check`: browse and validate prompt templates (see cli.py)."""

from __future__ import annotations

import argparse
import json
import os

from instructkit.errors import InstructkitError


def make_console():
    """The console every command prints with (no automatic highlighting of numbers and paths)."""
    from rich.console import Console

    return Console(highlight=False)




def cmd_templates_list(args: argparse.Namespace) -> int:
    from instructkit.templates.library import TemplateLibrary

    library = TemplateLibrary.load(args.templates)
    chosen = library.select(dataset=args.dataset, task=args.task)
    if args.format == "json":
        rows = [
            {"id": t.id, "name": t.name, "dataset": t.dataset, "task": t.task, "choices": t.has_choices,
             "choices_in_prompt": t.choices_in_prompt, "metrics": list(t.effective_metrics), "version": t.version}
            for t in chosen
        ]
        print(json.dumps(rows, indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(chosen)} templates over {len({t.dataset for t in chosen})} dataset schemas")
    # Ids are never cut (they are what `show` and configs take): the id column keeps its full width and
    # the other columns wrap when the terminal (or the default 80 columns of a pipe) is narrower.
    table.add_column("id", no_wrap=True, overflow="ignore", min_width=max((len(t.id) for t in chosen), default=2))
    for column in ("task", "choices", "metrics"):
        table.add_column(column, overflow="fold")
    for t in chosen:
        choices = "in prompt" if t.choices_in_prompt else ("yes" if t.has_choices else "")
        table.add_row(t.id, t.task, choices, ", ".join(t.effective_metrics))
    console = make_console()
    if not console.is_terminal and "COLUMNS" not in os.environ:  # a pipe or file: the table's natural width
        console.width = 10_000
        console.width = max(80, console.measure(table).maximum)
    if console.width >= table.columns[0].min_width + 40:
        console.print(table)
        return 0
    console.print(table.title, markup=False)  # too narrow for a table: one template per two lines
    for t in chosen:
        choices = "choices in prompt" if t.choices_in_prompt else ("choices" if t.has_choices else "")
        console.print(t.id, markup=False, overflow="ignore", crop=False)
        console.print("    " + " · ".join(x for x in (t.task, choices, ", ".join(t.effective_metrics)) if x),
                      markup=False)
    return 0


def cmd_templates_show(args: argparse.Namespace) -> int:
    from instructkit.templates.library import TemplateLibrary

    library = TemplateLibrary.load(args.templates)
    template = library.get(args.id)
    schema = library.schemas.get(template.dataset)
    console = make_console()
    info = template.to_dict()
    console.print(f"[bold]{template.id}[/bold]  ({template.task}, dataset schema {template.dataset}, "
                  f"version {template.version})")
    console.print(f"origin: {template.origin}")
    console.print(f"metrics: {', '.join(info['metrics'])}")
    if template.answer_choices is not None:
        console.print(f"answer choices: {info['answer_choices']} (in prompt: {template.choices_in_prompt})")
    console.print("[bold]instruction[/bold]", markup=True)
    console.print(template.instruction, markup=False)
    console.print("[bold]completion[/bold]", markup=True)
    console.print(template.completion, markup=False)
    if schema is not None and schema.samples:
        rendered = template.render(schema.coerce(schema.samples[0]))
        console.print("[bold]example (first sample row)[/bold]")
        console.print(rendered.prompt, markup=False)
        console.print(f"-> {rendered.completion}", markup=False)
    return 0


def cmd_templates_check(args: argparse.Namespace) -> int:
    from instructkit.templates.library import TemplateLibrary

    if args.files:
        library = TemplateLibrary.load(args.files, include_builtin=False)
    else:
        library = TemplateLibrary.builtin()
    rows = None
    templates = None
    if args.data:
        from instructkit.data.sources import rows_for_check

        schema = args.schema or _only_schema(library)
        columns = dict(pair.split("=", 1) for pair in args.column or [])
        rows = {schema: rows_for_check(args.data, library.schema(schema), columns, limit=args.limit,
                                       format=args.format, delimiter=args.delimiter)}
        templates = library.select(dataset=schema)
    missing: dict = {}
    problems = library.check(rows=rows, templates=templates, missing=missing)
    checked = len(templates) if templates is not None else len(library)
    console = make_console()
    for template_id, fields in missing.items():
        lacking = ", ".join(f"{n} rows lack {f!r}" for f, n in fields.items())
        console.print(f"note: {template_id}: {lacking} (data rows skipped, not a template fault)", markup=False)
    for problem in problems:
        console.print("FAIL", style="red", end=" ")
        console.print(str(problem), markup=False)
    where = f" on {args.data}" if args.data else " on their sample rows"
    if problems:
        console.print(f"{len(problems)} problem(s) in {checked} templates{where}")
        return 1
    console.print(f"OK: {checked} templates pass{where}")
    return 0


def _only_schema(library) -> str:
    if len(library.schemas) == 1:
        return next(iter(library.schemas))
    raise InstructkitError("--data needs --schema NAME when the templates span several schemas")
