"""Write the bundled synthetic data sample, ``amoeba/sample_data/``, a tiny offline data directory.

    python utils/write_sample_data.py [--out amoeba/sample_data] [--seed 1234]

Every sentence, instruction and question in the sample is made up here from small word lists and
templates (fixed seed, so the output is byte-for-byte reproducible). Nothing is taken from a real dataset.
The files have the names and formats the loaders read from an offline data directory
(``$AMOEBA_DATA_DIR``), so the whole pipeline can run without network access; the numbers it then
produces mean nothing.

    calib/c4_demo.jsonl                              web-style text, {"text": ...} per line
    calib/wiki_demo.txt                              encyclopedia-style articles, one per line
    wikitext2/wikitext-2-raw-v1_test.hfrows.jsonl    WikiText-style rows, {"text": ...} per line
    instruct/alpaca_gpt4_en_demo_999.json            JSON list of {instruction, input, output}
    instruct/alpaca_cleaned_51941.jsonl.gz           the same kind of records, gzipped JSON lines
    mmlu/{dev,val,test}/<subject>_<split>.csv         header question,choice0..3,answer (0-3)
    arc/ARC-Easy-Test.jsonl                          {id, question: {stem, choices}, answerKey}
    piqa/valid.jsonl + piqa/valid-labels.lst         {goal, sol1, sol2} + one label (0/1) per line
    hellaswag/hellaswag_val_full.jsonl.gz            {idx, ctx, label, endings}
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from amoeba.files import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)

SEED = 1234
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "amoeba" / "sample_data"
LETTERS = "ABCD"

# ----------------------------------------------------------------------------------------------
# Word lists (made up for this sample; the place and person names are invented)
# ----------------------------------------------------------------------------------------------
NAMES = ["Mara", "Tobin", "Elsa", "Rowan", "Ida", "Felix", "Nora", "Quentin", "Lena", "Otis", "Priya", "Hugo",
         "Vera", "Milo", "June", "Arlo"]
SURNAMES = ["Ashdown", "Brannock", "Calloway", "Dunmore", "Ellery", "Fairholt", "Greyson", "Hollins", "Ivers",
            "Jessop"]
TOWNS = ["Elderford", "Wrenmouth", "Castlebrook", "Millhaven", "Northwick", "Stonemere", "Larkfield",
         "Brackenridge", "Fenwold", "Harrowgate"]
RIVERS = ["Ambrel", "Coriss", "Dwindle", "Tamble", "Orrin", "Lisk"]
REGIONS = ["Upper Vale", "Saltmarsh", "Greyfell", "Eastmoor", "Kestrel Downs"]
VEGETABLES = ["carrot", "bean", "pea", "radish", "lettuce", "onion", "squash", "beet"]
PRODUCTS = ["kettle", "desk lamp", "rain jacket", "bike light", "backpack", "coffee grinder", "garden hose",
            "reading chair"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TOOLS = ["hammer", "screwdriver", "wrench", "saw", "drill", "chisel", "trowel", "ladder"]
CATEGORIES = {
    "fruit": ["apple", "pear", "plum", "cherry", "peach", "grape", "mango", "lemon"],
    "animal": ["horse", "rabbit", "otter", "sparrow", "goat", "badger", "salmon", "beetle"],
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "brown", "gray"],
    "tool": TOOLS,
    "musical instrument": ["violin", "flute", "drum", "trumpet", "cello", "harp", "piano", "guitar"],
}
OPPOSITES = [("hot", "cold"), ("tall", "short"), ("early", "late"), ("empty", "full"), ("open", "closed"),
             ("light", "heavy"), ("fast", "slow"), ("wet", "dry"), ("loud", "quiet"), ("rough", "smooth"),
             ("young", "old"), ("above", "below"), ("inside", "outside"), ("begin", "end"), ("win", "lose"),
             ("push", "pull"), ("buy", "sell"), ("high", "low")]
PLURALS = [("cat", "cats"), ("box", "boxes"), ("city", "cities"), ("leaf", "leaves"), ("child", "children"),
           ("mouse", "mice"), ("bus", "buses"), ("tooth", "teeth"), ("knife", "knives"), ("story", "stories"),
           ("sheep", "sheep"), ("glass", "glasses")]
VERBS = [("walks", "walked"), ("paints", "painted"), ("opens", "opened"), ("cleans", "cleaned"),
         ("carries", "carried"), ("fixes", "fixed"), ("writes", "wrote"), ("finds", "found"), ("buys", "bought"),
         ("makes", "made")]
OBJECTS = ["fence", "window", "letter", "basket", "bicycle", "door", "table", "lantern", "boat", "map"]
NONSENSE = ["blicket", "wug", "dax", "fep", "toma", "zorb", "kiki", "mepo", "glorp", "tifa"]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def _fill(rng: random.Random, template: str, **fixed) -> str:
    """Fill the ``{slot}`` fields of a template with random words (one draw per slot) or ``fixed`` values."""
    slots = {
        "name": _pick(rng, NAMES), "surname": _pick(rng, SURNAMES),
        "town": _pick(rng, TOWNS), "river": _pick(rng, RIVERS), "region": _pick(rng, REGIONS),
        "veg": _pick(rng, VEGETABLES), "product": _pick(rng, PRODUCTS), "month": _pick(rng, MONTHS),
        "day": _pick(rng, WEEKDAYS), "tool": _pick(rng, TOOLS), "n": rng.randint(2, 9), "m": rng.randint(10, 60),
        "year": rng.randint(1720, 1990), "decade": f"{rng.randint(172, 198) * 10}s",
        "fruit": _pick(rng, CATEGORIES["fruit"]),
        "animal": _pick(rng, CATEGORIES["animal"]), "color": _pick(rng, CATEGORIES["color"]),
        "price": f"{rng.randint(5, 90)}.{rng.choice(['00', '50', '95', '99'])}",
    }
    slots.update(fixed)
    others = [t for t in TOWNS if t not in slots["town"]]  # a different town than the one described
    slots["other"] = _pick(rng, others)
    return template.format(**slots)


# ----------------------------------------------------------------------------------------------
# Running text: web-style documents (C4 stand-in) and encyclopedia-style articles (WikiText stand-in)
# ----------------------------------------------------------------------------------------------
WEB_THEMES = {
    "garden": [
        "Plant {veg} seeds about {n} centimetres apart in loose, well-drained soil.",
        "Water the bed early in the morning so the leaves can dry before the evening.",
        "A thin layer of straw keeps the soil moist and holds back most of the weeds.",
        "If the nights are still cold in {month}, cover the young {veg} plants with a light cloth.",
        "Our community garden in {town} now has {m} raised beds, and new members are always welcome.",
        "Most {veg} varieties are ready to pick after about {m} days.",
        "Keep a small notebook of what you planted and when, because next year you will not remember.",
        "A {tool} with a long handle saves your back when you clear the paths between the beds.",
    ],
    "kitchen": [
        "Heat {n} tablespoons of oil in a wide pan over a medium flame.",
        "Add the chopped {veg} and stir for {n} minutes until it turns soft.",
        "This {fruit} cake keeps well for {n} days in a closed tin.",
        "Season the soup with salt and pepper, then let it simmer for {m} minutes.",
        "My grandmother in {town} made this dish every {day}, and the house always smelled wonderful.",
        "You can swap the {fruit} for any other fruit that is in season.",
        "Serve it warm with fresh bread and a simple green salad.",
        "Leftovers can be frozen in small boxes and reheated on a busy evening.",
    ],
    "review": [
        "I bought the {product} in {month} and have used it almost every day since.",
        "It cost {price} and arrived two days after I placed the order.",
        "The build quality is solid, although the {color} finish scratches more easily than I expected.",
        "After {n} weeks the {product} still works as well as on the first day.",
        "Customer service answered my question within an hour, which I appreciated.",
        "If you need something simple and reliable, this is a good choice.",
        "My only complaint is that the instructions were printed in very small type.",
        "I would give it four stars out of five and would buy it again.",
    ],
    "news": [
        "The {town} library will open a new reading room on {day}, the council said.",
        "Volunteers collected {m} bags of litter along the banks of the {river} last weekend.",
        "The annual spring fair returns to {town} in {month} with music, food stalls and a pet show.",
        "Road works on the bridge over the {river} are expected to last {n} weeks.",
        "Local baker {name} {surname} has won a regional prize for her {fruit} tart.",
        "The school choir raised {price} for new instruments with a concert on {day} evening.",
        "Residents are asked to leave their bins out before seven in the morning.",
        "More details can be found on the notice board outside the town hall.",
    ],
    "cycling": [
        "Check the tyre pressure before every ride; soft tyres make the bike slow and tiring.",
        "A {n}-hour loop from {town} to the {river} valley is a pleasant ride for beginners.",
        "Carry a spare tube, a small pump and a {tool} in your saddle bag.",
        "Clean the chain every {n} weeks and oil it lightly afterwards.",
        "The path along the {river} is flat and quiet, with a cafe at the halfway point.",
        "In {month} the evenings are short, so fit a bright front light and a red rear light.",
        "Riding with a friend is safer and a lot more fun on long routes.",
        "Drink water regularly, even when the weather is cool.",
    ],
}


def web_document(rng: random.Random) -> str:
    """One web-style document: 2-3 paragraphs on one theme, lines separated by newlines."""
    theme = _pick(rng, sorted(WEB_THEMES))
    paragraphs = []
    for _ in range(rng.randint(2, 3)):
        # Distinct templates within a paragraph, so no sentence pattern repeats back to back.
        sentences = [_fill(rng, t) for t in rng.sample(WEB_THEMES[theme], rng.randint(3, 5))]
        paragraphs.append(" ".join(sentences))
    return "\n".join(paragraphs)


ARTICLE_SECTIONS = {
    "History": [
        "The first houses at {town} were built beside a ford on the River {river} around {year}.",
        "In {year}, a stone bridge replaced the old ferry, and the market grew quickly.",
        "A fire in {year} destroyed much of the high street, which was rebuilt in brick.",
        "The railway reached {town} in {year}, bringing visitors from the larger towns of {region}.",
        "During the {decade} the mill was the largest employer, with about {m} workers.",
    ],
    "Geography": [
        "{town} lies in the {region} district, on the north bank of the River {river}.",
        "The land around the town is mostly low hills and open pasture.",
        "The River {river} floods the lower meadows in most winters.",
        "The nearest larger town is {other}, about {m} kilometres to the east.",
        "The climate is mild, with most rain falling in the autumn months.",
    ],
    "Economy": [
        "Farming and small workshops remain important to the local economy.",
        "A weekly market is held every {day} in the square beside the old church.",
        "Tourism has grown since {year}, when a walking trail along the {river} was opened.",
        "The former mill now houses {n} small businesses and a museum.",
        "Many residents travel to larger towns in {region} for work.",
    ],
    "Culture": [
        "The town band, founded in {year}, plays in the park on summer evenings.",
        "A festival of lanterns is held each {month} on the banks of the {river}.",
        "The local museum keeps a collection of tools, maps and old photographs.",
        "The painter {name} {surname} lived in {town} for {n} years and painted its bridges many times.",
        "The library runs a reading group that meets on the first {day} of each month.",
    ],
}


def _wikitext_tokens(sentence: str) -> str:
    """Space out punctuation the way WikiText writes it (``word , word .``)."""
    for mark in (",", ".", ";"):
        sentence = sentence.replace(mark, f" {mark}")
    return sentence


def article(rng: random.Random, town: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """An invented town's article: (title, [(section, [paragraph, ...]), ...]) in plain prose."""
    sections = []
    for section in ("History", "Geography", "Economy", "Culture"):
        paragraphs = []
        for _ in range(rng.randint(2, 3)):
            picked = rng.sample(ARTICLE_SECTIONS[section], rng.randint(3, 5))
            sentences = [_fill(rng, t, town=town) for t in picked]
            paragraphs.append(" ".join(sentences))
        sections.append((section, paragraphs))
    return town, sections


