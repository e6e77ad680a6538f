"""Small helpers around Hugging Face transformers shared by the model code.

Every load from a model directory goes through this module, and it enforces two rules:

- **No code from a model directory ever runs.** ``from_pretrained`` pins ``trust_remote_code=False``
  and ``local_files_only=True``, and ``check_model_dir`` refuses a directory that asks for custom
  code (an ``auto_map`` in any of its ``*config*.json`` files) or names a ``model_type`` or an
  architecture that transformers does not ship, before transformers reads anything.
- **A damaged directory gives one line.** Missing or unreadable config, weights or tokenizer, and
  weights whose shapes disagree with config.json, all become a ``PrefnoiseError`` naming the
  directory and the problem (the CLI prints it as ``Error: ...`` and exits 2), never a traceback.

Use::

    config = from_pretrained(AutoConfig, path, what="--model")
    tokenizer = from_pretrained(AutoTokenizer, path, what="--model")
    model = from_pretrained(AutoModelForCausalLM, path, what="--model", config=config, dtype=torch.float32)
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefnoise.errors import PrefnoiseError
from prefnoise.resources import check_fits_in_memory

CONFIG_FILE = "config.json"
CUSTOM_CODE_KEY = "auto_map"
# Files that hold a vocabulary or describe a tokenizer; a directory with none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
RESTORE_HINT = "restore it from the original model or save the model again"
_MAX_CAUSE = 300  # characters of a cause's first line kept in a message


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (e.g. "Writing model shards") for the block."""
    from transformers.utils import logging as hf_logging  # transformers is heavy: loaded only when a model is read

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of ``error``, cut to a few hundred characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= _MAX_CAUSE else text[: _MAX_CAUSE - 3] + "..."


def _read_json_object(path: Path, name: str, what: str, directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PrefnoiseError(
            f"{what} {directory}: {name} is not readable JSON ({first_line(error)}); {RESTORE_HINT}"
        ) from None
    if not isinstance(data, dict):
        raise PrefnoiseError(f"{what} {directory}: {name} is not a JSON object; {RESTORE_HINT}")
    return data


TRANSFORMERS_CONFIGS = frozenset(
    {"config.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
     "processor_config.json", "feature_extractor_config.json", "image_processor_config.json"}
)


def _config_jsons(path: Path) -> list[str]:
    """The small JSON config files transformers may read: config.json, tokenizer_config.json, ..."""
    return sorted(p.name for p in path.glob("*config*.json") if p.is_file())


def _known_model_types() -> set[str]:
    # transformers is heavy: loaded only when a model is read
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


@functools.lru_cache(maxsize=1)
def _transformers_names() -> frozenset[str]:
    """Every name transformers exports (its lazy module lists them without importing them)."""
    import transformers  # transformers is heavy: loaded only when a model is read

    return frozenset(dir(transformers))


def _is_builtin_class(name: str) -> bool:
    return isinstance(name, str) and name in _transformers_names()


def check_model_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path once it is a local model directory prefnoise may load; else PrefnoiseError.

    Checks, without importing anything from the directory: it exists and holds a config.json that
    is a JSON object; no ``*config*.json`` file (config, tokenizer, generation, preprocessor ...)
    has an ``auto_map`` (custom code); ``model_type`` and ``architectures`` name classes built into
    transformers. ``what`` says where the path came from (e.g. ``--model``) for the message.
    """
    path = Path(path)
    if not path.exists():
        raise PrefnoiseError(
            f"{what} {path}: does not exist; give a directory written by save_pretrained "
            "(config.json, weights, tokenizer)"
        )
    if not path.is_dir():
        raise PrefnoiseError(f"{what} {path}: not a directory; give a directory written by save_pretrained")
    if not (path / CONFIG_FILE).is_file():
        raise PrefnoiseError(
            f"{what} {path}: not a local Hugging Face model directory (no config.json); "
            "pass a directory written by save_pretrained"
        )
    configs = {}
    for name in _config_jsons(path):
        if name in TRANSFORMERS_CONFIGS:  # files transformers reads: they must be JSON objects
            configs[name] = _read_json_object(path, name, what, path)
            continue
        try:  # other *config*.json files (e.g. sentence-transformers' data_config.json, a list) are only scanned
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, dict):
            configs[name] = data
    for name, data in configs.items():
        if CUSTOM_CODE_KEY in data:
            raise PrefnoiseError(
                f"{what} {path} contains custom code ({CUSTOM_CODE_KEY} in {name}); prefnoise does not run "
                "model code: use a model whose architecture is built into transformers"
            )
    config = configs[CONFIG_FILE]
    model_type = config.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or model_type not in _known_model_types()):
        from transformers import __version__  # transformers is heavy: loaded only when a model is read

        raise PrefnoiseError(
            f"{what} {path}: config.json has model_type {model_type!r}, which transformers {__version__} "
            "does not ship; prefnoise does not run model code: use a built-in architecture "
            "(or a newer transformers)"
        )
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise PrefnoiseError(f"{what} {path}: config.json has architectures {architectures!r}, not a list")
    unknown = [a for a in architectures if not _is_builtin_class(a)]
    if unknown:
        raise PrefnoiseError(
            f"{what} {path}: config.json names architecture {unknown[0]!r}, which is not built into "
            "transformers; prefnoise does not run model code: use a built-in architecture"
        )
    return path


def _kind(cls: Any) -> str:
    """"config", "tokenizer" or "model": what ``cls.from_pretrained`` loads. The model classes are imported
    last: transformers' modeling_utils takes ~1.5 s to import, which a tokenizer or config alone never needs."""
    # transformers is heavy: loaded only when a model is read
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

    if cls is AutoConfig or (isinstance(cls, type) and issubclass(cls, PretrainedConfig)):
        return "config"
    if cls is AutoTokenizer or (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase)):
        return "tokenizer"
    from transformers import PreTrainedModel  # the heavy import: only for a model class
    from transformers.models.auto.auto_factory import _BaseAutoModelClass  # light once the line above ran

    if isinstance(cls, type) and issubclass(cls, (_BaseAutoModelClass, PreTrainedModel)):
        return "model"
    raise TypeError(f"prefnoise.hf.from_pretrained cannot load {cls!r}")


