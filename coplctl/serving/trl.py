"""A coplctl run as a TRL reward function (``GRPOTrainer(reward_funcs=[...])``, RLOO and the like).

    from coplctl.serving.trl import reward_function
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_function("runs/copl", user_column="user_id")],
                          train_dataset=prompts_with_a_user_id_column, ...)

TRL calls a reward function with the batch's ``prompts`` and ``completions`` and every other dataset
column as a keyword argument; the user of each completion comes from ``user_column``. Plain text and
conversational rows are both accepted: a prompt of chat messages is rendered as the backbone's
"Human:/Assistant:" transcript (one message: its content), a completion of messages is its last one's
content. TRL itself is not needed to build the function (the ``trl`` extra installs it for training).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coplctl.core.errors import CoplError


def _prompt(value) -> str:
    from coplctl.data.flat import render_messages

    if isinstance(value, str):
        return value
    text = render_messages(value) if isinstance(value, (list, tuple)) and value else None
    if text is None:
        raise CoplError(f"a prompt must be a text or chat messages with text contents, not {type(value).__name__}")
    return text


def _completion(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], dict) \
            and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise CoplError(f"a completion must be a text or chat messages, not {type(value).__name__}")


def reward_function(run: str | Path, user_column: str = "user_id", *, cache_texts: int = 50_000,
                    batch_size: int = 256) -> Callable[..., list[float]]:
    """A callable ``(prompts, completions, **columns) -> list[float]`` scoring each completion for the user
    in ``columns[user_column]``, named ``coplctl_<method>`` (TRL logs rewards under a function's name)."""
    from coplctl.serving.api import load

    rm = load(run, cache_texts=cache_texts)

    def reward(prompts, completions, **columns) -> list[float]:
        if user_column not in columns:
            raise CoplError(f"the training dataset has no column {user_column!r} naming each prompt's user "
                            f"(columns: {', '.join(sorted(columns)) or 'none'}); pass user_column=...")
        users = [str(u) for u in columns[user_column]]
        texts = [_completion(c) for c in completions]
        return rm.reward(users, [_prompt(p) for p in prompts], texts, batch_size=batch_size).tolist()

    reward.__name__ = reward.__qualname__ = f"coplctl_{rm.name.replace('-', '_')}"
    reward.model = rm  # the loaded run: .users, .adapt(pairs)
    return reward
