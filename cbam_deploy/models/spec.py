"""What a model option may be: a zoo name with one of its stems or an existing 'file.py:factory', an
input side the network can take, a classifier size."""

from __future__ import annotations

from pathlib import Path

from ..checks import MAX_INPUT_SIZE, MAX_NUM_CLASSES, MIN_INPUT_SIZE, check_choice, check_int, is_int
from ..errors import CbamDeployError
from .custom import is_factory_spec
from .libraries import source_for
from .registry import get_entry

STRIDE = {"imagenet": 32, "cifar": 8}  # the network's total stride with each stem
STEMS = tuple(STRIDE)


def check_model_spec(spec: str, stem: str = "imagenet") -> None:
    """A zoo name (with a stem it has) or an existing 'file.py:factory'."""
    check_choice("--stem", stem, STEMS)
    source = source_for(spec)
    if source is not None:
        source.check(spec, stem)
        return
    if is_factory_spec(spec):
        path = Path(spec.rpartition(":")[0])
        if not path.is_file():
            raise CbamDeployError(f"model file {path} does not exist")
        return
    entry = get_entry(spec)
    if stem not in entry.stems:
        raise CbamDeployError(f"model {spec!r} has no {stem!r} stem; choose one of {', '.join(entry.stems)}")


def min_input_size(spec: str | None, stem: str = "imagenet") -> int:
    """The network's total stride for zoo models; 8 for a user's factory (we cannot know it)."""
    if spec is None or is_factory_spec(spec):
        return MIN_INPUT_SIZE
    return max(MIN_INPUT_SIZE, STRIDE.get(stem, MIN_INPUT_SIZE))


def check_input_size(value, spec: str | None = None, stem: str = "imagenet", option: str = "--input-size") -> None:
    low = min_input_size(spec, stem)
    if value is None:
        return
    if not is_int(value) or not low <= value <= MAX_INPUT_SIZE:
        why = f" (the network's stride with the {stem} stem)" if low > MIN_INPUT_SIZE else ""
        raise CbamDeployError(f"{option} must be an integer from {low}{why} to {MAX_INPUT_SIZE}, got {value!r}")


def check_num_classes(value, option: str = "--num-classes") -> None:
    check_int(option, value, 1, MAX_NUM_CLASSES, allow_none=True)
