"""Regenerate the zoo skills' JSONL data (deterministic): python evals/make_data.py"""

import json
from pathlib import Path

from mergesearch.zoo import SKILLS, eval_records

here = Path(__file__).parent
for skill in SKILLS:
    for split, rows in eval_records(skill).items():
        with open(here / "data" / f"{skill}.{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

# Examples of the other two metrics, built on the addition items.
rng = __import__("random").Random(0)
for split, rows in eval_records("add").items():
    with (
        open(here / "data" / f"add_choice.{split}.jsonl", "w") as mc,
        open(here / "data" / f"add_ppl.{split}.jsonl", "w") as pp,
    ):
        for r in rows:
            right = int(r["answer"])
            wrong = rng.sample([right + d for d in (-11, -10, -9, -1, 1, 9, 10, 11)], 3)
            choices = [str(c) for c in wrong] + [str(right)]
            rng.shuffle(choices)
            mc.write(
                json.dumps({"prompt": r["prompt"], "choices": choices, "label": choices.index(str(right))})
                + "\n"
            )
            pp.write(json.dumps({"text": r["prompt"] + r["answer"]}) + "\n")
