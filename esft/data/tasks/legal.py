"""Legal judgment on a toy sales case: is the defendant liable under a fixed rule?

A buyer sues a seller for non-delivery, or a seller sues a buyer for non-payment. The facts
(contract signed, goods delivered, payment made, force majeure) come as short sentences in a
random order, optionally with irrelevant facts; the rule is implied by the labels, or stated in
the prompt with ``state_rule=True`` (off by default: short prompts for tiny models). The answer
is ``liable`` or ``not liable`` (balanced); with ``think=True`` it is
``<think>the conditions checked</think>\\nlabel`` in the DeepSeek-R1 style.

Rule: the defendant is liable iff a contract was signed, the defendant did not perform (seller:
delivery, buyer: payment), the plaintiff performed, and there was no force majeure.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("verdict")
    >>> rec = task.generate(1, seed=0)[0]
    >>> print(rec["messages"][0]["content"])  # doctest: +SKIP
    Acme sues Birch for non-delivery. Acme paid. Birch did not deliver. No force majeure. They signed
    a contract for steel. Is Birch liable?
    >>> task.score(rec, rec["answer"]), task.score(rec, rec["answer"].upper()), task.score(rec, "maybe")
    (1.0, 1.0, 0.0)

Run ``esft export --tasks verdict --n 1000 --out data/`` to write a file.
"""

from __future__ import annotations

import random

from esft.data.tasks.base import Task

PARTIES = ("Acme", "Birch", "Cobalt", "Delta", "Ember", "Fjord", "Granite", "Helix", "Iris", "Juniper")
GOODS = ("steel", "grain", "laptops", "paint", "timber", "coffee", "tiles", "cables")
FACTS = {  # condition -> (sentence when true, sentence when false); {s} seller, {b} buyer, {g} goods
    "signed": ("They signed a contract for {g}.", "No contract was signed."),
    "delivered": ("{s} delivered the {g}.", "{s} did not deliver."),
    "paid": ("{b} paid.", "{b} did not pay."),
    "force_majeure": ("A flood stopped transport.", "No force majeure."),
}
IRRELEVANT = ("{b} is based in the north.", "{s} has 40 employees.", "The contract is in English.",
              "{b} bought {g} before.", "{s} keeps {g} in a warehouse.", "{s} was founded in 1990.")
RULE = "Rule: liable if signed, duty unmet, other side performed, no force majeure."
LABELS = ("liable", "not liable")


def final_label(text: str) -> str:
    """The label in a completion: the text after ``</think>`` if present, lower-cased and trimmed."""
    text = str(text).rsplit("</think>", 1)[-1]
    return " ".join(text.lower().replace(".", " ").split())


class Verdict(Task):
    """Toy breach-of-contract cases with `num_irrelevant` distracting facts; `state_rule` puts the
    rule in the prompt; `think` renders reasoning in ``<think>`` before the label.

    >>> Verdict(think=True).sample(random.Random(0))[1].split("\\n")[-1] in LABELS
    True
    """

    name = "verdict"
    domain = "legal"
    metric = "accuracy"  # the final label (liable / not liable) is right

    def __init__(self, num_irrelevant: int = 0, state_rule: bool = False, think: bool = False) -> None:
        self.num_irrelevant = num_irrelevant
        self.state_rule = state_rule
        self.think = think

    def sample(self, rng: random.Random) -> tuple[str, str]:
        buyer, seller = rng.sample(PARTIES, 2)
        claim = rng.choice(("non-delivery", "non-payment"))
        duty, other = ("delivered", "paid") if claim == "non-delivery" else ("paid", "delivered")
        # conditions for liability; a balanced label, then facts consistent with it
        needed = {"signed": True, duty: False, other: True, "force_majeure": False}
        liable = rng.random() < 0.5
        facts = dict(needed)
        while not liable and facts == needed:
            facts = {k: rng.random() < 0.5 for k in needed}
        fill = {"s": seller, "b": buyer, "g": rng.choice(GOODS)}
        lines = [FACTS[k][0 if v else 1].format(**fill) for k, v in facts.items()]
        lines += [t.format(**fill) for t in rng.sample(IRRELEVANT, min(self.num_irrelevant, len(IRRELEVANT)))]
        rng.shuffle(lines)
        plaintiff, defendant = (buyer, seller) if claim == "non-delivery" else (seller, buyer)
        case = f"{plaintiff} sues {defendant} for {claim}. {' '.join(lines)} Is {defendant} liable?"
        label = LABELS[0] if facts == needed else LABELS[1]
        prompt = f"{RULE} {case}" if self.state_rule else case
        if not self.think:
            return prompt, label
        names = {"signed": "contract signed", "delivered": "goods delivered", "paid": "payment made",
                 "force_majeure": "force majeure"}
        steps = [f"{names[k]}: {'yes' if facts[k] else 'no'} ({'ok' if facts[k] == needed[k] else 'fails'})"
                 for k in needed]
        return prompt, "<think>" + "\n".join(steps) + f"</think>\n{label}"

    def score(self, record: dict, completion: str) -> float:
        return float(final_label(completion) == final_label(record["answer"]))
