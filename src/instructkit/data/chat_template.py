"""What a tokenizer's chat template can render, and a conversation adapted to it.

`template_features` probes the template once (per template text) by rendering tiny conversations:

    system       a system turn's content appears (Gemma-3 folds it into the first user turn: still yes)
    tools        `apply_chat_template(..., tools=[...])` writes the function specs
    tool_calls   an assistant turn's `tool_calls` are written, with their arguments
    arguments_text  ... only when the arguments are their JSON text (OpenAI's wire form: DeepSeek-V3's
                 template concatenates them as a string and fails on an object, a template that prints
                 them as they are writes an object as a Python dict, {'city': 'Paris'}); an object is
                 passed wherever it renders as such (`| tojson`, `| items`), as most templates expect
                 (transformers#45419: templates disagree on the form)
    call_ids     ... only when every call has an `id` (Mistral's template: 9 letters and digits)

A template that renders tools natively gets each tool answer linked to the call it answers (the k-th answer
after an assistant turn, its k-th call): the answer's `name` (the function's, which templates write with
the result) and `tool_call_id` are the call's unless the data gives them. Calls without an `id` get
"call00001", "call00002", ... in the conversation when the template requires ids (vllm#9019: Mistral's
template refuses other ids), so data without ids (ShareGPT) still gets the template's own format. Data whose
ids such a template refuses (OpenAI's "call_" + 24 characters, for Mistral's) gets, in every path that renders
a conversation, each id not of the probe's form (9 letters and digits) replaced by a 9-character base-36
digest of it (`call_ids_for`), the same in a call and in its answers, distinct ids staying distinct, so the
same data always gives the same tokens; logged once per template. The data's ids are kept wherever the
template renders them; a conversation that fails with the replaced ids too fails for another reason.
    tool_role    a `tool` turn renders (no error, content written)

`adapt_messages` gives the messages and `tools` argument to render. A template with tools, tool_calls and
the tool role gets the conversation as it is (`tools=` passed through; call arguments as their JSON text
for a template that needs that form). Any other template gets the
documented plain rendering instead, never silence:

    * the function specs go into the system turn (one is added first when there is none) as
      TOOLS_PREAMBLE + one JSON spec per line + TOOLS_CALL_FORMAT;
    * a tool call is an assistant turn whose text is the call's JSON (data/chat.py `tool_call_text`),
      trained like any assistant text;
    * a tool answer is a `tool` turn, or, when the template refuses that role, a user turn
      "Function result:\\n<answer>" (the answers to parallel calls in one such turn, one after the
      other, each with its "Function result:" line, since such templates refuse two user turns in a
      row); masked like every non-assistant turn;
    * a template that drops or refuses a system turn gets the system text at the top of the first user
      turn, separated by a blank line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from instructkit.data.chat import message_text
from instructkit.errors import TemplateError

log = logging.getLogger(__name__)

TOOLS_PREAMBLE = "You can call these functions (JSON Schema):"
TOOLS_CALL_FORMAT = ('To call one, answer with only the JSON object {"name": <function name>, "arguments": '
                     "{<arguments>}}.")
FUNCTION_RESULT = "Function result:\n"

_PROBE_SYSTEM = "zq7 system probe"
_PROBE_FUNCTION = "zq7_probe_function"
_PROBE_TOOL = "zq7 tool probe"
_PROBE_ARGUMENTS = {"zq7_arg": "zq7 value"}
_PROBE_ID = "zq7probe1"  # 9 letters and digits, as Mistral's template requires
_ID_FORM = re.compile(r"[A-Za-z0-9]{9}")  # the form of _PROBE_ID: ids a template with `call_ids` renders
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TemplateFeatures:
    """What a chat template renders (see the module docstring)."""

    system: bool
    tools: bool
    tool_calls: bool
    tool_role: bool
    arguments_text: bool = False
    call_ids: bool = False

    @property
    def native_tools(self) -> bool:
        """The template renders tools, tool calls and tool answers itself."""
        return self.tools and self.tool_calls and self.tool_role


_FEATURES: dict[tuple, TemplateFeatures] = {}


def template_name(tokenizer: Any) -> str:
    """How error messages name a tokenizer's chat template."""
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}"


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
           generation_prompt: bool, tokenize: bool = True) -> Any:
    """`tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=...)`: ids or text.

    Raises: TemplateError naming the template when the tokenizer has none or it fails on `messages`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"{template_name(tokenizer)}: the tokenizer has no chat template "
                            "(set `model.chat_template: false` for a plain prompt/completion)")
    try:
        return tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                             add_generation_prompt=generation_prompt, tokenize=tokenize,
                                             return_dict=False)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception, KeyError, TypeError: all a render failure
        roles = "/".join(str(m.get("role")) for m in messages)
        raise TemplateError(f"{template_name(tokenizer)} cannot render a conversation of roles {roles}: "
                            f"{exc}") from None


def template_features(tokenizer: Any) -> TemplateFeatures:
    """What `tokenizer`'s chat template renders (probed once per template text and special tokens)."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    found = _FEATURES.get(key)
    if found is not None:
        return found
    user = {"role": "user", "content": "hi"}
    spec = {"type": "function", "function": {"name": _PROBE_FUNCTION, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}

    def call(arguments: Any, ids: bool = True) -> dict:
        function = {"type": "function", "function": {"name": _PROBE_FUNCTION, "arguments": arguments}}
        return {"role": "assistant", "content": "", "tool_calls": [{"id": _PROBE_ID, **function} if ids else function]}

    def text(messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            return render(tokenizer, messages, tools, False, tokenize=False)
        except TemplateError:
            return ""

    # An object renders as such when its key and value are written, not as a Python dict ('zq7_arg'); its
    # JSON text when written once ("zq7_arg"), not JSON-encoded again (\"zq7_arg).
    as_object = text([user, call(_PROBE_ARGUMENTS)])
    as_object = _PROBE_FUNCTION in as_object and all(v in as_object for v in ("zq7_arg", "zq7 value")) \
        and "'zq7_arg'" not in as_object
    as_text = text([user, call(json.dumps(_PROBE_ARGUMENTS))])
    as_text = not as_object and '"zq7_arg"' in as_text and '\\"zq7_arg' not in as_text
    arguments = json.dumps(_PROBE_ARGUMENTS) if as_text else _PROBE_ARGUMENTS
    answer = {"role": "tool", "content": _PROBE_TOOL, "tool_call_id": _PROBE_ID, "name": _PROBE_FUNCTION}
    found = TemplateFeatures(
        system=_PROBE_SYSTEM in text([{"role": "system", "content": _PROBE_SYSTEM}, user]),
        tools=_PROBE_FUNCTION in text([user], [spec]),
        tool_calls=as_object or as_text,
        tool_role=_PROBE_TOOL in text([user, call(arguments), answer]),
        arguments_text=as_text,
        call_ids=(as_object or as_text) and _PROBE_FUNCTION not in text([user, call(arguments, ids=False)]),
    )
    _FEATURES[key] = found
    return found


def tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The function specs as the system text of the plain rendering (one JSON spec per line)."""
    specs = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return "\n".join([TOOLS_PREAMBLE, *specs, TOOLS_CALL_FORMAT])


def adapt_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                   tools: Sequence[Mapping[str, Any]] | None) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools argument) to render `messages` with `tokenizer`'s template (module docstring)."""
    features = template_features(tokenizer)
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not uses_tools:
        out = [_plain(m) for m in messages]
        return (out if features.system else _merge_system(out)), None
    linked = _link_tool_answers([_plain(m) for m in messages], features.call_ids)
    if features.native_tools:
        out = _arguments_as_text(linked) if features.arguments_text else linked
        tools_arg = list(tools) if tools else None
        return (call_ids_for(tokenizer, out, tools_arg) if features.call_ids else out), tools_arg
    if _warn_once(tokenizer, "tools"):
        log.warning("%s does not render tools itself: function specs go into the system turn and tool calls "
                    "are written as JSON (instructkit.data.chat_template)", template_name(tokenizer))
    out = []
    for m in linked:
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": message_text(m)})
        elif m["role"] == "tool" and not features.tool_role:
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith(FUNCTION_RESULT):
                # parallel calls' results: one user turn (templates that alternate roles refuse two)
                out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{FUNCTION_RESULT}{m['content']}"}
            else:
                out.append({"role": "user", "content": FUNCTION_RESULT + m["content"]})
        else:  # a tool turn keeps the call it answers (`_link_tool_answers`), for templates that write it
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name", "tool_call_id")})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools_text(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tools_text(tools)})
    out = out if features.system else _merge_system(out)
    return (call_ids_for(tokenizer, out, None) if features.call_ids else out), None


def call_ids_for(tokenizer: Any, messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """`messages` (adapted to a template that requires call ids) with ids the template renders: the data's
    when it renders them, else each id not of the probe's form replaced by `short_call_id` of it in every
    call and tool answer (module docstring). A conversation the template refuses with the replaced ids too
    comes back with them, so that rendering it raises the template's other fault."""
    ids = list(dict.fromkeys(str(i) for i in _ids_in(messages)))
    if all(_ID_FORM.fullmatch(i) for i in ids):
        return messages
    try:
        render(tokenizer, messages, tools, False, tokenize=False)
        return messages
    except TemplateError:
        pass
    used = {i for i in ids if _ID_FORM.fullmatch(i)}
    new: dict[str, str] = {}
    for i in ids:
        if i not in used:
            salt = 0
            while (short := short_call_id(i, salt)) in used:  # a collision: the next digest, in order of appearance
                salt += 1
            new[i] = short
            used.add(short)
    replaced = [_with_ids(m, new) for m in messages]
    try:
        render(tokenizer, replaced, tools, False, tokenize=False)
    except TemplateError:
        return replaced
    if _warn_once(tokenizer, "call ids"):
        log.warning("%s refuses the tool-call ids of the data (it renders ids of 9 letters and digits): the ids it "
                    "refuses are replaced by a 9-character digest of each, in every call and its tool answers "
                    "(instructkit.data.chat_template)", template_name(tokenizer))
    return replaced


def short_call_id(call_id: str, salt: int = 0) -> str:
    """9 letters and digits (base 36) digested from `call_id` (and `salt`, > 0 after a collision)."""
    data = (call_id if salt == 0 else f"{salt}:{call_id}").encode("utf-8", "surrogatepass")
    n = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    digits = []
    for _ in range(9):
        n, r = divmod(n, 36)
        digits.append(_DIGITS[r])
    return "".join(digits)


def _ids_in(messages: list[dict]) -> list[Any]:
    """The call ids of `messages` in order of appearance: each call's `id`, each tool answer's `tool_call_id`."""
    found = []
    for m in messages:
        found += [c["id"] for c in m.get("tool_calls") or () if c.get("id") is not None]
        if m["role"] == "tool" and m.get("tool_call_id") is not None:
            found.append(m["tool_call_id"])
    return found


def _with_ids(message: dict, new: dict[str, str]) -> dict:
    """`message` with its calls' ids and its `tool_call_id` replaced as `new` maps them (by their text)."""
    if message.get("tool_calls"):
        calls = [{**c, "id": new.get(str(c["id"]), c["id"])} if c.get("id") is not None else c
                 for c in message["tool_calls"]]
        message = {**message, "tool_calls": calls}
    if message["role"] == "tool" and message.get("tool_call_id") is not None:
        message = {**message, "tool_call_id": new.get(str(message["tool_call_id"]), message["tool_call_id"])}
    return message


def _plain(message: Mapping[str, Any]) -> dict:
    """A copy of `message` without instructkit's training marks ("weight": data/chat_encode.py)."""
    return {k: v for k, v in message.items() if k != "weight"}


def _link_tool_answers(messages: list[dict], need_ids: bool) -> list[dict]:
    """Tool answers with the `name` and `tool_call_id` of the call each answers; calls given ids when the
    template needs them (module docstring)."""
    out: list[dict] = []
    pending: list[dict] = []
    made = 0
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                if need_ids and not c.get("id"):
                    made += 1
                    c = {"id": f"call{made:05d}", **c}
                calls.append(c)
            m = {**m, "tool_calls": calls}
            pending = list(calls)
        elif m["role"] == "tool" and pending:
            c = pending.pop(0)
            link = {"name": c["function"]["name"], **({"tool_call_id": c["id"]} if c.get("id") else {})}
            m = {**link, **m}
        out.append(m)
    return out


def _arguments_as_text(messages: list[dict]) -> list[dict]:
    """`messages` with every tool call's arguments as their JSON text (OpenAI's wire form)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                                  ensure_ascii=False)}}
                     for c in m["tool_calls"]]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


_WARNED: set[tuple] = set()


def _warn_once(tokenizer: Any, what: str) -> bool:
    key = (tokenizer.chat_template, what)
    if key in _WARNED:
        return False
    _WARNED.add(key)
    return True


def _merge_system(messages: list[dict]) -> list[dict]:
    """The system text at the top of the first user turn, for templates that drop or refuse system turns."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    for j, m in enumerate(rest):
        if m["role"] == "user":
            rest[j] = {**m, "content": f"{system}\n\n{m['content']}"}
            break
    return rest
