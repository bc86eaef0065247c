"""Real text that ships with every Python, for the real-model demo and benchmarks: the standard library's reference
topics (``pydoc_data.topics``, ~465k characters of the language reference: statements, expressions, data model).

Each topic is tokenized whole and cut into windows of ``prompt_tokens + completion_tokens`` tokens; a window becomes
a prompt/completion example (the text of its tokens, decoded). Topics are split between training and held-out by
their position in sorted order, so no held-out window shares a page with a training window.
"""

from __future__ import annotations

HELD_OUT_EVERY = 5  # every 5th topic (sorted by name) is held out: ~20% of the text


def topic_texts() -> dict[str, str]:
    """``{topic: text}`` of the standard library's reference topics, sorted by topic."""
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def windows(tokenizer, text: str, prompt_tokens: int, completion_tokens: int) -> list[dict[str, str]]:
    """Consecutive, non-overlapping prompt/completion windows of ``text``'s tokens (a short tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size = prompt_tokens + completion_tokens
    out = []
    for start in range(0, len(ids) - size + 1, size):
        prompt = tokenizer.decode(ids[start : start + prompt_tokens])
        completion = tokenizer.decode(ids[start + prompt_tokens : start + size])
        if prompt.strip() and completion.strip():
            out.append({"prompt": prompt, "completion": completion})
    return out


def reference_windows(
    tokenizer, prompt_tokens: int, completion_tokens: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, held_out)`` prompt/completion examples from every reference topic."""
    train, held_out = [], []
    for index, text in enumerate(topic_texts().values()):
        part = held_out if index % HELD_OUT_EVERY == 0 else train
        part.extend(windows(tokenizer, text, prompt_tokens, completion_tokens))
    return train, held_out
