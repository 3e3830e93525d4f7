"""The chat prompt a sample renders to, and its human-readable form.

A prompt shows the household's profile, the "bought most often" section and the recent history
(each item as its prefix token(s) followed by the placeholder the model fills with the item's
fused embedding), then the instruction. Shared by the tasks stage (examples), training, the GR
baselines (items as text) and the serving runtime. The system turn and whether the profile line
is shown are the run's :class:`~sigmarec.tasks.prompt_style.PromptStyle`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from sigmarec.tasks.definitions import SOFT_TOKEN
from sigmarec.tasks.prompt_style import DEFAULT_STYLE, PromptStyle


class RenderedPrompt(NamedTuple):
    text: str  # the prompt up to the assistant turn, with one SOFT_TOKEN per history item
    positions: list[int]  # character offset of each SOFT_TOKEN, in prompt order
    history: list[int]  # the item behind each placeholder: the frequent section, then the history
    label: str | None  # the target's prefix token(s) then the query token (training samples)
    n_context: int = 0  # leading placeholders that are the frequent section, not the sequence


def _vocab_parts(vocab: Any) -> tuple[list[int], str]:
    if isinstance(vocab, Mapping):
        return list(vocab["prefix_codebook_sizes"]), str(vocab.get("query_token", "<q>"))
    return list(vocab.codebook_sizes), str(vocab.query_token)


def prefix_tokens(item: int, vocab: Any, item_prefix: np.ndarray) -> str:
    """The item's SID prefix written as vocabulary tokens (e.g. ``<a_3>`` or ``<a_3><b_7>``)."""
    from sigmarec.tokenization.hybrid import prefix_token

    sizes, _ = _vocab_parts(vocab)
    flat = int(item_prefix[int(item)])
    codes = []
    for k in reversed(sizes):
        codes.append(flat % k)
        flat //= k
    return "".join(prefix_token(lv, c) for lv, c in enumerate(reversed(codes)))


_RESERVED = re.compile(r"<\|item\|>|<[a-z]_\d+>|<q>")


def _sanitize(text: str, query_token: str) -> str:
    """Free text must not smuggle placeholders or item tokens into a prompt."""
    return _RESERVED.sub(" ", str(text).replace(query_token, " ")).strip()


def _get(sample: Any, key: str, default: Any = None) -> Any:
    if isinstance(sample, (Mapping, pd.Series)):
        return sample.get(key, default)
    return getattr(sample, key, default)


def _chat(messages: list[dict[str, str]], tokenizer: Any) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    # ChatML, the layout SmolLM2's own template produces.
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def render_prompt(sample: Any, items: pd.DataFrame | None, vocab: Any,
                  item_prefix: np.ndarray, tokenizer: Any = None, *,
                  style: PromptStyle = DEFAULT_STYLE,
                  item_text: Callable[[int], str] | None = None) -> RenderedPrompt:
    """Chat-style prompt of one sample: ``style``'s system turn, then the profile (unless
    ``style`` leaves it out), "Recently bought:" with each history item as its prefix token(s)
    followed by ``SOFT_TOKEN`` (where the model puts the item's fused embedding), then the
    instruction. ``label`` is the target's prefix token(s) and the query token. ``items`` is
    unused here (kept for a uniform signature with ``decode_sample``).

    ``item_text`` (the GR baselines) writes each item, in the history and as the label, as
    that string instead (e.g. its full semantic ID as tokens): same prompt, no placeholders
    (``positions`` is empty) and no query token."""
    _, qtok = _vocab_parts(vocab)
    history = [int(i) for i in np.asarray(_get(sample, "history", []), dtype=np.int64)]
    frequent = _get(sample, "frequent", None)
    frequent = [] if frequent is None or (isinstance(frequent, float) and np.isnan(frequent)) \
        else [int(i) for i in np.asarray(frequent, dtype=np.int64)]
    profile = _sanitize(_get(sample, "profile", "") or "unknown", qtok)
    instruction = _sanitize(_get(sample, "instruction", ""), qtok)

    def write(items: list[int]) -> str:
        if item_text is None:
            return " ".join(f"{prefix_tokens(i, vocab, item_prefix)}{SOFT_TOKEN}" for i in items)
        return " ".join(item_text(i) for i in items)

    hist = write(history)
    # The frequent section comes first: every history position (and its dense next-item loss)
    # can then read the household's long-run favourites.
    often = f"Bought most often (most first): {write(frequent)}\n" if frequent else ""
    head = f"Household profile: {profile}.\n" if style.profile_line else ""
    user = (f"{head}{often}"
            f"Recently bought (oldest first): {hist if hist else 'nothing yet'}\n"
            f"Request: {instruction}")
    text = _chat([{"role": "system", "content": style.system},
                  {"role": "user", "content": user}], tokenizer)
    positions = [m.start() for m in re.finditer(re.escape(SOFT_TOKEN), text)]
    if item_text is None and len(positions) != len(frequent) + len(history):
        raise AssertionError(f"prompt has {len(positions)} item placeholders for "
                             f"{len(frequent)} + {len(history)} frequent + history items")
    target = _get(sample, "target", None)
    label = None
    if target is not None and not (isinstance(target, float) and np.isnan(target)):
        label = (prefix_tokens(int(target), vocab, item_prefix) + qtok if item_text is None
                 else item_text(int(target)))
    return RenderedPrompt(text, positions, frequent + history, label, len(frequent))


def item_description(items: pd.DataFrame, item: int) -> str:
    """A short readable name of an item: title, parent category, brand."""
    r = items.iloc[int(item)]
    parts = [str(r.get("title") or r.get("item_id"))]
    path = [p.strip() for p in str(r.get("category_path") or "").split(" > ") if p.strip()]
    if len(path) >= 2 and path[-2] not in parts:
        parts.append(path[-2].lower())
    brand = r.get("brand")
    if isinstance(brand, str) and brand:
        parts.append(brand)
    return " / ".join(parts)


def decode_sample(sample: Any, items: pd.DataFrame, vocab: Any, item_prefix: np.ndarray,
                  tokenizer: Any = None, max_targets: int = 5, *,
                  style: PromptStyle = DEFAULT_STYLE) -> str:
    """The prompt for people to read: each soft token replaced by ``[item text]``, then the
    label (training) or the targets (evaluation)."""
    p = render_prompt(sample, items, vocab, item_prefix, tokenizer, style=style)
    parts, last = [], 0
    for pos, it in zip(p.positions, p.history, strict=True):
        parts.append(p.text[last:pos])
        parts.append(f"[{item_description(items, it)}]")
        last = pos + len(SOFT_TOKEN)
    parts.append(p.text[last:])
    text = "".join(parts)
    if p.label is not None:
        target = item_description(items, _get(sample, "target"))
        text += f"{p.label}    <- label; target = [{target}]"
    targets = [int(t) for t in np.asarray(_get(sample, "targets", []), dtype=np.int64)]
    if targets:
        shown = "; ".join(f"{prefix_tokens(t, vocab, item_prefix)} {item_description(items, t)}"
                          for t in targets[:max_targets])
        more = f" (+{len(targets) - max_targets} more)" if len(targets) > max_targets else ""
        text += f"\n# all targets ({len(targets)}): {shown}{more}"
    return text
