"""Tasks and their transformers Auto classes, read from transformers' own ``MODEL_FOR_*_MAPPING_NAMES``.

One table used wherever a model class, a task and an Auto class meet: the CLI's ``--task-type``, the
loading snippet of model cards, and the compact classes registered with the Auto classes.
"""

from __future__ import annotations

#: task (CLI ``--task-type``) -> (Auto class, the transformers mapping of model types to its model classes)
TASKS: dict[str, tuple[str, str]] = {
    "sequence-classification": ("AutoModelForSequenceClassification",
                                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "token-classification": ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "question-answering": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
}
#: the bare model (no head)
BASE = ("AutoModel", "MODEL_MAPPING_NAMES")
#: tasks that have a loss on plain text or labelled rows, so data-driven importance can score them
SCORABLE_TASKS = ("sequence-classification", "causal-lm", "seq2seq", "masked-lm")


def model_classes(task: str | None) -> dict[str, str]:
    """``model_type -> model class name`` for a task (``None``: the bare models)."""
    from transformers.models.auto import modeling_auto  # here: the command line's parser reads TASKS alone

    names = TASKS[task][1] if task is not None else BASE[1]
    return {k: v for k, v in getattr(modeling_auto, names).items() if isinstance(v, str)}


def auto_class_name(task: str | None) -> str:
    """The Auto class of a task (``None``: ``AutoModel``)."""
    return TASKS[task][0] if task is not None else BASE[0]


#: model classes of plugins registered with an Auto class (transformers lists no such registrations): name -> task
_REGISTERED_CLASSES: dict[str, str | None] = {}


def register_task_class(class_name: str, task: str | None) -> None:
    """Record that the Auto class of ``task`` (``None``: ``AutoModel``) loads ``class_name``, a model class that a
    plugin registered with it (e.g. ``MultiExitForSequenceClassification``)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    _REGISTERED_CLASSES[class_name] = task


def task_of_class(class_name: str) -> tuple[str | None, str] | None:
    """``(task, Auto class)`` of a transformers model class name such as ``BertForSequenceClassification``
    (compact ``Compressed...`` classes and the per-family ``MultiExit...`` classes of earlier multi-exit folders
    count as their base class; classes of :func:`register_task_class` as registered); ``None`` when no Auto class
    loads it."""
    if class_name in _REGISTERED_CLASSES:
        task = _REGISTERED_CLASSES[class_name]
        return task, auto_class_name(task)
    name = class_name.removeprefix("MultiExit").removeprefix("Compressed")
    for task in TASKS:
        if name in model_classes(task).values():
            return task, auto_class_name(task)
    if name in model_classes(None).values():
        return None, auto_class_name(None)
    return None
