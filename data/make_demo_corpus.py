"""Write data/demo_corpus.jsonl and the held-out data/demo_eval.jsonl (deterministic).

    python data/make_demo_corpus.py

Small, learnable, varied English for `make demo`: templated facts (capitals, animals,
colours, arithmetic, calendar), short stories, chat-style dialogues as plain ``text`` lines,
and question/answer lines with ``prompt`` + ``response`` fields (the loss-mask demo: only
the answer is trained). Every line is unique and no eval line occurs in the corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "India": "New Delhi",
    "China": "Beijing",
    "Brazil": "Brasilia",
    "Chile": "Santiago",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Cuba": "Havana",
}
ANIMALS = {
    "cow": ("moo", "grass", "a farm"),
    "dog": ("woof", "meat", "a house"),
    "cat": ("meow", "fish", "a house"),
    "duck": ("quack", "seeds", "a pond"),
    "sheep": ("baa", "grass", "a field"),
    "lion": ("roar", "meat", "the savanna"),
    "owl": ("hoot", "mice", "a tree"),
    "frog": ("croak", "flies", "a pond"),
    "horse": ("neigh", "hay", "a stable"),
    "bee": ("buzz", "nectar", "a hive"),
}
COLOURS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
}
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack"]
PLACES = {
    "market": "apples",
    "bakery": "bread",
    "library": "a book",
    "shop": "milk",
    "garden": "flowers",
    "beach": "shells",
    "park": "a kite",
    "station": "a ticket",
}


def facts() -> list[str]:
    out = [f"The capital of {c} is {cap}." for c, cap in CAPITALS.items()]
    for animal, (sound, food, home) in ANIMALS.items():
        out += [f"A {animal} says {sound}.", f"A {animal} eats {food}."]
        out.append(f"A {animal} lives in {home}.")
    out += [f"The colour of {thing} is {colour}." for thing, colour in COLOURS.items()]
    for i, day in enumerate(DAYS):
        out.append(f"The day after {day} is {DAYS[(i + 1) % 7]}.")
    for i, month in enumerate(MONTHS):
        out.append(f"The month after {month} is {MONTHS[(i + 1) % 12]}.")
    for a in range(7):
        for b in range(7):
            if a + b < len(NUMBERS):
                out.append(f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
    return out


def stories(rng: random.Random, n: int) -> list[str]:
    out = set()
    while len(out) < n:
        name, (place, item) = rng.choice(NAMES), rng.choice(sorted(PLACES.items()))
        day, k = rng.choice(DAYS), rng.randint(2, 9)
        out.add(
            f"On {day}, {name} went to the {place} to get {item}. "
            f"It took {NUMBERS[k]} minutes to walk there. {name} came home happy."
        )
    return sorted(out)


def dialogues(rng: random.Random) -> list[str]:
    out = []
    for country, cap in CAPITALS.items():
        out.append(f"User: What is the capital of {country}?\nAssistant: It is {cap}.")
    for animal, (sound, _, _) in ANIMALS.items():
        out.append(f"User: What does a {animal} say?\nAssistant: A {animal} says {sound}.")
    for thing, colour in COLOURS.items():
        out.append(f"User: What colour is {thing}?\nAssistant: {thing.capitalize()} is {colour}.")
    rng.shuffle(out)
    return out


def qa_pairs() -> list[dict[str, str]]:
    out = []
    for country, cap in CAPITALS.items():
        out.append(
            {
                "prompt": f"Question: What is the capital of {country}?\nAnswer:",
                "response": f" {cap}.\n\n",
            }
        )
    for animal, (_, food, _) in ANIMALS.items():
        out.append(
            {
                "prompt": f"Question: What does a {animal} eat?\nAnswer:",
                "response": f" A {animal} eats {food}.\n\n",
            }
        )
    for a in range(6):
        for b in range(6):
            out.append(
                {
                    "prompt": f"Question: What is {NUMBERS[a]} plus {NUMBERS[b]}?\nAnswer:",
                    "response": f" {NUMBERS[a + b].capitalize()}.\n\n",
                }
            )
    return out


def build(seed: int = 1234) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    rows = [{"text": t} for t in facts() + stories(rng, 260) + dialogues(rng)] + qa_pairs()
    rng.shuffle(rows)
    n_eval = len(rows) // 10
    return rows[n_eval:], rows[:n_eval]


def main() -> None:
    here = Path(__file__).resolve().parent
    train, held_out = build()
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held_out}
    for name, rows in (("demo_corpus.jsonl", train), ("demo_eval.jsonl", held_out)):
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"wrote {len(rows)} lines to {here / name}")


if __name__ == "__main__":
    main()
