"""Post-Squeeze options: the one validator of the threshold, the candidate ranks and how to compress.

The API (:func:`~lora_monitor.post_squeeze.analyze_adapter`, :func:`~lora_monitor.post_squeeze.compress_adapter`),
the ``lora-monitor squeeze`` command, its TOML ``[squeeze]`` table and ``PostSqueezeCallback`` all build a
:class:`SqueezeOptions`, so that one bad value gets the same message wherever it came from.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._deprecation import renamed_keywords
from ..errors import LoraMonitorError, check_number, check_path

DEFAULT_THRESHOLD = 0.95
# The rank by function's default rule: the smallest rank that keeps this share of what the directions beyond
# the first bring to held-out loss, (loss(1) - loss(k)) / (loss(1) - loss(full)) (the energy criterion's
# analogue, measured in held-out loss instead of ||ΔW||²). From bench/EVIDENCE.md ("The rank by function: the
# rules side by side"), chosen on the same 12 tuned sources it reports (MiniLM and SmolLM2 generation, α = r
# and α = 16, 3 seeds): within 2x of the knee on 9 of them (every generation one), where a fixed 1% of the
# loss (the rule before) was within 2x on 4 and never on generation.
DEFAULT_LOSS_RETENTION = 0.95


def validate_threshold(threshold: Any, name: str = "min_variance_retention") -> float:
    """``threshold`` as a float if it is a fraction in (0, 1], else a :class:`LoraMonitorError` naming ``name``."""
    return float(check_number(threshold, name, low=0, high=1, low_open=True, hint="0.95 = keep 95%"))


def validate_tolerance(tolerance: Any, name: str = "tolerance") -> float | None:
    """``tolerance`` (the relative held-out loss increase a rank may cost, for the rank by function) as a float
    if it is a number >= 0; None (the default: no tolerance, the loss-retention rule decides) stays None; else
    a :class:`LoraMonitorError` naming ``name``."""
    if tolerance is None:
        return None
    return float(check_number(tolerance, name, low=0.0, hint="0.01 = allow 1% more held-out loss"))


def validate_rank(rank: Any, what: str = "target_rank") -> int:
    """``rank`` as an int if it is a whole number >= 1, else a :class:`LoraMonitorError` naming ``what``."""
    return int(check_number(rank, what, low=1, whole=True))


def validate_ranks(
    ranks: Iterable[Any] | None, what: str = "candidate_ranks", prefix: str = ""
) -> tuple[int, ...] | None:
    """Candidate ranks for the table, sorted and without repeats; None (the default ranks) stays None.

    ``prefix`` (``"file: [squeeze] "``) starts every message."""
    if ranks is None:
        return None
    if isinstance(ranks, str | bytes) or not isinstance(ranks, Iterable):
        raise LoraMonitorError(f"{prefix}{what} must be a list of ranks, got {ranks!r}")
    checked = sorted({validate_rank(rank, f"{prefix}every rank of {what}") for rank in ranks})
    if not checked:
        raise LoraMonitorError(
            f"{prefix}{what} is empty: give at least one rank, or leave it out for the default"
        )
    return tuple(checked)


def check_ranks_within(ranks: Iterable[int], source_rank: int, what: str, where: str = "") -> None:
    """A :class:`LoraMonitorError` when a rank of ``ranks`` is above ``source_rank``, the adapter's own (its
    largest module rank): a squeeze keeps or lowers a rank, so such a rank would only be an unchanged copy
    (and, as a candidate, look like a recommendation). ``where`` (the adapter) starts the message."""
    above = sorted(rank for rank in ranks if rank > source_rank)
    if above:
        prefix = f"{where}: " if where else ""
        shown = above[0] if len(above) == 1 else above
        raise LoraMonitorError(
            f"{prefix}{what} {shown} is above the adapter's rank {source_rank}: a squeeze keeps or lowers "
            f"a rank, give ranks up to {source_rank}"
        )


def default_candidate_ranks(source_rank: int) -> list[int]:
    """Powers of two up to ``source_rank``, and ``source_rank`` itself (1, 2, 4, ..., 64, 96 for r=96)."""
    ranks = [2**i for i in range(source_rank.bit_length()) if 2**i <= source_rank]
    return sorted({*ranks, source_rank})


@dataclass(frozen=True)
class SqueezeOptions:
    """What to analyse and how to compress, checked once when built.

    - ``min_variance_retention``: the fraction of each ``‖ΔW‖²_F`` to keep, in (0, 1];
    - ``candidate_ranks``: the candidate ranks of the table (None: powers of two up to the adapter's rank);
    - ``target_rank``: compress every module to this rank (None: the recommended rank);
    - ``per_module``: compress each module to its own smallest rank reaching the threshold.

    ``where`` prefixes every message (a TOML file and table, or a callback's name).
    """

    min_variance_retention: float = DEFAULT_THRESHOLD
    candidate_ranks: tuple[int, ...] | None = None
    target_rank: int | None = None
    per_module: bool = False
    where: str = ""

    def __post_init__(self) -> None:
        prefix = f"{self.where}: " if self.where else ""
        threshold = validate_threshold(self.min_variance_retention, f"{prefix}min_variance_retention")
        object.__setattr__(self, "min_variance_retention", threshold)
        object.__setattr__(
            self, "candidate_ranks", validate_ranks(self.candidate_ranks, "candidate_ranks", prefix)
        )
        if self.target_rank is not None:
            object.__setattr__(self, "target_rank", validate_rank(self.target_rank, f"{prefix}target_rank"))
        if not isinstance(self.per_module, bool):
            raise LoraMonitorError(f"{prefix}per_module must be true or false, got {self.per_module!r}")
        if self.per_module and self.target_rank is not None:
            raise LoraMonitorError(
                f"{prefix}give either target_rank (one rank for all) or per_module (a rank per module), "
                "not both"
            )

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], where: str) -> SqueezeOptions:
        """Options from a TOML/JSON table: ``min_variance_retention``, ``candidate_ranks`` (``[]`` or absent: the
        default ranks, as TOML has no None), ``compress_to`` (0 or absent: the recommended rank) and
        ``per_module``; other keys are the caller's."""
        compress_to = table.get("compress_to", 0)
        if compress_to == 0 and not isinstance(compress_to, bool):
            compress_to = None
        candidate_ranks = table.get("candidate_ranks")
        if "target_ranks" in table:  # the old key: one release with a warning
            if "candidate_ranks" in table:
                raise LoraMonitorError(
                    f"{where}: give candidate_ranks (the new name of target_ranks), not both"
                )
            warnings.warn(
                f"{where}: target_ranks is deprecated and will be removed in the next release: use candidate_ranks",
                DeprecationWarning,
                stacklevel=2,
            )
            candidate_ranks = table["target_ranks"]
        if isinstance(candidate_ranks, list) and not candidate_ranks:
            candidate_ranks = None
        return cls(
            min_variance_retention=table.get("min_variance_retention", DEFAULT_THRESHOLD),
            candidate_ranks=candidate_ranks,
            target_rank=None if compress_to is None else validate_rank(compress_to, f"{where}: compress_to"),
            per_module=table.get("per_module", False),
            where=where,
        )


# The old keyword of the constructor, for a release.
SqueezeOptions.__init__ = renamed_keywords(target_ranks="candidate_ranks")(SqueezeOptions.__init__)  # type: ignore[method-assign]


# The keys a [squeeze] table of a TOML file may hold (``lora-monitor squeeze squeeze.toml``).
TOML_KEYS = (
    "adapter_path",
    "min_variance_retention",
    "source_rank",
    "candidate_ranks",
    "target_ranks",  # the old name of candidate_ranks, deprecated
    "output_path",
    "compress_to",
    "per_module",
    "device",
)


def read_squeeze_toml(path: str | Path) -> dict[str, Any]:
    """The [squeeze] table of a TOML file, checked key by key; paths stay relative to the current folder.

    The numbers and choices (threshold, ranks, compress_to, per_module) are checked by :class:`SqueezeOptions`
    when the caller builds its options (:meth:`SqueezeOptions.from_mapping`); here only the keys, the types of
    the paths and ``source_rank``, which falls back to ``[model].lora_rank``.
    """
    path = Path(path)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as error:
            raise LoraMonitorError(f"{path}: reading TOML needs Python 3.11+ or the tomli package") from error
    check_path(path, "TOML file", folder=False)
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise LoraMonitorError(f"{path}: not valid TOML ({error})") from error
    table = document.get("squeeze")
    if not isinstance(table, dict):
        raise LoraMonitorError(f"{path}: has no [squeeze] table")
    unknown = sorted(set(table) - set(TOML_KEYS))
    if unknown:
        raise LoraMonitorError(f"{path}: unknown key(s) {unknown} in [squeeze]; known: {list(TOML_KEYS)}")
    for key in ("adapter_path", "output_path", "device"):
        if key in table and not isinstance(table[key], str):
            raise LoraMonitorError(f"{path}: [squeeze] {key} = {table[key]!r} must be a string")
    if not table.get("adapter_path"):
        raise LoraMonitorError(f"{path}: [squeeze] needs adapter_path")
    settings = dict(table)
    if not settings.get("source_rank"):
        # the seed's fallback: [model].lora_rank names the rank the adapter was trained at
        settings["source_rank"] = (document.get("model") or {}).get("lora_rank", 0)
    source_rank = settings["source_rank"]
    if source_rank != 0 or isinstance(source_rank, bool):
        validate_rank(source_rank, f"{path}: [squeeze] source_rank")
    return settings


def checked_eval_batches(eval_batches: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``eval_batches`` as a list, if it is a non-empty iterable of dicts (model inputs with labels)."""
    if isinstance(eval_batches, str | bytes | Mapping) or not isinstance(eval_batches, Iterable):
        raise LoraMonitorError(
            f"PostSqueezeCallback: eval_batches must be a list of batches (dicts of model inputs with labels), "
            f"got {type(eval_batches).__name__}"
        )
    batches = list(eval_batches)
    if not batches:
        raise LoraMonitorError(
            "PostSqueezeCallback: eval_batches is empty: give at least one batch, or leave it out to use "
            "the Trainer's eval_dataset"
        )
    wrong = next((batch for batch in batches if not isinstance(batch, Mapping)), None)
    if wrong is not None:
        raise LoraMonitorError(
            "PostSqueezeCallback: every batch of eval_batches must be a dict of model inputs with labels, "
            f"got a {type(wrong).__name__}"
        )
    unlabelled = next((index for index, batch in enumerate(batches) if batch.get("labels") is None), None)
    if unlabelled is not None:
        raise LoraMonitorError(
            f"PostSqueezeCallback: batch {unlabelled} of eval_batches has no labels; the rank by function "
            "measures held-out loss, so every batch needs them (input_ids, attention_mask, labels)"
        )
    return batches
