"""Translation from a small English grammar into Vensi, an invented language.

English sentences are ``[the|a|an] [adj] noun verb [the|a|an] [adj] noun`` with singular or plural nouns.
Vensi has its own lexicon and rules: subject-object-verb order; the definite article ``lo``
before the noun and no indefinite article; adjectives after the noun; plural nouns take the
suffix ``-ka``; the object is followed by the marker ``na``; a verb with a plural subject takes
the suffix ``-ri``. Score: chrF (character n-gram F-score, torchmetrics) in [0, 1], 1.0 for an
exact translation; `metrics` adds BLEU.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("translate")
    >>> translate("the big cats see a small dog")
    'lo miroka gul tava pim na kelori'
    >>> rec = task.generate(1, seed=0)[0]
    >>> task.score(rec, rec["answer"])
    1.0
    >>> 0 < task.score({"answer": "lo miroka gul tava pim na kelori"}, "lo miro gul tava na kelo") < 1
    True

Run ``esft export --tasks translate --n 1000 --out data/`` to write a file.
"""

from __future__ import annotations

import random

from esft.data.tasks.base import Task

# English (singular, plural) -> Vensi stem
NOUNS = {("cat", "cats"): "miro", ("dog", "dogs"): "tava", ("bird", "birds"): "piku", ("fox", "foxes"): "salo",
         ("child", "children"): "neli", ("farmer", "farmers"): "goru", ("teacher", "teachers"): "lanu",
         ("horse", "horses"): "bexa", ("king", "kings"): "dumo", ("girl", "girls"): "sira",
         ("boy", "boys"): "tobe", ("wolf", "wolves"): "varu"}
# English (with a singular subject, with a plural subject) -> Vensi stem
VERBS = {("sees", "see"): "kelo", ("chases", "chase"): "dupa", ("likes", "like"): "sena", ("helps", "help"): "tuvo",
         ("finds", "find"): "rabi", ("feeds", "feed"): "moku", ("follows", "follow"): "lida", ("hears", "hear"): "fena"}
ADJECTIVES = {"big": "gul", "small": "pim", "old": "ados", "young": "ner", "happy": "tiso", "angry": "rux",
              "red": "kal", "black": "zon"}
_NOUN = {form: (stem, form == pair[1]) for pair, stem in NOUNS.items() for form in pair}
_VERB = {form: stem for pair, stem in VERBS.items() for form in pair}


def _noun_phrase(words: list[str]) -> tuple[list[str], bool]:
    """Vensi words for an English noun phrase ``[the|a] [adj] noun`` and whether it is plural."""
    definite = words[0] == "the"
    words = words[1:] if words[0] in ("the", "a", "an") else words
    adjectives, noun = words[:-1], words[-1]
    stem, plural = _NOUN[noun]
    out = (["lo"] if definite else []) + [stem + ("ka" if plural else "")]
    return out + [ADJECTIVES[a] for a in adjectives], plural


def translate(sentence: str) -> str:
    """Translate an English sentence of the grammar into Vensi."""
    words = sentence.lower().split()
    v = next(i for i, w in enumerate(words) if w in _VERB)
    subject, subject_plural = _noun_phrase(words[:v])
    obj, _ = _noun_phrase(words[v + 1:])
    verb = _VERB[words[v]] + ("ri" if subject_plural else "")
    return " ".join(subject + obj + ["na", verb])


def _normalize(text: str) -> str:
    return " ".join(str(text).lower().replace(".", " ").split())


class Translate(Task):
    """English -> Vensi over `num_nouns` nouns; adjectives with probability `adj_prob`, plural nouns
    with probability `plural_prob`.

    >>> prompt, answer = Translate(num_nouns=2, adj_prob=0.0, plural_prob=0.0).sample(random.Random(0))
    >>> prompt.startswith("Translate to Vensi: "), len(answer.split())  # doctest: +SKIP
    (True, 4)
    """

    name = "translate"
    domain = "translation"
    metric = "chrf"  # chrF against the reference translation

    def __init__(self, num_nouns: int = len(NOUNS), adj_prob: float = 0.5, plural_prob: float = 0.5) -> None:
        self.nouns = list(NOUNS)[: max(1, num_nouns)]
        self.adj_prob = adj_prob
        self.plural_prob = plural_prob

    def _phrase(self, rng: random.Random) -> tuple[list[str], bool]:
        singular, plural_form = rng.choice(self.nouns)
        plural = rng.random() < self.plural_prob
        adj = [rng.choice(list(ADJECTIVES))] if rng.random() < self.adj_prob else []
        noun = plural_form if plural else singular
        det = rng.choice(["the", "" if plural else "an" if (adj or [noun])[0][0] in "aeiou" else "a"])
        return [w for w in [det, *adj, noun] if w], plural

    def sample(self, rng: random.Random) -> tuple[str, str]:
        subject, plural = self._phrase(rng)
        verb = rng.choice(list(VERBS))[1 if plural else 0]
        obj, _ = self._phrase(rng)
        english = " ".join(subject + [verb] + obj)
        return f"Translate to Vensi: {english}", translate(english)

    def score(self, record: dict, completion: str) -> float:
        return self.metrics(record, completion)["chrf"]

    def metrics(self, record: dict, completion: str) -> dict[str, float]:
        """chrF and BLEU of a completion against the reference, both in [0, 1]."""
        pred, ref = _normalize(completion), _normalize(record["answer"])
        if pred == ref:
            return {"chrf": 1.0, "bleu": 1.0}
        if not pred:
            return {"chrf": 0.0, "bleu": 0.0}
        from torchmetrics.functional.text import bleu_score, chrf_score

        chrf = float(chrf_score([pred], [[ref]], n_word_order=0))
        bleu = float(bleu_score([pred], [[ref]], smooth=True))
        return {"chrf": min(max(chrf, 0.0), 1.0), "bleu": min(max(bleu, 0.0), 1.0)}