def wikitext_rows(rng: random.Random, n_articles: int) -> list[str]:
    """Rows as the HF ``wikitext`` loader gives them: ``""`` for blank lines, `` text \\n`` otherwise."""
    rows = []
    for i in range(n_articles):
        # Ten town names; later articles are about a namesake ("Upper Elderford").
        town = TOWNS[i % len(TOWNS)] if i < len(TOWNS) else f"Upper {TOWNS[i % len(TOWNS)]}"
        title, sections = article(rng, town)
        rows += ["", f" = {title} = \n", ""]
        intro = _fill(rng, "{town} is a small market town in the {region} district, beside the River {river}.",
                      town=title)
        rows += [f" {_wikitext_tokens(intro)} \n"]
        for section, paragraphs in sections:
            rows += ["", f" = = {section} = = \n", ""]
            for p in paragraphs:
                rows += [f" {_wikitext_tokens(p)} \n"]
    rows.append("")
    return rows


# ----------------------------------------------------------------------------------------------
# Instructions with their responses
# ----------------------------------------------------------------------------------------------
def _sentence(rng: random.Random) -> tuple[str, str]:
    """A short sentence in the present tense and the same sentence in the past tense."""
    present, past = _pick(rng, VERBS)
    name, obj = _pick(rng, NAMES), _pick(rng, OBJECTS)
    place = _pick(rng, TOWNS)
    return f"{name} {present} the {obj} in {place}.", f"{name} {past} the {obj} in {place}."


