"""Calibration data for spectral editing: texts or tokenized rows made into padded batches, and their loss."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .._io import json_lines
from ..errors import LoraMonitorError, check_path
from .options import check_batching

# What a data file may hold, said in every message about one that holds something else.
TEXT_SHAPES = (
    'a .txt file (one text per non-empty line), a .jsonl file (one JSON string or {"text": ...} object per '
    'line) or a .json file (a list of strings or of {"text": ...} objects)'
)


def _json_shape(value: Any) -> str:
    """What a JSON value is, in words (``an object with keys ['text']``, ``a string``...)."""
    if isinstance(value, dict):
        keys = list(value)
        shown = f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"
        return f"an object with keys {shown}" if keys else "an empty object"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return "null"


def _text_of(item: Any, file: Any, where: str) -> str:
    """The text of one entry: a string, or an object's ``"text"`` string; else an error naming the entry."""
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    if isinstance(item, str):
        return item
    found = _json_shape(item)
    if isinstance(item, dict) and "text" in item:
        found = f'an object whose "text" is {_json_shape(item["text"])}'
    raise LoraMonitorError(f"{file}: {where} is {found}, not a text; expected {TEXT_SHAPES}")


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts from a .txt (one per non-empty line), .jsonl (one JSON string or object with "text" per line)
    or .json file (a list of strings or objects with "text").

    Anything else is a :class:`LoraMonitorError` naming the file and the shape found: a .json holding an
    object or a string (whose keys or characters would otherwise be read as texts), an entry that is not a
    text, a file with no text."""
    file = check_path(path, "data file", folder=False)
    try:
        raw = file.read_text()
        suffix = file.suffix.lower()  # data.JSON is JSON too, not lines of JSON text
        if suffix == ".jsonl":
            texts = [_text_of(item, file, f"line {number}") for number, item in json_lines(raw, file)]
        elif suffix == ".json":
            document = json.loads(raw)
            if not isinstance(document, list):
                raise LoraMonitorError(
                    f"{file}: holds {_json_shape(document)}, not a list of texts; expected {TEXT_SHAPES}"
                )
            texts = [_text_of(item, file, f"entry {index}") for index, item in enumerate(document)]
        else:
            texts = [line for line in raw.splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoraMonitorError(f"{file}: cannot be read as texts ({error})") from error
    if not texts:
        raise LoraMonitorError(f"{file}: holds no texts; expected {TEXT_SHAPES}")
    return texts


def load_tokenizer(folder: str | os.PathLike, hint: str = "") -> Any:
    """The tokenizer saved in ``folder``, with the end-of-text token as padding where it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        hint = f"; {hint}" if hint else ""
        reason = " ".join(str(error).split())  # transformers' message spans lines: the error is one line
        raise LoraMonitorError(f"{folder}: no usable tokenizer here ({reason}){hint}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def calibration_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 2,
    max_length: int = 256,
    max_samples: int | None = 32,
    text_field: str = "text",
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``input_ids``/``attention_mask``/``labels`` from texts, a ``datasets.Dataset`` or batches.

    ``data`` may be a list of strings (tokenized with ``tokenizer``), a ``datasets.Dataset`` with a
    ``text_field`` column (tokenized) or already tokenized ``input_ids``, or a list of ready batches
    (dicts of tensors). Padding positions get label ``-100``.
    """
    check_batching(batch_size, max_length, max_samples)
    ready = isinstance(data, Sequence) and data and isinstance(data[0], dict)
    if ready and isinstance(data[0].get("input_ids"), torch.Tensor) and data[0]["input_ids"].dim() == 2:
        return list(data)  # already batches: used as given
    columns = getattr(data, "column_names", None)
    if columns is not None and text_field not in columns and "input_ids" in columns:
        rows = list(data.select(range(min(len(data), max_samples or len(data)))))
        ids = [row["input_ids"] for row in rows]
        return _pad_batches(ids, batch_size, getattr(tokenizer, "pad_token_id", 0) or 0)
    texts = list(data[text_field]) if columns is not None else list(data)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise LoraMonitorError(
            "calibration data must be texts, a Dataset with a text column, or tokenized batches"
        )
    if tokenizer is None:
        raise LoraMonitorError("calibration texts need a tokenizer to turn them into tokens")
    if tokenizer.pad_token is None:
        raise LoraMonitorError(
            "the tokenizer has no pad token, so texts cannot be batched; set one first "
            "(tokenizer.pad_token = tokenizer.eos_token is the usual choice for causal LMs)"
        )
    texts = texts[: max_samples or None]
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        labels = encoded["input_ids"].clone()
        labels[encoded["attention_mask"] == 0] = -100
        batches.append(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
        )
    return batches


def _pad_batches(ids: list[list[int]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of token lists, with ``-100`` labels on the padding."""
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(row) for row in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, tokens in enumerate(chunk):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


# The label the Hugging Face losses ignore (padding, prompts).
IGNORED_LABEL = -100


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a PEFT model, or wrapped) is a causal LM, whose loss scores the label at position
    ``t + 1`` from position ``t``: the first label of every row is never scored."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..adapters import unwrap_model

    model = unwrap_model(model)
    get_base_model = getattr(model, "get_base_model", None)
    name = type(get_base_model() if callable(get_base_model) else model).__name__
    return name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith(("ForCausalLM", "LMHeadModel"))


