"""Intent recognition to JSON: parse a short assistant request into an intent and its slots.

Requests come from templates over six intents with one to three slots each; the answer is
compact JSON ``{"intent": ..., "slots": {...}}`` with sorted keys. The verifier parses the
completion and compares intent and slots exactly (key order is irrelevant; bad JSON scores 0).

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("intent_json")
    >>> rec = task.generate(1, seed=0)[0]
    >>> rec["messages"][0]["content"]  # doctest: +SKIP
    "Parse to JSON: Hey, book a table for 4 at Luigi's tomorrow, please"
    >>> rec["answer"]  # doctest: +SKIP
    '{"intent":"book_table","slots":{"day":"tomorrow","people":4,"restaurant":"Luigi\\'s"}}'
    >>> task.score(rec, rec["answer"]), task.score(rec, '{"intent": "book_table"'), task.score(rec, "")
    (1.0, 0.0, 0.0)

Run ``esft export --tasks intent_json --n 1000 --out data/`` to write a file.
"""

from __future__ import annotations

import json
import random

from esft.data.tasks.base import Task

VALUES: dict[str, tuple] = {
    "people": tuple(range(2, 13)),
    "restaurant": ("Luigi's", "Sakura", "The Oak", "Casa Mia", "Blue Door", "Green Fork", "Taj", "Nord", "Olive",
                   "Red Lion", "Pho 9", "Bistro Lyon"),
    "day": ("today", "tomorrow", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "time": ("noon", "5pm", "5:30pm", "6pm", "6:30pm", "7pm", "7:30pm", "8pm", "8:30pm", "9pm", "9:30pm", "10pm"),
    "alarm_time": ("5:00", "5:30", "5:45", "6:00", "6:15", "6:30", "6:45", "7:00", "7:15", "7:30", "7:45", "8:00",
                   "8:30", "9:00", "9:30", "10:00"),
    "label": ("gym", "work", "meds", "school run", "flight", "yoga", "laundry", "pasta"),
    "city": ("Paris", "Rome", "Oslo", "Lima", "Tokyo", "Cairo", "Berlin", "Madrid", "Dublin", "Seoul", "Quito",
             "Perth", "Lagos", "Delhi", "Vienna", "Havana"),
    "artist": ("Nina Simone", "Queen", "Miles Davis", "ABBA", "Bach", "Adele", "Daft Punk", "Bob Marley",
               "Bjork", "Fela Kuti"),
    "genre": ("jazz", "rock", "pop", "classical", "reggae", "blues", "techno", "folk"),
    "contact": ("Mom", "Dad", "Sam", "Priya", "Leo", "Dr. Chen", "Maria", "Tom", "Aisha", "Kenji"),
    "text": ("I'm running late", "see you soon", "call me back", "happy birthday", "on my way", "thanks a lot",
             "dinner is ready", "I miss you"),
    "minutes": tuple(range(1, 61)),
}

# intent -> templates of 1-3 slots; `{slot}` names a VALUES key (`alarm_time` fills the slot `time`)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "book_table": ("book a table for {people} at {restaurant} {day}",
                   "reserve {restaurant} for {people} people at {time}",
                   "get me a table at {restaurant} for {people}", "table for {people} at {time} {day}"),
    "set_alarm": ("set an alarm for {alarm_time}", "wake me up at {alarm_time} {day}",
                  "set a {label} alarm for {alarm_time}", "alarm at {alarm_time} for {label}"),
    "get_weather": ("what's the weather in {city} {day}", "will it rain in {city} {day}", "weather for {city}",
                    "how warm is it in {city} at {time} {day}"),
    "play_music": ("play some {genre}", "play {artist}", "put on {genre} by {artist}", "I want to hear {artist}"),
    "send_message": ("text {contact} {text}", "send {contact} a message saying {text}", "tell {contact} {text}",
                     "message {contact}"),
    "set_timer": ("set a timer for {minutes} minutes", "timer {minutes} min", "remind me in {minutes} minutes",
                  "start a {minutes} minute {label} timer"),
}
PREFIXES = ("", "hey, ", "hi, ", "ok, ")
SUFFIXES = ("", ", please", " please", ", thanks")


def _slots(template: str) -> list[str]:
    return [part.split("}", 1)[0] for part in template.split("{")[1:]]


def parse_intent(text: str) -> dict | None:
    """`{"intent": str, "slots": dict}` from a completion, or None when it is not such JSON."""
    try:
        value = json.loads(str(text).strip())
    except (json.JSONDecodeError, TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("slots"), dict) or "intent" not in value:
        return None
    return value


class IntentJSON(Task):
    """Requests over `intents` (all by default) using templates with at most `max_slots` slots;
    `noise` adds greetings and polite endings around the request.

    >>> IntentJSON(intents=("set_timer",), max_slots=1).sample(random.Random(0))[1]  # doctest: +SKIP
    '{"intent":"set_timer","slots":{"minutes":25}}'
    """

    name = "intent_json"
    domain = "intent"
    metric = "json_match"  # intent and slots equal as parsed JSON

    def __init__(self, intents: tuple[str, ...] | None = None, max_slots: int = 3, noise: bool = True) -> None:
        unknown = set(intents or ()) - set(TEMPLATES)
        if unknown:
            raise ValueError(f"unknown intents {sorted(unknown)}; known: {sorted(TEMPLATES)}")
        self.choices = [(intent, t) for intent in (intents or TEMPLATES) for t in TEMPLATES[intent]
                        if len(_slots(t)) <= max_slots]
        if not self.choices:
            raise ValueError(f"no template has at most {max_slots} slots")
        self.prefixes, self.suffixes = (PREFIXES, SUFFIXES) if noise else (("",), ("",))

    def sample(self, rng: random.Random) -> tuple[str, str]:
        intent, template = rng.choice(self.choices)
        fill = {key: rng.choice(VALUES[key]) for key in _slots(template)}
        text = rng.choice(self.prefixes) + template.format(**fill) + rng.choice(self.suffixes)
        slots = {("time" if k == "alarm_time" else k): v for k, v in fill.items()}
        answer = json.dumps({"intent": intent, "slots": slots}, sort_keys=True, separators=(",", ":"))
        return f"Parse to JSON: {text[0].upper()}{text[1:]}", answer

    def score(self, record: dict, completion: str) -> float:
        pred, ref = parse_intent(completion), json.loads(record["answer"])
        return float(pred is not None and pred["intent"] == ref["intent"] and pred["slots"] == ref["slots"])
