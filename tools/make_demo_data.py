"""Generate the demo datasets: synthetic customer tweets labelled `complaint` / `no complaint`.

The classic LoRA tutorial task (the RAFT twitter_complaints set), rebuilt synthetically so that nothing is
downloaded. The tiny-demo rows are prompt/completion pairs; the tiny-dpo rows are preference pairs whose chosen
answer is the right label and whose rejected answer is the wrong one. Each held-out file shares no tweet with its
training file.

    python tools/make_demo_data.py    # writes recipes/data/complaints-{train,heldout}.jsonl and complaints-pref-*.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HANDLES = ["@acmebank", "@skyairways", "@fastcourier", "@metrotrains", "@cloudphone", "@freshgrocer",
           "@nimbusnet", "@brightpower", "@pixelstore", "@cozyhotels"]
THINGS = ["my order", "the app", "my flight", "my package", "the wifi", "my bill", "the delivery",
          "my account", "the train", "my refund", "the checkout", "my booking", "the support chat", "my card"]
COMPLAINTS = ["is late again", "still has not arrived", "was cancelled without notice", "keeps crashing",
              "charged me twice", "has been down all day", "arrived broken", "is a total mess",
              "lost my data", "made me wait two hours", "is the worst i have seen", "never works",
              "was rude and useless", "overcharged me", "froze during payment", "stopped working after the update"]
PRAISE = ["arrived early", "works perfectly", "was super helpful", "made my day", "is so easy to use",
          "was fixed in minutes", "is better than ever", "came right on time", "was a great experience",
          "saved me a lot of time", "looks amazing", "has the friendliest staff"]
NEUTRAL = ["what time does {h} open tomorrow?", "does {h} ship to canada?", "is there a student discount at {h}?",
           "just downloaded the new {h} app", "heading to the {h} store later", "anyone else watching the {h} ad?",
           "can i change my booking with {h} online?", "how do i update my address on {h}?"]
COMPLAINT_TAILS = ["", " so annoyed", " unacceptable", " fix this please", " #fail", " never again", " seriously?!", " !!!"]
PRAISE_TAILS = ["", " thank you!", " love it", " #happy", " great job", " :)", " well done", " keep it up"]
OPENERS = ["", "hey ", "wow ", "ok ", "honestly ", "so ", "today "]


def make_tweet(rng: random.Random) -> tuple[str, str]:
    handle = rng.choice(HANDLES)
    kind = rng.random()
    if kind < 0.5:
        text = f"{rng.choice(OPENERS)}{handle} {rng.choice(THINGS)} {rng.choice(COMPLAINTS)}{rng.choice(COMPLAINT_TAILS)}"
        return text, "complaint"
    if kind < 0.8:
        text = f"{rng.choice(OPENERS)}{handle} {rng.choice(THINGS)} {rng.choice(PRAISE)}{rng.choice(PRAISE_TAILS)}"
    else:
        text = rng.choice(NEUTRAL).format(h=handle)
    return text, "no complaint"


def to_row(tweet: str, label: str) -> dict:
    return {"prompt": f"Tweet: {tweet}\nLabel:", "completion": f" {label}"}


def to_pair(tweet: str, label: str) -> dict:
    wrong = "no complaint" if label == "complaint" else "complaint"
    return {"prompt": f"Tweet: {tweet}\nLabel:", "chosen": f" {label}", "rejected": f" {wrong}"}


def generate(n_train: int, n_heldout: int, seed: int, row=to_row) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_heldout:
        tweet, label = make_tweet(rng)
        if tweet not in seen:  # distinct tweets, so held-out rows never appear in training
            seen.add(tweet)
            rows.append(row(tweet, label))
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000, help="training rows")
    parser.add_argument("--heldout", type=int, default=300, help="held-out rows")
    parser.add_argument("--pairs", type=int, default=2000, help="training preference pairs (tiny-dpo)")
    parser.add_argument("--heldout-pairs", type=int, default=100, help="held-out preference pairs")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes" / "data")
    args = parser.parse_args()
    train, heldout = generate(args.train, args.heldout, args.seed)
    write_jsonl(args.out / "complaints-train.jsonl", train)
    write_jsonl(args.out / "complaints-heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out rows to {args.out}")
    # Another seed: the preference pairs are other tweets than the SFT rows, as a second data set would be.
    train, heldout = generate(args.pairs, args.heldout_pairs, args.seed + 1, row=to_pair)
    write_jsonl(args.out / "complaints-pref-train.jsonl", train)
    write_jsonl(args.out / "complaints-pref-heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out preference pairs to {args.out}")


if __name__ == "__main__":
    main()