def _instruction(rng: random.Random, kind: int) -> dict:
    """One {instruction, input, output} record of the given kind (kinds cycle through simple tasks)."""
    if kind == 0:
        nums = [rng.randint(1, 99) for _ in range(rng.randint(2, 4))]
        listed = ", ".join(map(str, nums))
        return {"instruction": "Add the following numbers.", "input": listed,
                "output": f"The sum of {listed} is {sum(nums)}."}
    if kind == 1:
        words = rng.sample(NAMES + VEGETABLES + OBJECTS, rng.randint(3, 6))
        return {"instruction": "Sort these words in alphabetical order.", "input": ", ".join(words),
                "output": "In alphabetical order: " + ", ".join(sorted(words, key=str.lower)) + "."}
    if kind == 2:
        present, past = _sentence(rng)
        return {"instruction": "Rewrite the sentence in the past tense.", "input": present, "output": past}
    if kind == 3:
        word, plural = _pick(rng, PLURALS)
        return {"instruction": f"What is the plural of the word \"{word}\"?", "input": "",
                "output": f"The plural of \"{word}\" is \"{plural}\"."}
    if kind == 4:
        a, b = _pick(rng, OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return {"instruction": f"Give a word that means the opposite of \"{a}\".", "input": "",
                "output": f"The opposite of \"{a}\" is \"{b}\"."}
    if kind == 5:
        present, _ = _sentence(rng)
        n = len(present.split())
        return {"instruction": "Count the words in the following sentence.", "input": present,
                "output": f"The sentence has {n} words."}
    if kind == 6:
        category = _pick(rng, sorted(CATEGORIES))
        item = _pick(rng, CATEGORIES[category])
        options = ", ".join(sorted(CATEGORIES))
        return {"instruction": f"Classify the item as one of: {options}.", "input": item,
                "output": f"\"{item.capitalize()}\" is {_a(category)} {category}."}
    if kind == 7:
        present, _ = _sentence(rng)
        return {"instruction": "Convert the following sentence to upper case.", "input": present,
                "output": present.upper()}
    if kind == 8:
        theme = _pick(rng, sorted(WEB_THEMES))
        text = " ".join(_fill(rng, t) for t in rng.sample(WEB_THEMES[theme], 3))
        topic = {"garden": "vegetable gardening", "kitchen": "home cooking", "review": "a household product",
                 "news": "local news", "cycling": "cycling"}[theme]
        return {"instruction": f"Write a short paragraph about {topic}.", "input": "", "output": text}
    if kind == 9:
        activity, setup, first, second = _pick(rng, ACTIVITIES)
        return {"instruction": f"Describe what a person usually does when {activity.lower()}.", "input": "",
                "output": f"First, {setup.format(P='the person')} Then the person {first} "
                          f"Finally, the person {second}"}
    words = _pick(rng, NAMES) + " " + _pick(rng, OBJECTS)
    return {"instruction": "Reverse the order of the letters in each word.", "input": words,
            "output": " ".join(w[::-1] for w in words.split())}


def instructions(rng: random.Random, n: int) -> list[dict]:
    """``n`` instruction records, cycling through the task kinds in a shuffled order."""
    kinds = [i % 11 for i in range(n)]
    rng.shuffle(kinds)
    return [_instruction(rng, k) for k in kinds]


# ----------------------------------------------------------------------------------------------
# Multiple-choice questions (one right answer each)
# ----------------------------------------------------------------------------------------------
def _a(noun: str) -> str:
    """The indefinite article for ``noun``."""
    return "an" if noun[0] in "aeiou" else "a"


def _number_choices(rng: random.Random, answer: int, k: int = 4) -> list[int]:
    """``answer`` and ``k - 1`` distinct nearby wrong numbers, shuffled."""
    out = {answer}
    while len(out) < k:
        out.add(answer + rng.choice([-1, 1]) * rng.randint(1, 10))
    choices = sorted(out)
    rng.shuffle(choices)
    return choices


def _category_question(rng: random.Random, k: int = 4) -> tuple[str, list[str], int]:
    """Which of these is a <category>? One item from it, the rest from other categories."""
    names = sorted(CATEGORIES)
    category = _pick(rng, names)
    right = _pick(rng, CATEGORIES[category])
    others = [c for c in names if c != category]
    wrong = [_pick(rng, CATEGORIES[c]) for c in rng.sample(others, k - 1)]
    choices = [right] + wrong
    rng.shuffle(choices)
    return f"Which of the following is {_a(category)} {category}?", choices, choices.index(right)


def mmlu_question(rng: random.Random, subject: str) -> tuple[str, list[str], int]:
    """(question, four choices, index of the right one) for one subject."""
    if subject == "elementary_mathematics":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        op = rng.randrange(3)
        if op == 0:
            question, answer = f"What is {a} + {b}?", a + b
        elif op == 1:
            a, b = max(a, b), min(a, b)
            question, answer = f"What is {a} - {b}?", a - b
        else:
            a, b = a % 12 + 2, b % 12 + 2
            question, answer = f"What is {a} times {b}?", a * b
        choices = _number_choices(rng, answer)
        return question, [str(c) for c in choices], choices.index(answer)
    if subject == "high_school_statistics":
        n = rng.choice([3, 5])
        values = sorted(rng.sample(range(1, 40), n))
        kind = rng.randrange(3)
        if kind == 0:  # shift one value so the mean is a whole number
            values[-1] += (-sum(values)) % n
            question, answer = f"What is the mean of {', '.join(map(str, values))}?", sum(values) // n
        elif kind == 1:
            question, answer = f"What is the median of {', '.join(map(str, values))}?", values[n // 2]
        else:
            question, answer = f"What is the range of {', '.join(map(str, values))}?", values[-1] - values[0]
        shown = values[:]
        rng.shuffle(shown)
        question = question.replace(", ".join(map(str, values)), ", ".join(map(str, shown)))
        choices = _number_choices(rng, answer)
        return question, [str(c) for c in choices], choices.index(answer)
    if subject == "formal_logic":
        x, y = rng.sample(NONSENSE, 2)
        name = _pick(rng, NAMES)
        question = f"All {x}s are {y}s. {name} is a {x}. Which statement follows?"
        right = f"{name} is a {y}."
        wrong = [f"{name} is not a {y}.", f"Every {y} is a {x}.", f"No {x} is a {y}.", f"{name} is not a {x}."]
        choices = [right] + rng.sample(wrong, 3)
        rng.shuffle(choices)
        return question, choices, choices.index(right)
    return _category_question(rng)


MMLU_SUBJECTS = ("elementary_mathematics", "formal_logic", "high_school_statistics", "miscellaneous")
MMLU_COUNTS = {"dev": 5, "val": 6, "test": 15}


def mmlu_csv(rows: list[tuple[str, list[str], int]]) -> str:
    """Rows as the offline MMLU CSVs hold them: a header, then question, four choices, answer 0-3."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
    for question, choices, answer in rows:
        writer.writerow([question, *choices, answer])
    return buf.getvalue()


def arc_items(rng: random.Random, n: int) -> list[dict]:
    """ARC-style items; like the real layout, a few use labels 1-4 and a few have 3 or 5 choices."""
    out = []
    for i in range(n):
        k = 3 if i % 17 == 5 else 5 if i % 23 == 7 else 4
        kind = i % 4
        if kind == 0:
            question, choices, answer = _category_question(rng, k)
        elif kind == 1:
            word, opposite = _pick(rng, OPPOSITES)
            pool = [b for a, b in OPPOSITES if b != opposite and a != word]
            choices = [opposite] + rng.sample(pool, k - 1)
            rng.shuffle(choices)
            question, answer = f"Which word means the opposite of \"{word}\"?", choices.index(opposite)
        elif kind == 2:
            weeks = rng.randint(2, 9)
            choices = _number_choices(rng, 7 * weeks, k)
            question = f"How many days are there in {weeks} weeks?"
            answer = choices.index(7 * weeks)
            choices = [str(c) for c in choices]
        else:
            values = rng.sample(range(10, 999), k)
            question = "Which number is the largest?"
            answer = values.index(max(values))
            choices = [str(v) for v in values]
        labels = [str(j + 1) for j in range(k)] if i % 10 == 9 else list("ABCDE"[:k])
        out.append({"id": f"Synthetic_{i:04d}",
                    "question": {"stem": question,
                                 "choices": [{"text": t, "label": lab} for t, lab in zip(choices, labels)]},
                    "answerKey": labels[answer]})
    return out


PIQA_TEMPLATES = [
    ("To keep {x} fresh for longer,", "store it in a closed container in the fridge.",
     "leave it uncovered on a sunny windowsill.", ["bread", "cut fruit", "cheese", "cooked rice"]),
    ("How do I dry a wet {x}?", "Hang it up in a warm, airy place until the water is gone.",
     "Fold it tightly and shut it in a drawer while it is still wet.", ["towel", "raincoat", "sock", "tent"]),
    ("To cool a glass of {x} quickly,", "stand the glass in a bowl of ice water for a few minutes.",
     "stand the glass next to a hot stove for a few minutes.", ["juice", "lemonade", "milk", "tea"]),
    ("How can I find a {x} that I dropped on the carpet?",
     "Shine a flashlight low across the carpet so the object casts a shadow.",
     "Turn off all the lights and wait for the object to roll back to you.", ["button", "earring", "pin", "bead"]),
    ("To carry a heavy {x} up the stairs,", "hold it close to your body and take the steps slowly.",
     "hold it at arm's length above your head and run up the steps.", ["box", "suitcase", "bag of soil", "basket"]),
    ("How do I loosen a tight {x}?", "Grip it with a rubber glove and turn it firmly.",
     "Put it in the freezer overnight and then tap it with a spoon.", ["jar lid", "bottle cap", "door knob",
                                                                        "tap"]),
    ("To stop a {x} from wobbling,", "fold a piece of card and slide it under the short leg.",
     "pour a cup of water over the short leg.", ["table", "chair", "stool", "bookcase"]),
    ("How can I remember to water my {x}?", "Write a note on the calendar for the same day each week.",
     "Water it once and then hide the watering can.", ["fern", "cactus", "herb pot", "window box"]),
]


def piqa_items(rng: random.Random, n: int) -> tuple[list[dict], list[int]]:
    """PIQA-style goals with one sensible and one silly solution; returns (rows, labels)."""
    rows, labels = [], []
    for i in range(n):
        goal, good, bad, things = PIQA_TEMPLATES[i % len(PIQA_TEMPLATES)]
        goal = goal.format(x=things[(i // len(PIQA_TEMPLATES)) % len(things)])
        label = rng.randrange(2)
        sol1, sol2 = (good, bad) if label == 0 else (bad, good)
        rows.append({"goal": goal, "sol1": sol1, "sol2": sol2})
        labels.append(label)
    return rows, labels


# (activity label, context with {P} for the person, the ending that fits, one more fitting ending)
ACTIVITIES = [
    ("Making tea", "{P} fills a kettle with water and sets out a cup.",
     "places the kettle on the stove and waits for it to boil.", "pours the hot water over a tea bag."),
    ("Washing a car", "{P} parks the car in the driveway and fills a bucket with soapy water.",
     "scrubs the doors with a sponge and rinses them with a hose.", "wipes the windows dry with a soft cloth."),
    ("Planting a tree", "{P} digs a wide hole in the garden and sets the young tree beside it.",
     "lowers the roots into the hole and fills it with soil.", "waters the soil around the trunk."),
    ("Painting a fence", "{P} stirs a tin of paint and dips a wide brush into it.",
     "spreads the paint along the wooden boards in long strokes.", "paints the next board the same way."),
    ("Baking bread", "{P} mixes flour, water and yeast in a large bowl.",
     "kneads the dough on the table until it is smooth.", "shapes the dough into a loaf and puts it in the oven."),
    ("Fixing a bicycle", "{P} turns the bicycle upside down and removes the front wheel.",
     "pulls the flat tube out of the tyre and fits a new one.", "pumps the tyre up and puts the wheel back."),
    ("Folding laundry", "{P} empties a basket of clean clothes onto the bed.",
     "folds each shirt neatly and stacks them in a pile.", "puts the folded clothes away in a drawer."),
    ("Walking a dog", "{P} clips a lead onto the dog's collar and opens the front door.",
     "walks the dog along the path to the park.", "lets the dog sniff around the trees."),
    ("Building a snowman", "{P} rolls a large ball of snow across the yard.",
     "lifts a smaller ball on top to make the head.", "adds two stones for the eyes."),
    ("Washing dishes", "{P} fills the sink with warm water and a little soap.",
     "scrubs each plate and sets it on the rack to dry.", "rinses the glasses under the tap."),
    ("Playing the drums", "{P} sits down behind a drum kit and picks up two sticks.",
     "taps out a steady beat on the snare drum.", "hits the cymbal at the end of the song."),
    ("Reading a book", "{P} sits in an armchair and opens a thick book.",
     "turns the pages slowly and reads the first chapter.", "marks the page with a slip of paper."),
]
PEOPLE = [("A man", "he"), ("A woman", "she"), ("A boy", "he"), ("A girl", "she"), ("An old man", "he"),
          ("A young woman", "she")]


def hellaswag_items(rng: random.Random, n: int) -> list[dict]:
    """HellaSwag-style items: an activity's first step, the fitting ending and three from other activities."""
    out = []
    for i in range(n):
        j = i % len(ACTIVITIES)
        label_text, setup, first, second = ACTIVITIES[j]
        person, pronoun = _pick(rng, PEOPLE)
        right = first if (i // len(ACTIVITIES)) % 2 == 0 else second
        others = [k for k in range(len(ACTIVITIES)) if k != j]
        endings = [right] + [ACTIVITIES[k][2 + rng.randrange(2)] for k in rng.sample(others, 3)]
        rng.shuffle(endings)
        out.append({"idx": i, "ctx": f"{label_text}: {setup.format(P=person)} {pronoun}",
                    "label": endings.index(right), "endings": endings})
    return out


# ----------------------------------------------------------------------------------------------
# Building and writing the files
# ----------------------------------------------------------------------------------------------
def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _gzip(text: str) -> bytes:
    # mtime=0 and no file name in the header: the same text always gives the same bytes here.
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


NOTICE = """# amoeba/sample_data: a synthetic sample for plumbing checks only

Everything in this folder is **synthetic**. It was written by `utils/write_sample_data.py` (seed {seed})
from small invented word lists and sentence templates. No file here is copied or derived from a real
dataset. The names of towns, rivers and people are made up.

The files use the names and formats of an offline data directory (`AMOEBA_DATA_DIR`), so the pipeline can
run end to end without network access (calibration, fine-tuning, perplexity, MMLU and lm-eval tasks).
**Results on this sample are meaningless as a benchmark**. Use it to check that the pipeline runs, not to
measure a model.

To regenerate (the output is byte-for-byte reproducible):

    python utils/write_sample_data.py --out amoeba/sample_data

| file | stand-in for | rows |
| --- | --- | ---: |
{table}
"""


def build_files(seed: int = SEED) -> dict[str, bytes]:
    """Every file of the sample: {path relative to the data directory: bytes}, fully determined by ``seed``."""
    files: dict[str, bytes] = {}
    rows: dict[str, tuple[str, int]] = {}

    def stream(name: str) -> random.Random:
        # One generator per file, so changing one file's recipe leaves the others' bytes alone.
        return random.Random(f"{seed}:{name}")

    def add(path: str, data, what: str, count: int) -> None:
        files[path] = data if isinstance(data, bytes) else data.encode("utf-8")
        rows[path] = (what, count)

    rng = stream("c4")
    docs = [{"text": web_document(rng)} for _ in range(60)]
    add("calib/c4_demo.jsonl", _jsonl(docs), "C4 calibration text", len(docs))

    rng = stream("wiki")
    wiki = []
    for i in range(4):
        title, sections = article(rng, TOWNS[-1 - i])
        wiki.append(" ".join(p for _, paragraphs in sections for p in paragraphs))
    add("calib/wiki_demo.txt", "".join(line + "\n" for line in wiki), "Wikipedia articles", len(wiki))

    rng = stream("wikitext2")
    wt = wikitext_rows(rng, 14)
    add("wikitext2/wikitext-2-raw-v1_test.hfrows.jsonl", _jsonl({"text": t} for t in wt), "WikiText-2 test rows",
        len(wt))

    rng = stream("alpaca_gpt4")
    gpt4 = instructions(rng, 150)
    add("instruct/alpaca_gpt4_en_demo_999.json", json.dumps(gpt4, indent=2, ensure_ascii=False) + "\n",
        "Alpaca-GPT4 instructions", len(gpt4))
    rng = stream("alpaca_cleaned")
    cleaned = instructions(rng, 100)
    add("instruct/alpaca_cleaned_51941.jsonl.gz", _gzip(_jsonl(cleaned)), "Alpaca-cleaned instructions",
        len(cleaned))

    for subject in MMLU_SUBJECTS:
        rng = stream(f"mmlu:{subject}")
        for split in ("dev", "val", "test"):
            qs = [mmlu_question(rng, subject) for _ in range(MMLU_COUNTS[split])]
            add(f"mmlu/{split}/{subject}_{split}.csv", mmlu_csv(qs), f"MMLU {split}", len(qs))

    rng = stream("arc")
    arc = arc_items(rng, 60)
    add("arc/ARC-Easy-Test.jsonl", _jsonl(arc), "ARC-Easy test", len(arc))

    rng = stream("piqa")
    piqa, labels = piqa_items(rng, 60)
    add("piqa/valid.jsonl", _jsonl(piqa), "PIQA validation", len(piqa))
    add("piqa/valid-labels.lst", "".join(f"{lab}\n" for lab in labels), "PIQA labels", len(labels))

    rng = stream("hellaswag")
    hs = hellaswag_items(rng, 60)
    add("hellaswag/hellaswag_val_full.jsonl.gz", _gzip(_jsonl(hs)), "HellaSwag validation", len(hs))

    table = "\n".join(f"| `{p}` | {what} | {n} |" for p, (what, n) in sorted(rows.items()))
    files["NOTICE.md"] = NOTICE.format(seed=seed, table=table).encode("utf-8")
    return dict(sorted(files.items()))


def write_sample(out_dir: str | Path = DEFAULT_OUT, seed: int = SEED) -> list[Path]:
    """Write the sample into ``out_dir`` (each file through a temporary file and a rename); return the paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    files = build_files(seed)
    written = []
    for rel, data in files.items():
        path = out_dir / rel
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)  # mkstemp makes private files; the sample is meant to be read by anyone
        written.append(path)
    stale = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
                   if p.is_file() and p.relative_to(out_dir).as_posix() not in files)
    if stale:
        logger.warning("%s holds files the generator does not write: %s", out_dir, ", ".join(stale))
    logger.info("wrote %d files (%d bytes) into %s", len(written), sum(p.stat().st_size for p in written), out_dir)
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like the project's other commands
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad input)."""
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write the sample into")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (the committed sample uses the default)")
    args = parser.parse_args(argv)
    try:
        paths = write_sample(args.out, args.seed)
    except (ValueError, OSError) as err:
        print(f"error: --out: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files, {sum(p.stat().st_size for p in paths)} bytes, into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
