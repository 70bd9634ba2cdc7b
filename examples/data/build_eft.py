"""Writes eft.jsonl: judge-training (EFT) examples for the quickstart's iteration 0.

Each example is the judge prompt of examples/quickstart.yaml (its judge.template, a
short wording of the additive 0-5 rubric, rendered exactly as the judge phase renders
it) for one question and answer, with a short grading that ends in "Score: N" as the
response. Fine-tuning M_0 on them is how
iteration 0 teaches the model the verdict format (Yuan et al. 2024 use EFT data for the
same purpose); the graded answers below are written by hand and span the whole scale.

    .venv/bin/python examples/data/build_eft.py   # rewrites examples/data/eft.jsonl

Run it again after changing the quickstart's judge.template.
"""
import json
from pathlib import Path

from selfreward.judging import render_judge_prompt
from selfreward.spec import load_spec_file

# (question, answer, grading, score)
GRADED = [
    ("What is two plus three?", "Two plus three is five.", "Correct, direct and complete.", 5),
    ("What is two plus three?", "It is a number bigger than two.", "Relevant but does not answer.", 1),
    ("What is two plus three?", "Bananas are yellow.", "Unrelated to the question.", 0),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit.", "Answers fully and clearly.", 5),
    ("Name a fruit that is yellow.", "Some fruits have colours.", "Relevant, gives no fruit.", 1),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag, wait three minutes, remove the bag.",
     "Clear useful steps, complete.", 4),
    ("How do I make a cup of tea?", "Use hot water.", "Relevant but very incomplete.", 2),
    ("How do I make a cup of tea?", "The capital of Spain is Madrid.", "Unrelated to the question.", 0),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue.",
     "Correct and direct explanation.", 5),
    ("Why is the sky blue?", "Because of the sun and the air.", "Partly relevant, no real explanation.", 2),
    ("Why is the sky blue?", "I like the colour green.", "Does not address the question.", 0),
    ("Give one tip for staying healthy.", "Walk for at least thirty minutes every day.", "Useful and direct.", 4),
    ("Give one tip for staying healthy.", "Health matters to many people.", "Relevant but gives no tip.", 1),
    ("Give one tip for staying healthy.", "Drink water, sleep well and eat vegetables every day.",
     "Helpful, covers the basics well.", 3),
    ("What does a thermometer measure?", "A thermometer measures temperature.", "Correct and complete.", 5),
    ("What does a thermometer measure?", "It is a tool used by doctors.", "Relevant but misses the point.", 2),
    ("What does a thermometer measure?", "Seven days make a week.", "Unrelated answer.", 0),
    ("Explain what a noun is.", "A noun names a person, place, thing or idea, such as city or music.",
     "Accurate, clear, with examples.", 5),
    ("Explain what a noun is.", "A noun is a kind of word.", "Relevant but thin.", 2),
    ("Explain what a noun is.", "Nouns and verbs are words; nouns are names of things.", "Basic and useful.", 3),
    ("Suggest a name for a pet cat.", "You could call your cat Pepper.", "Direct and helpful.", 4),
    ("Suggest a name for a pet cat.", "Cats are pets.", "Relevant, gives no name.", 1),
    ("How many days are in a week?", "A week has seven days.", "Correct and direct.", 5),
    ("How many days are in a week?", "More than five.", "Relevant, not precise.", 2),
    ("How many days are in a week?", "Water boils at 100 degrees.", "Unrelated answer.", 0),
    ("What do bees make?", "Bees make honey and beeswax.", "Correct and complete.", 5),
    ("What do bees make?", "Bees make things in a hive.", "Relevant but vague.", 2),
    ("What do bees make?", "Bees make honey.", "Correct, basic.", 3),
    ("Write one sentence about the sun.", "The sun is a star that gives the Earth light and warmth.",
     "Fulfils the request well.", 4),
    ("Write one sentence about the sun.", "Sun.", "Barely relevant.", 1),
]


def main() -> None:
    spec, _ = load_spec_file(Path(__file__).resolve().parent.parent / "quickstart.yaml")
    judge = spec.judge  # the EFT prompts must be the prompts the quickstart judges with
    out = Path(__file__).with_name("eft.jsonl")
    with out.open("w") as f:
        for question, answer, grading, score in GRADED:
            f.write(json.dumps({"prompt": render_judge_prompt(judge, question, answer),
                                "response": f"{grading}\nScore: {score}"}) + "\n")
    print(f"wrote {len(GRADED)} examples to {out}")


if __name__ == "__main__":
    main()
