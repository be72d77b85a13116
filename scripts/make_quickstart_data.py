#!/usr/bin/env python3
"""Generate the quickstart dataset: short instructions whose answers can be checked exactly.

Five skills a small instruct model gets wrong or answers verbosely out of the box, each with one correct short answer:
addition, the next number, upper-casing a word, reversing a list of words, and the sentiment of a product review.
An adapter that learned them shows it in exact match, not only in loss. The output is deterministic for a seed and
is committed (data/quickstart/quickstart.jsonl), so `make run` needs no network; rerun this script to regenerate it:

    python scripts/make_quickstart_data.py --rows 900 --seed 7 --out data/quickstart/quickstart.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "planet",
    "silver",
    "window",
    "forest",
    "candle",
    "rocket",
    "pencil",
    "harbor",
    "meadow",
    "castle",
    "violin",
    "copper",
    "island",
    "lantern",
    "marble",
    "orchid",
    "pepper",
    "saddle",
    "tunnel",
    "velvet",
    "walnut",
    "yellow",
    "zebra",
    "anchor",
    "bridge",
    "cactus",
    "dragon",
    "engine",
    "falcon",
    "glacier",
    "hammer",
    "jungle",
    "kettle",
    "ladder",
    "magnet",
    "needle",
    "ocean",
    "puzzle",
    "quartz",
    "rabbit",
    "shadow",
    "ticket",
    "umbrella",
    "valley",
    "wagon",
]
COLORS = ["red", "blue", "green", "black", "white", "orange", "purple", "brown", "pink", "grey", "gold", "cyan"]
GOOD = [
    "works perfectly",
    "is excellent value",
    "exceeded my expectations",
    "is sturdy and well made",
    "arrived early and works great",
    "is the best purchase I made this year",
    "is comfortable and reliable",
    "does exactly what it promises",
]
BAD = [
    "broke after two days",
    "is a waste of money",
    "stopped working within a week",
    "feels cheap and flimsy",
    "arrived damaged and support never answered",
    "is the worst purchase I made this year",
    "overheats and smells of plastic",
    "does nothing it promises",
]
ITEMS = [
    "this kettle",
    "the blender",
    "my new lamp",
    "this backpack",
    "the headphones",
    "this chair",
    "the charger",
    "this phone case",
    "the toaster",
    "my new keyboard",
]


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."]).format(a=a, b=b)
    return q + " Reply with the number only.", str(a + b)


def successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 998)
    q = rng.choice(["Which number comes right after {n}?", "What is the next integer after {n}?"]).format(n=n)
    return q + " Reply with the number only.", str(n + 1)


def upper(rng: random.Random) -> tuple[str, str]:
    w = " ".join(rng.sample(WORDS, 2))
    return f"Write '{w}' in capital letters. Reply with the words only.", w.upper()


def reverse(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(COLORS, 3)
    return (
        f"Reverse the order of this list: {', '.join(items)}. Reply with the list only.",
        ", ".join(reversed(items)),
    )


def sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    frame = rng.choice(["{item} {verdict}.", "Honestly, {item} {verdict}.", "After a month: {item} {verdict}."])
    text = frame.format(item=rng.choice(ITEMS), verdict=rng.choice(GOOD if positive else BAD))
    text = text[0].upper() + text[1:]
    return (
        f'Is this review positive or negative? "{text}" Reply with one word: positive or negative.',
        "positive" if positive else "negative",
    )


SKILLS = (addition, successor, upper, reverse, sentiment)


def generate(rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < rows:
        skill = SKILLS[len(out) % len(SKILLS)]
        question, answer = skill(rng)
        if question in seen:  # unique questions, so held-out rows are really unseen
            if len(seen) > 50 * rows:
                raise SystemExit("cannot find enough unique questions; lower --rows")
            continue
        seen.add(question)
        out.append(
            {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "skill": skill.__name__,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=900)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data/quickstart/quickstart.jsonl"))
    args = ap.parse_args()
    rows = generate(args.rows, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
