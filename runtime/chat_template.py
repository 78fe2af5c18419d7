"""Chat templates: a checkpoint's own Jinja template (`chat_template.jinja`, else
tokenizer_config.json's `chat_template`) turns a list of messages into the prompt text, as
transformers' `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` does.

Templates come with downloaded checkpoints, so they are untrusted code: they render in jinja2's
ImmutableSandboxedEnvironment (what transformers uses), which refuses attribute escapes
(`''.__class__.__mro__`) and mutation of the values passed in. The variables and helpers are
the ones Hugging Face templates use: `messages`, `add_generation_prompt`, `bos_token`,
`eos_token` (and the other special tokens tokenizer_config.json names), `tools`, `documents`,
`raise_exception(message)`, `strftime_now(format)`, a `tojson` filter that does not escape
HTML, `namespace` and loop controls.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from runtime.errors import RequestError, RuntimeInputError

TEMPLATE_FILE, CONFIG_FILE = "chat_template.jinja", "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
MESSAGE_FIELDS = ("role", "content", "name")


class ChatTemplateError(RequestError):
    """The template refused the messages (its raise_exception) or failed to render them."""


class _Raised(Exception):
    """raise_exception() inside a template: its message is for the user."""


def _raise_exception(message) -> None:
    raise _Raised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names (no way to reach Python internals)."""

        def __init__(*args, **kwargs):  # Jinja's signature: namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} refused")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=Namespace)
    return env


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else '(no message)'}"[:300]


@dataclasses.dataclass
class ChatTemplate:
    """A checkpoint's chat template, compiled in the sandbox; `source` names the file it came
    from in every error."""
    source: Path
    template: str
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        import jinja2
        try:
            self._compiled = _environment().from_string(self.template)
        except jinja2.TemplateSyntaxError as e:
            raise RuntimeInputError(f"{self.source}: the chat template does not compile (line "
                                    f"{e.lineno}: {e.message})") from None
        except Exception as e:  # noqa: BLE001 - anything else jinja raises on a bad template
            raise RuntimeInputError(f"{self.source}: the chat template does not compile "
                                    f"({_one_line(e)})") from None

    @property
    def bos_token(self) -> Optional[str]:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> Optional[str]:
        return self.special_tokens.get("eos_token")

    def render(self, messages, add_generation_prompt: bool = True, tools=None,
               documents=None, field: str = "messages") -> str:
        """The prompt text for `messages` (checked first: errors name `field[i].key`)."""
        messages = check_messages(messages, field)
        try:
            # Special tokens that tokenizer_config.json does not name stay undefined (they
            # render as ""), as in transformers.
            return self._compiled.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=documents, **self.special_tokens)
        except _Raised as e:
            raise ChatTemplateError(f"the chat template of {self.source} refused the messages: "
                                    f"{str(e).strip().splitlines()[0] if str(e).strip() else '?'}"
                                    ) from None
        except Exception as e:  # noqa: BLE001 - a template's bug or a sandbox refusal
            raise ChatTemplateError(f"the chat template of {self.source} failed to render the "
                                    f"messages ({_one_line(e)})") from None

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True, tools=None,
               field: str = "messages") -> list[int]:
        """Rendered and tokenized without adding special tokens (the template writes its own
        BOS), as transformers' apply_chat_template(..., tokenize=True) does."""
        text = self.render(messages, add_generation_prompt, tools=tools, field=field)
        return list(tokenizer.encode(text, add_special_tokens=False))


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where}: must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{where}: not valid Unicode text (it holds a lone surrogate)") \
            from None
    return value


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts,
    joined with newlines (as vLLM joins text parts)."""
    if isinstance(value, str):
        return _text(value, where)
    if not isinstance(value, list):
        raise RequestError(f"{where}: must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type",
                                                                                     "text"}:
            raise RequestError(f'{where}[{i}]: must be {{"type": "text", "text": "..."}} (only '
                               f'text parts are supported)')
        texts.append(_text(part["text"], f"{where}[{i}].text"))
    return "\n".join(texts)


def check_messages(messages, field: str = "messages") -> list[dict[str, str]]:
    """Chat messages as plain dicts of strings, or a RequestError naming the first bad field
    (`messages[2].content: must be a string`)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"{field}: must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: must be an object with 'role' and 'content'")
        unknown = sorted(set(message) - set(MESSAGE_FIELDS), key=str)
        if unknown:
            raise RequestError(f"{where}: unknown field {str(unknown[0])!r:.60}; allowed: "
                               f"{', '.join(MESSAGE_FIELDS)}")
        for key in ("role", "content"):
            if key not in message:
                raise RequestError(f"{where}.{key}: missing")
        role = _text(message["role"], f"{where}.role")
        if not role:
            raise RequestError(f"{where}.role: must not be empty")
        plain = {"role": role, "content": _content(message["content"], f"{where}.content")}
        if "name" in message:
            plain["name"] = _text(message["name"], f"{where}.name")
        checked.append(plain)
    return checked