def _safetensors_files(path: Path, what: str) -> list[str]:
    """The safetensors weight files of ``path`` (one file or the shards of an index); [] when none."""
    if (path / SAFETENSORS_INDEX).is_file():
        index = _read_json_object(path, SAFETENSORS_INDEX, what, path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PrefnoiseError(f"{what} {path}: {SAFETENSORS_INDEX} has no weight_map; {RESTORE_HINT}")
        return sorted({str(name) for name in weight_map.values()})
    return [SAFETENSORS_WEIGHTS] if (path / SAFETENSORS_WEIGHTS).is_file() else []


def safetensors_shapes(file: Path, what: str, directory: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the header of safetensors ``file``; PrefnoiseError when unreadable.

    safetensors checks that the header is complete and covers the whole file, so a truncated or
    overwritten file fails here, before any weight is read.
    """
    from safetensors import safe_open  # safetensors pulls torch: loaded only when weights are read

    if not file.is_file():
        raise PrefnoiseError(f"{what} {directory}: weights file {file.name} is missing; {RESTORE_HINT}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise PrefnoiseError(
            f"{what} {directory}: weights file {file.name} is damaged or truncated ({first_line(error)}); "
            + RESTORE_HINT
        ) from None


def read_safetensors(file: str | Path, what: str) -> dict[str, Any]:
    """The tensors of safetensors ``file`` (on CPU); PrefnoiseError naming it when missing or damaged."""
    from safetensors.torch import load_file  # safetensors pulls torch: loaded only when weights are read

    file = Path(file)
    safetensors_shapes(file, what, file.parent)  # the header first: a clear message for a bad file
    try:
        return load_file(str(file))
    except Exception as error:
        raise PrefnoiseError(
            f"{what} {file.parent}: weights file {file.name} is damaged ({first_line(error)}); "
            "restore it or train the model again"
        ) from None


def check_weights(cls: Any, path: str | Path, what: str, config: Any) -> bool:
    """Check the weight files before loading; True when they are safetensors.

    Missing weights, unreadable safetensors headers, and tensors whose shapes differ from the model
    ``config`` describes (built on the meta device: no memory, no weights) raise PrefnoiseError.
    ``cls`` is the model class about to load (e.g. AutoModelForCausalLM); ``config`` its config.
    """
    path = Path(path)
    files = _safetensors_files(path, what)
    if not files:
        if any((path / name).is_file() for name in TORCH_WEIGHTS):
            return False  # transformers reads these with torch.load(weights_only=True)
        raise PrefnoiseError(
            f"{what} {path}: no model weights ({SAFETENSORS_WEIGHTS} or {TORCH_WEIGHTS[0]}); "
            "give a directory written by save_pretrained"
        )
    shapes: dict[str, list[int]] = {}
    for name in files:
        shapes.update(safetensors_shapes(path / name, what, path))
    if config is None or getattr(config, "quantization_config", None) is not None:
        return True  # quantized checkpoints store packed shapes
    import torch  # torch is heavy: loaded only when a model runs

    try:
        with quiet_transformers(), torch.device("meta"):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except Exception:  # the real load below reports what is wrong with the config
        return True
    expected = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for key, shape in shapes.items():
        candidates = [key]
        if prefix:
            candidates += [key.removeprefix(prefix + "."), f"{prefix}.{key}"]
        match = next((c for c in candidates if c in expected), None)
        if match is not None and expected[match] != shape:
            raise PrefnoiseError(
                f"{what} {path}: weights do not match config.json ({key} is {shape} in the weights, "
                f"{expected[match]} by config.json); restore the matching files"
            )
    parameters = sum(tensor.numel() for tensor in model.state_dict().values())
    check_fits_in_memory(parameters * 4, f"{what} {path} ({parameters:,} parameters in float32)",
                         "use a smaller model, or a machine with more memory", doing="to load")
    return True


def _check_tokenizer_files(path: Path, what: str) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise PrefnoiseError(
            f"{what} {path}: no tokenizer files (tokenizer.json or tokenizer_config.json); "
            "save the tokenizer beside the model (tokenizer.save_pretrained)"
        )


def _check_tokenizer(tokenizer: Any, path: Path, what: str) -> None:
    try:
        specials = len(set(tokenizer.all_special_tokens))
        size = len(tokenizer)
    except Exception as error:
        raise PrefnoiseError(f"{what} {path}: unusable tokenizer ({first_line(error)})") from None
    if size <= specials:
        raise PrefnoiseError(
            f"{what} {path}: the tokenizer has no vocabulary (tokenizer.json / vocab files missing); "
            "save the tokenizer beside the model (tokenizer.save_pretrained)"
        )


def _broken_json(path: Path) -> str | None:
    """The first JSON file in ``path`` that does not parse (to name it in a message), else None."""
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return file.name
    return None


def from_pretrained(cls: Any, path: str | Path, *, what: str, **kwargs: Any) -> Any:
    """Load local directory ``path`` with ``cls.from_pretrained`` and ``kwargs``, safely, with one-line errors.

    ``cls`` is AutoConfig, AutoTokenizer, an AutoModel* class, or a concrete config, tokenizer or
    model class. The directory passes ``check_model_dir`` first; the call always gets
    ``trust_remote_code=False`` and ``local_files_only=True`` (a caller cannot override them), and
    models get ``use_safetensors=True`` when safetensors weights exist. Tokenizers must have their
    files and a vocabulary; model weights are checked against the config before loading. Any
    failure becomes a PrefnoiseError naming ``what`` and ``path`` and keeping the first line of
    the cause. Loads run with transformers' warnings and progress bars silenced.
    """
    path = check_model_dir(path, what)
    kind = _kind(cls)
    for pinned in ("trust_remote_code", "local_files_only"):
        if kwargs.pop(pinned, None):
            raise ValueError(f"prefnoise.hf.from_pretrained does not allow {pinned}=True")
    kwargs.update(trust_remote_code=False, local_files_only=True)
    if kind == "tokenizer":
        _check_tokenizer_files(path, what)
    elif kind == "model":
        config = kwargs.get("config")
        if config is None:
            from transformers import AutoConfig  # transformers is heavy: loaded only when a model is read

            config = from_pretrained(AutoConfig, path, what=what)
        if check_weights(cls, path, what, config):
            kwargs["use_safetensors"] = True
    try:
        with quiet_transformers():
            loaded = cls.from_pretrained(str(path), **kwargs)
    except PrefnoiseError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, RuntimeError, ...
        raise PrefnoiseError(_load_failure(kind, path, what, error)) from None
    if kind == "tokenizer":
        _check_tokenizer(loaded, path, what)
    return loaded


def _load_failure(kind: str, path: Path, what: str, error: Exception) -> str:
    """The one-line message for a failed load of a ``kind`` from ``path``."""
    cause = first_line(error)
    if "ignore_mismatched_sizes" in str(error):
        cause = "the weights' shapes do not match config.json"
    broken = _broken_json(path) if isinstance(error, ValueError) else None
    where = f"{broken} is not valid JSON: " if broken else ""
    if kind == "tokenizer" and not broken and not (path / "tokenizer.json").is_file():
        where = "tokenizer.json is missing: "
    return (
        f"{what} {path}: cannot load the {kind} ({where}{cause}); "
        "restore the directory from the original model or save it again with save_pretrained"
    )
