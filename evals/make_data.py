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


# -- real-model tasks (SmolLM2): arithmetic word problems in GSM8K's answer format, and a
# chat instruction task. Programmatic golds; search and test items never share a question.
NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Max", "Nia"]
ITEMS = ["apple", "pencil", "marble", "book", "cookie", "sticker", "shell", "card", "coin", "flower"]


def word_problem(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["buy", "give", "boxes"])
    if kind == "buy":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        ans, work = a + b, f"{name} has {a} + {b} = {a + b} {item}s."
    elif kind == "give":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item}s and gives {b} of them away. How many {item}s are left?"
        ans, work = a - b, f"{name} has {a} - {b} = {a - b} {item}s left."
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} has {a} boxes with {b} {item}s in each box. How many {item}s are there in all?"
        ans, work = a * b, f"There are {a} * {b} = {a * b} {item}s."
    return {"question": q, "solution": f"{work}\n#### {ans}", "answer": str(ans)}


def chat_question(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    op = rng.choice(["plus", "minus", "times"])
    if op == "minus":
        a, b = max(a, b), min(a, b)
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    ans = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return {"question": f"What is {a} {op} {b}?", "answer": str(ans)}


def unique_rows(make, seed, n, key):
    rng, seen, rows = __import__("random").Random(seed), set(), []
    while len(rows) < n:
        r = make(rng)
        if r[key] not in seen:
            seen.add(r[key])
            rows.append(r)
    return rows


for task, make, n in (("word_problems", word_problem, 600), ("chat_arith", chat_question, 600)):
    rows = unique_rows(make, 1, n, "question")
    for split, part in (("search", rows[: n // 2]), ("test", rows[n // 2 :])):
        with open(here / "data" / f"{task}.{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in part)
    if task == "word_problems":  # the same problems as one document set for the local lm-eval task
        with open(here / "data" / "word_problems_all.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


# -- the SmolLM2 zoo's skills (mergesearch/smollm2_zoo.py): its training questions avoid these.
from mergesearch.smollm2_zoo import ALL_SKILLS as SMOL_SKILLS  # noqa: E402
from mergesearch.smollm2_zoo import eval_records as smol_records  # noqa: E402

for skill in SMOL_SKILLS:
    for split, rows in smol_records(skill).items():
        with open(here / "data" / f"{skill}.{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
