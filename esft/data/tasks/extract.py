"""Summarise a short person description into a fixed one-line form (a small summarisation task).

The description gives a name, age, city, job and hobby in 2-3 sentences drawn from varied
templates and orders; the instruction asks for ``Name: X; City: Y; Job: Z`` (the fields are a
constructor argument). Score: ROUGE-L F-measure (torchmetrics) in [0, 1]; a perfect answer is 1.0.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("extract_fields")
    >>> rec = task.generate(1, seed=0)[0]
    >>> print(rec["messages"][0]["content"])  # doctest: +SKIP
    Summarize as "Name: ...; City: ...; Job: ...".
    Omar lives in Lisbon. He is 34 years old and works as a nurse. In his free time he likes chess.
    >>> rec["answer"]  # doctest: +SKIP
    'Name: Omar; City: Lisbon; Job: nurse'
    >>> task.score(rec, rec["answer"]), task.score(rec, "")
    (1.0, 0.0)

Run ``esft export --tasks extract_fields --n 1000 --out data/`` to write a file.
"""

from __future__ import annotations

import random

from esft.data.tasks.base import Task

PEOPLE = (("Omar", "he"), ("Lena", "she"), ("Ravi", "he"), ("Mei", "she"), ("Jonas", "he"), ("Ana", "she"),
          ("Kofi", "he"), ("Sofia", "she"), ("Ivan", "he"), ("Nora", "she"), ("Tariq", "he"), ("Yuki", "she"))
VALUES = {
    "city": ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Austin", "Krakow", "Porto", "Accra",
             "Quebec", "Bergen"),
    "job": ("nurse", "baker", "pilot", "teacher", "plumber", "lawyer", "chef", "farmer", "dentist", "painter",
            "engineer", "librarian"),
    "hobby": ("chess", "hiking", "painting", "running", "cooking", "fishing", "gardening", "singing"),
    "age": tuple(str(a) for a in range(19, 71)),  # strings, like every field of the summary
}
# each sentence template mentions some fields; a description covers all of them in 2-3 sentences
SENTENCES = {
    ("name", "city"): ("{name} lives in {city}.", "{name} is from {city}.", "{name} moved to {city} last year."),
    ("age", "job"): ("{He} is {age} years old and works as a {job}.", "At {age}, {he} is a {job}.",
                     "{He} works as a {job} and is {age}."),
    ("hobby",): ("In {his} free time {he} likes {hobby}.", "{He} enjoys {hobby}.", "{His} hobby is {hobby}."),
    ("name", "job"): ("{name} is a {job}.", "{name} works as a {job}."),
    ("age", "city"): ("{He} is {age} and lives in {city}.", "{He} has lived in {city} since {he} was {age}."),
    ("name", "age", "city", "job"): ("{name}, {age}, is a {job} in {city}.",),
}
# sentence plans: the first names the person, the rest follow in any order when shuffled
PLANS = ((("name", "city"), ("age", "job"), ("hobby",)), (("name", "job"), ("age", "city"), ("hobby",)),
         (("name", "job"), ("age", "city")), (("name", "city"), ("age", "job")),
         (("name", "age", "city", "job"), ("hobby",)))

class ExtractFields(Task):
    """Describe a person in 2-3 sentences; answer ``Name: X; City: Y; Job: Z`` for `fields`
    (any of name, age, city, job, hobby), with the sentences after the first shuffled when `shuffle`.

    >>> ExtractFields(fields=("name", "age")).sample(random.Random(0))[1]  # doctest: +SKIP
    'Name: Ravi; Age: 41'
    """

    name = "extract_fields"
    domain = "summarization"
    metric = "rouge_l"  # ROUGE-L F-measure against the reference line

    def __init__(self, fields: tuple[str, ...] = ("name", "city", "job"), shuffle: bool = True) -> None:
        unknown = set(fields) - {"name", *VALUES}
        if unknown or not fields:
            raise ValueError(f"unknown fields {sorted(unknown)}; choose from name, {', '.join(VALUES)}")
        self.fields = tuple(fields)
        self.shuffle = shuffle

    def sample(self, rng: random.Random) -> tuple[str, str]:
        name, he = rng.choice(PEOPLE)
        facts = {"name": name, **{k: rng.choice(v) for k, v in VALUES.items()}}
        pronouns = {"he": he, "He": he.capitalize(), "his": "his" if he == "he" else "her",
                    "His": "His" if he == "he" else "Her"}
        plan = list(rng.choice([p for p in PLANS if all(any(f in s for s in p) for f in self.fields)]))
        if self.shuffle:
            rest = plan[1:]
            rng.shuffle(rest)
            plan[1:] = rest
        text = [rng.choice(SENTENCES[slots]).format(**facts, **pronouns) for slots in plan]
        form = "; ".join(f"{f.capitalize()}: ..." for f in self.fields)
        answer = "; ".join(f"{f.capitalize()}: {facts[f]}" for f in self.fields)
        return f'Summarize as "{form}".\n{" ".join(text)}', answer

    def score(self, record: dict, completion: str) -> float:
        pred, ref = " ".join(str(completion).split()), " ".join(record["answer"].split())
        if pred == ref:
            return 1.0
        if not pred:
            return 0.0
        from torchmetrics.functional.text import rouge_score

        return float(rouge_score(pred, ref, rouge_keys="rougeL")["rougeL_fmeasure"])
