"""Document preparation for the offline lm-eval tasks (referenced from the task YAMLs as ``!function``).

Each function turns the rows of an offline file into the fields lm-eval's own task of the same name
reads, so the prompts, choices and scoring are those of the stock task.
"""

import json
from pathlib import Path

# Written next to the rendered YAMLs: where side files (PIQA labels) live.
PATHS_FILE = "local_paths.json"


def _paths() -> dict:
    return json.loads((Path(__file__).with_name(PATHS_FILE)).read_text(encoding="utf-8"))


def arc_docs(dataset):
    """Original AI2 ARC rows ({question: {stem, choices}, answerKey}) -> the hub layout lm-eval's arc uses."""

    def convert(doc):
        q = doc["question"]
        return {"question": q["stem"],
                "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
                "answerKey": doc["answerKey"]}

    return dataset.map(convert, remove_columns=dataset.column_names)


def piqa_docs(dataset):
    """Official PIQA rows + the line-aligned label file -> {goal, sol1, sol2, label}."""
    labels_file = _paths()["piqa_labels"]
    labels = [int(line) for line in Path(labels_file).read_text(encoding="utf-8").split()]
    if len(labels) != len(dataset):
        raise ValueError(f"{labels_file} has {len(labels)} labels for {len(dataset)} PIQA questions")
    return dataset.map(lambda doc, i: {"label": labels[i]}, with_indices=True)


def hellaswag_docs(dataset):
    """Offline HellaSwag rows ({ctx, endings, label}) -> {query, choices, label}, cleaned as lm-eval does.

    The offline file joins ``activity_label: ctx_a ctx_b`` already, without lm-eval's capitalisation of
    ``ctx_b``'s first letter, so scores can differ slightly from the hub task on those items.
    """
    from lm_eval.tasks.hellaswag.utils import preprocess  # the stock task's own text clean-up

    def convert(doc):
        return {"query": preprocess(doc["ctx"]), "choices": [preprocess(e) for e in doc["endings"]],
                "label": int(doc["label"])}

    return dataset.map(convert, remove_columns=dataset.column_names)


def mmlu_docs(dataset):
    """Offline MMLU CSV rows (question, choice0..3, answer 0-3) -> the cais/mmlu layout (choices list)."""

    def convert(doc):
        return {"question": str(doc["question"]),
                "choices": [str(doc[f"choice{j}"]) for j in range(4)],
                "answer": int(doc["answer"])}

    return dataset.map(convert, remove_columns=dataset.column_names)
