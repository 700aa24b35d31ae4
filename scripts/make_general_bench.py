"""Write the demo's general benchmark: multiple-choice questions of common knowledge that the embedded SmolLM2
answers well before any tuning (capitals, opposites, everyday science, animals, counting), so a tuned model's loss of
general ability shows as a drop. A finetune benchmark task file: `finetune eval RUN --tasks data/general/general.jsonl`.

Deterministic (seeded): each question's three wrong choices are drawn from the other answers of its kind, and the
right one's position is drawn too. Usage: python scripts/make_general_bench.py [--out data/general] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Austria": "Vienna", "Kenya": "Nairobi", "Argentina": "Buenos Aires", "India": "New Delhi",
    "Thailand": "Bangkok", "South Korea": "Seoul", "Cuba": "Havana", "Peru": "Lima", "Finland": "Helsinki",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad", "open": "closed",
    "light": "dark", "wet": "dry", "early": "late", "full": "empty", "hard": "soft", "strong": "weak",
    "rich": "poor", "high": "low", "young": "old", "loud": "quiet", "thick": "thin", "love": "hate",
    "win": "lose",
}
FACTS = [
    ("What is the largest planet in the solar system?", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Jupiter", "Saturn", "Neptune"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Earth", "Saturn", "Uranus"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "NaCl", "O2"]),
    ("What gas do plants take in from the air to make food?", "carbon dioxide", ["helium", "neon", "argon"]),
    ("What gas do people need to breathe to live?", "oxygen", ["helium", "neon", "argon"]),
    ("At what temperature in degrees Celsius does water freeze?", "0", ["50", "100", "200"]),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100", ["0", "10", "500"]),
    ("What is the Sun?", "a star", ["a planet", "a moon", "a comet"]),
    ("What is the Moon?", "a natural satellite of the Earth", ["a star", "a planet", "a comet"]),
    ("What force pulls objects toward the Earth?", "gravity", ["magnetism", "friction", "wind"]),
    ("Which organ pumps blood through the body?", "the heart", ["the lungs", "the liver", "the stomach"]),
    ("Which organ do people use to think?", "the brain", ["the heart", "the liver", "the stomach"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
    ("What color is the sky on a clear day?", "blue", ["green", "red", "brown"]),
    ("What color are the leaves of most trees in summer?", "green", ["blue", "purple", "white"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "glass"]),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", ["the Arctic Ocean", "the Indian Ocean",
                                                                   "the Southern Ocean"]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Mark Twain", "Jane Austen"]),
    ("What language is mainly spoken in Brazil?", "Portuguese", ["Spanish", "French", "German"]),
]
ANIMALS = [
    ("What sound does a dog make?", "bark", ["meow", "moo", "quack"]),
    ("What sound does a cat make?", "meow", ["bark", "moo", "oink"]),
    ("What sound does a cow make?", "moo", ["bark", "meow", "quack"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("How many legs does an insect have?", "six", ["eight", "four", "ten"]),
    ("Which animal is the largest mammal?", "the blue whale", ["the mouse", "the rabbit", "the cat"]),
    ("What animal is known as the king of the jungle?", "the lion", ["the mouse", "the frog", "the sheep"]),
    ("Which animal has a long neck and eats leaves from tall trees?", "the giraffe", ["the pig", "the frog",
                                                                                        "the snake"]),
    ("What do caterpillars turn into?", "butterflies", ["frogs", "birds", "fish"]),
    ("Where do fish live?", "in water", ["in the desert", "in trees", "in the sky"]),
]
COUNTS = [
    ("How many days are in a week?", "seven"), ("How many months are in a year?", "twelve"),
    ("How many hours are in a day?", "twenty-four"), ("How many minutes are in an hour?", "sixty"),
    ("How many sides does a triangle have?", "three"), ("How many sides does a square have?", "four"),
    ("How many continents are there on Earth?", "seven"), ("How many seconds are in a minute?", "sixty"),
]
NUMBER_WORDS = ["three", "four", "five", "seven", "eight", "ten", "twelve", "twenty-four", "sixty", "one hundred"]


def _mc(question: str, right: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(right)}


def _from_pool(pool: dict[str, str], template: str, rng: random.Random) -> list[dict]:
    answers = sorted(set(pool.values()))
    return [_mc(template.format(key), value, rng.sample([a for a in answers if a != value], 3), rng)
            for key, value in pool.items()]


def questions(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = _from_pool(CAPITALS, "What is the capital of {}?", rng)
    rows += _from_pool(OPPOSITES, "What is the opposite of {}?", rng)
    rows += [_mc(q, right, wrong, rng) for q, right, wrong in FACTS + ANIMALS]
    rows += [_mc(q, right, rng.sample([w for w in NUMBER_WORDS if w != right], 3), rng) for q, right in COUNTS]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/general"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = questions(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "general.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} questions to {path}")


if __name__ == "__main__":
    main()