def scored_tokens(batch: dict[str, Any], causal: bool) -> int:
    """How many labels of ``batch`` the model's loss averages over: every label but ``-100`` (a classifier's
    rows, a sequence's real tokens), less the first position of each row for a causal LM (``causal``). A
    text of one token scores nothing in a causal LM: there is no token after it to predict.
    A batch without ``labels`` scores nothing."""
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        return 0
    if labels.is_floating_point():  # regression targets: every row counts
        return int(labels.shape[0]) if labels.dim() else 1
    counted = labels != IGNORED_LABEL
    if causal and labels.dim() >= 2:
        counted = counted[..., 1:]
    return int(counted.sum())


def scored_rows(batch: dict[str, Any], causal: bool) -> int:
    """How many rows of ``batch`` have at least one scored label (see :func:`scored_tokens`)."""
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        return 0
    if labels.is_floating_point() or labels.dim() < 2:
        return scored_tokens(batch, causal)
    counted = labels != IGNORED_LABEL
    if causal:
        counted = counted[..., 1:]
    return int(counted.flatten(1).any(dim=1).sum())


def check_scored(batches: Sequence[dict[str, Any]], causal: bool, what: str) -> list[int]:
    """The scored tokens of each batch (:func:`scored_tokens`); a :class:`LoraMonitorError` naming ``what``
    when a batch has no labels, or no batch scores any token: every label is -100, or (causal LM) every
    text is a single token. A loss averaged over no token is NaN, and no advice or edit may come from it."""
    for index, batch in enumerate(batches):
        if not isinstance(batch.get("labels"), torch.Tensor):
            raise LoraMonitorError(
                f"{what}: batch {index} has no labels; every batch needs them (input_ids, attention_mask, "
                "labels), or the model has no loss to measure"
            )
    counts = [scored_tokens(batch, causal) for batch in batches]
    if not any(counts):
        single = " or every text is a single token (a causal LM predicts each token from the ones before)"
        raise LoraMonitorError(
            f"{what}: no token is scored in {len(counts)} batch(es): every label is -100"
            f"{single if causal else ''}; give texts with labels to predict"
        )
    return counts


def finite_loss(loss: torch.Tensor | float, what: str, index: int) -> float:
    """``loss`` as a float when it is finite, else a :class:`LoraMonitorError` naming ``what`` and the batch."""
    value = float(loss)
    if not math.isfinite(value):
        raise LoraMonitorError(
            f"{what}: the loss of batch {index} is {value} (diverged weights, or labels outside the "
            "vocabulary?); nothing is computed from it"
        )
    return value


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch with every tensor moved to ``device``."""
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], what: str = "evaluation data"
) -> float:
    """Mean language-model loss of ``model`` over ``batches`` (eval mode, no dropout): the mean of the
    batches' losses, over the batches with a scored token (a batch of one-token texts scores none).

    A :class:`LoraMonitorError` naming ``what`` when no token is scored or a loss is NaN or Inf."""
    batches = list(batches)
    counts = check_scored(batches, is_causal_lm(model), what)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        losses = [
            finite_loss(model(**to_device(batch, device)).loss, what, index)
            for index, (batch, count) in enumerate(zip(batches, counts, strict=True))
            if count
        ]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)