def _read_config(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RuntimeInputError(f"{path} is not readable JSON: {_one_line(e)}") from None
    if not isinstance(values, dict):
        raise RuntimeInputError(f"{path}: expected a JSON object")
    return values


def _special_tokens(values: dict, path: Path) -> dict[str, str]:
    """bos_token, eos_token, ... as strings: tokenizer_config.json writes each as a string or
    as an AddedToken object ({"content": ..., ...}); null or absent: not set."""
    tokens = {}
    for key in SPECIAL_TOKENS:
        value = values.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise RuntimeInputError(f"{path}: {key} must be a string or an object with a "
                                    f"'content' string")
        tokens[key] = value
    return tokens


def _config_template(value: Any, path: Path) -> Optional[str]:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}
    of which the one named "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" not in named:
            raise RuntimeInputError(f"{path}: chat_template lists templates named "
                                    f"{', '.join(map(repr, named))} but none named 'default'")
        return named["default"]
    raise RuntimeInputError(f"{path}: chat_template must be a string or a list of "
                            f'{{"name": ..., "template": ...}} objects')


def _template_folder(checkpoint_dir: Path) -> Optional[Path]:
    """The folder with the tokenizer files: DIR, or its parent when DIR is a ckpt-0 folder
    inside the download (the same rule as the tokenizer's)."""
    for folder in (checkpoint_dir, checkpoint_dir.parent):
        if (folder / TEMPLATE_FILE).is_file() or (folder / CONFIG_FILE).is_file():
            return folder
    return None


def load_chat_template(checkpoint_dir) -> Optional[ChatTemplate]:
    """The checkpoint's chat template (chat_template.jinja, else tokenizer_config.json's
    chat_template), with the special tokens tokenizer_config.json names; None without one.
    A GGUF file's comes from its metadata (tokenizer.chat_template)."""
    from runtime.checkpoint.gguf_file import is_gguf
    if Path(checkpoint_dir).is_file() and is_gguf(Path(checkpoint_dir)):
        from runtime.gguf_tokenizer import gguf_chat_template
        found = gguf_chat_template(checkpoint_dir)
        return None if found is None else ChatTemplate(Path(checkpoint_dir), *found)
    folder = _template_folder(Path(checkpoint_dir))
    if folder is None:
        return None
    config_path = folder / CONFIG_FILE
    values = _read_config(config_path) if config_path.is_file() else {}
    template_path = folder / TEMPLATE_FILE
    if template_path.is_file():
        try:
            source, template = template_path, template_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RuntimeInputError(f"{template_path}: cannot be read ({_one_line(e)})") \
                from None
    else:
        source, template = config_path, _config_template(values.get("chat_template"),
                                                         config_path)
        if template is None:
            return None
    return ChatTemplate(source, template, _special_tokens(values, config_path))


def require_chat_template(checkpoint_dir) -> ChatTemplate:
    """load_chat_template, or the error chat requests get on a checkpoint without one."""
    template = load_chat_template(checkpoint_dir)
    if template is None:
        raise RequestError(f"checkpoint {checkpoint_dir} has no chat template "
                           f"({CONFIG_FILE} chat_template or {TEMPLATE_FILE}): chat requests "
                           f"need one (send a plain prompt instead)")
    return template


def template_loader(checkpoint_dir):
    """A function that returns the checkpoint's chat template, read at its first call (plain
    prompts never read it), or raises the same error each time (require_chat_template's when
    there is none, e.g. for every `messages` record of a batch job)."""
    outcome: list = []

    def load() -> ChatTemplate:
        if not outcome:
            try:
                if checkpoint_dir is None:
                    raise RequestError("chat messages need a checkpoint with a chat template")
                outcome.append(require_chat_template(checkpoint_dir))
            except RuntimeInputError as e:
                outcome.append(e)
        if isinstance(outcome[0], RuntimeInputError):
            raise outcome[0]
        return outcome[0]
    return load
