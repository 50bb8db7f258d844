"""The `EpisodeTask` interface: verifiable tasks played over several turns with an environment.

The policy acts (one assistant turn, ended by its end-of-turn token), the environment replies
(`EpisodeTask.reply`: a tool's output, a checker's verdict) as the next user turn, and so on until
the policy gives a turn the environment does not answer (its final answer) or ``max_turns`` policy
turns have been taken. The reward comes at the end: `Task.score` checks the final turn's text.

A record holds the whole reference episode in ``messages`` (so SFT on it trains the assistant
turns and never the environment's, which the chat template renders as user turns); the episode
starts from `EpisodeTask.prompt`, the messages before the first assistant turn. Episodes are
rolled out by `esft.evaluation.episodes.episode_rollout`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from esft.data.tasks.base import Task


class EpisodeTask(Task):
    """A `Task` whose answer is reached over several turns with an environment.

    Subclasses implement `sample` and `score` (on the final turn's text) as any task, plus
    `reply` (the environment) and `solve` (the reference actions for a prompt, from which
    `messages` writes the reference episode with the environment's own replies).
    """

    env_role: str = "user"
    """The role the environment's replies are rendered with: ``user`` renders under every chat
    template (some, e.g. Gemma's, accept only alternating user and assistant turns)."""
    max_turns: int = 4
    """Policy turns per episode unless the trainer sets another limit."""

    @abstractmethod
    def reply(self, record: dict[str, Any], action: str) -> str | None:
        """The environment's answer to the policy turn `action` (its decoded, stripped text), or
        None when the turn ends the episode (a final answer)."""

    @abstractmethod
    def solve(self, prompt: str) -> list[str]:
        """The reference policy turns for `prompt`: actions, then the final answer."""

    def messages(self, prompt: str, answer: str) -> list[dict[str, str]]:
        """The reference episode: the prompt, then each reference action and the environment's
        reply to it, then the final answer."""
        out = [{"role": "user", "content": prompt}]
        actions = self.solve(prompt)
        for action in actions[:-1]:
            reply = self.reply({"answer": answer}, action)
            if reply is None:
                raise ValueError(f"task {self.name!r}: the environment ends the reference episode of {prompt!r} "
                                 f"at its action {action!r} before the final answer")
            out += [{"role": "assistant", "content": action}, {"role": self.env_role, "content": reply}]
        return out + [{"role": "assistant", "content": actions[-1]}]

    @staticmethod
    def prompt(record: dict[str, Any]) -> list[dict[str, str]]:
        """The messages an episode starts from: those before the record's first assistant turn."""
        messages = record["messages"]
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        return messages[:first]
