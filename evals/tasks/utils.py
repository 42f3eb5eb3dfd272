"""Loaders for the local ``ndb_*`` lm-eval tasks: read ``$NEURALDB_DATA`` files into HF-schema datasets.

Every task YAML in this folder names one of the ``load_*`` functions as its ``custom_dataset``. A loader
turns the raw file (GLUE TSV, hendrycks CSV, llm-foundry JSONL, the WSC XML, ...) into the documents the
built-in lm-eval task gets from the Hugging Face hub: same field names, same values, same split name. The
YAMLs can then keep the built-in ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` verbatim.

Nothing here touches the network; the files are read at task-build time, so ``NEURALDB_DATA`` is looked
up when lm-eval builds the task, not when the YAML is indexed. :data:`FILES` lists each task's files (the
runner checks them before running).
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import datasets

from neuraldb.data import data_dir

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)


def _mmlu_files(subject: str) -> tuple[str, str]:
    return f"mmlu/test/{subject}_test.csv", f"mmlu/dev/{subject}_dev.csv"


FILES: dict[str, tuple[str, ...]] = {
    "cola": ("glue/CoLA/dev.tsv",),
    "sst2": ("glue/SST-2/dev.tsv",),
    "mrpc": ("glue/MRPC/dev.tsv",),
    "qnli": ("glue/QNLI/dev.tsv",),
    "rte": ("alphaedit_glue_eval/rte.json",),
    "nli": ("alphaedit_glue_eval/nli.json",),
    "mmlu": tuple(f for s in MMLU_SUBJECTS for f in _mmlu_files(s)),
    "commonsense_qa": ("commonsense_qa/validation_hf_format.jsonl",),
    "arc_challenge": ("arc_challenge/arc_challenge_test.jsonl",),
    "lambada_openai": ("lambada/lambada_openai.jsonl",),
    "wsc273": ("wsc273/WSCollection.xml",),
    "sciq": ("sciq/test.jsonl",),
}
"""Files (relative to ``$NEURALDB_DATA``) each task reads; the keys are the task names without ``ndb_``."""


# ---------------------------------------------------------------- reading files


def _path(relative: str) -> Path:
    path = data_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative} not found under {data_dir()} (set NEURALDB_DATA to the data folder)")
    return path


def _tsv(relative: str, header: bool) -> list[dict[str, str]] | list[list[str]]:
    """GLUE TSV rows, read as the GLUE loaders do: no quote handling (``csv.QUOTE_NONE``), BOM dropped."""
    with _path(relative).open(encoding="utf-8-sig", newline="") as f:
        if header:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _json(relative: str) -> Any:
    return json.loads(_path(relative).read_text(encoding="utf-8"))


def _jsonl(relative: str) -> list[dict[str, Any]]:
    with _path(relative).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _splits(**splits: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


# ---------------------------------------------------------------- GLUE (HF ``nyu-mll/glue`` fields)


def load_cola(**_: Any) -> datasets.DatasetDict:
    """CoLA dev (headerless: source, label, original label, sentence) → ``validation``."""
    rows = _tsv(FILES["cola"][0], header=False)
    return _splits(validation=[{"sentence": r[3], "label": int(r[1]), "idx": i} for i, r in enumerate(rows)])


def load_sst2(**_: Any) -> datasets.DatasetDict:
    """SST-2 dev (header ``sentence, label``) → ``validation``."""
    rows = _tsv(FILES["sst2"][0], header=True)
    return _splits(validation=[{"sentence": r["sentence"], "label": int(r["label"]), "idx": i}
                               for i, r in enumerate(rows)])


def load_mrpc(**_: Any) -> datasets.DatasetDict:
    """MRPC dev (``Quality`` = 1 for paraphrases) → ``validation``."""
    rows = _tsv(FILES["mrpc"][0], header=True)
    return _splits(validation=[{"sentence1": r["#1 String"], "sentence2": r["#2 String"],
                                "label": int(r["Quality"]), "idx": i} for i, r in enumerate(rows)])


_ENTAILMENT = {"entailment": 0, "not_entailment": 1}  # GLUE's class order for QNLI / RTE


def load_qnli(**_: Any) -> datasets.DatasetDict:
    """QNLI dev (label ``entailment`` → 0, ``not_entailment`` → 1) → ``validation``."""
    rows = _tsv(FILES["qnli"][0], header=True)
    return _splits(validation=[{"question": r["question"], "sentence": r["sentence"],
                                "label": _ENTAILMENT[r["label"]], "idx": int(r["index"])} for r in rows])


def load_rte(**_: Any) -> datasets.DatasetDict:
    """AlphaEdit's RTE subset (already GLUE fields, 0 = entailment) → ``validation``."""
    rows = _json(FILES["rte"][0])
    return _splits(validation=[{k: r[k] for k in ("sentence1", "sentence2", "label", "idx")} for r in rows])


def load_nli(**_: Any) -> datasets.DatasetDict:
    """AlphaEdit's two-way NLI set (label names mapped as in GLUE RTE: 0 = entailment) → ``validation``."""
    rows = _json(FILES["nli"][0])
    return _splits(validation=[{"sentence1": r["sentence1"], "sentence2": r["sentence2"],
                                "label": _ENTAILMENT[r["label"]], "idx": int(r["index"])} for r in rows])


# ---------------------------------------------------------------- MMLU (HF ``cais/mmlu`` fields)


def _mmlu_rows(relative: str, subject: str) -> list[dict[str, Any]]:
    with _path(relative).open(encoding="utf-8", newline="") as f:
        return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(key)}
                for q, a, b, c, d, key in csv.reader(f)]


def load_mmlu(subject: str, **_: Any) -> datasets.DatasetDict:
    """One subject's hendrycks CSVs (question, A, B, C, D, answer letter) → ``test`` and ``dev`` (few-shot)."""
    if subject not in MMLU_SUBJECTS:
        raise ValueError(f"unknown MMLU subject {subject!r}")
    test, dev = _mmlu_files(subject)
    return _splits(test=_mmlu_rows(test, subject), dev=_mmlu_rows(dev, subject))


# ---------------------------------------------------------------- the other paper6 tasks


def load_commonsense_qa(**_: Any) -> datasets.DatasetDict:
    """CommonsenseQA validation, already in the HF ``tau/commonsense_qa`` layout → ``validation``."""
    return _splits(validation=_jsonl(FILES["commonsense_qa"][0]))


def load_arc_challenge(**_: Any) -> datasets.DatasetDict:
    """ARC-Challenge test from llm-foundry's ``{query: "Question: q", choices, gold}`` → HF ``ai2_arc`` fields.

    The original answer labels are not in the file, so they are rebuilt as A, B, C, ...; the prompt and the
    target index do not depend on them.
    """
    docs = []
    for i, r in enumerate(_jsonl(FILES["arc_challenge"][0])):
        prefix = "Question: "
        if not r["query"].startswith(prefix):
            raise ValueError(f"ARC record {i}: query does not start with {prefix!r}")
        labels = [chr(ord("A") + k) for k in range(len(r["choices"]))]
        docs.append({"id": str(i), "question": r["query"][len(prefix):],
                     "choices": {"text": list(r["choices"]), "label": labels}, "answerKey": labels[r["gold"]]})
    return _splits(test=docs)


def load_lambada_openai(**_: Any) -> datasets.DatasetDict:
    """LAMBADA (OpenAI) test from ``{context, continuation}`` → the original ``{text}`` (joined by one space)."""
    rows = _jsonl(FILES["lambada_openai"][0])
    return _splits(test=[{"text": f"{r['context']} {r['continuation']}"} for r in rows])


def load_sciq(**_: Any) -> datasets.DatasetDict:
    """SciQ test in the HF ``allenai/sciq`` layout (question, distractor1-3, correct_answer, support) → ``test``."""
    return _splits(test=_jsonl(FILES["sciq"][0]))


# ---------------------------------------------------------------- WSC273


def _squash(text: str | None) -> str:
    return " ".join((text or "").split())


def _wsc_doc(schema: ET.Element) -> dict[str, Any]:
    """One ``<schema>`` as the HF ``winograd_wsc`` builder lays it out (whitespace collapsed per part)."""
    parts = schema.find("text")
    left, pronoun, right = (_squash(parts.findtext(tag)) for tag in ("txt1", "pron", "txt2"))
    return {
        "text": " ".join([left, pronoun, right]).strip(),
        "pronoun": pronoun,
        "pronoun_loc": len(left) + 1 if left else 0,
        "options": [_squash(a.text) for a in schema.find("answers").findall("answer")],
        "label": int("B" in _squash(schema.findtext("correctAnswer"))),
        "source": _squash(schema.findtext("source")),
    }


def load_wsc273(**_: Any) -> datasets.DatasetDict:
    """The first 273 schemas of the Davis ``WSCollection.xml`` (the source of HF ``winograd_wsc``) → ``test``."""
    root = ET.parse(_path(FILES["wsc273"][0])).getroot()
    return _splits(test=[_wsc_doc(schema) for schema in root.findall("schema")[:273]])


_CAPITALISED = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")
_POSSESSIVE = ("my", "his", "her", "our", "their")


def _wsc_option(doc: dict[str, Any], option: str) -> str:
    """An answer made to stand in for the pronoun: ``'s`` after a possessive pronoun, and a capitalised
    leading determiner / pronoun lowercased unless the pronoun starts a sentence (lm-eval's rule, including
    its use of ``str.replace`` on the whole option)."""
    if doc["pronoun"].lower() in _POSSESSIVE:
        option += "'s"
    first = option.split()[0]
    starts_sentence = doc["text"][doc["pronoun_loc"] - 2] == "."
    return option if starts_sentence or first not in _CAPITALISED else option.replace(first, first.lower())


def process_wsc273(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's ``wsc273`` document preparation: single spaces in the text, options normalised."""

    def prepare(doc: dict[str, Any]) -> dict[str, Any]:
        doc["text"] = doc["text"].replace("  ", " ")
        doc["options"] = [_wsc_option(doc, option) for option in doc["options"]]
        return doc

    return dataset.map(prepare)
