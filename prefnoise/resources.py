"""Memory estimates made before allocating, so an absurd size fails in one line instead of being killed."""

from __future__ import annotations

import errno
import resource
from typing import Any

from prefnoise.errors import PrefnoiseError

# Training keeps, per float32 parameter, the weight; per trained one also its gradient and Adam's two moments.
WEIGHT_BYTES = 4
TRAINING_STATE_BYTES = 12  # gradient + Adam's first and second moments, float32
# A transformer layer keeps about 20 activations of width ``hidden`` per token for the backward pass
# (attention inputs, projections, the MLP's wide intermediate, norms); gradient checkpointing keeps ~10%.
ACTIVATIONS_PER_TOKEN_LAYER = 20
CHECKPOINTED_SHARE = 0.1
LOGIT_BYTES = 8  # a vocabulary logit in float32 and its gradient


def activation_bytes(tokens: int, layers: int, hidden: int, element_bytes: int, *,
                     checkpointing: bool = False, vocab: int = 0) -> int:
    """Bytes of the activations a pass over ``tokens`` tokens keeps: tokens × layers × hidden × 20 ×
    ``element_bytes`` (a tenth with gradient checkpointing), plus ``vocab`` float32 logits with their
    gradient per token. An inference pass keeps one layer's at a time (``layers=1``)."""
    per_layer = hidden * ACTIVATIONS_PER_TOKEN_LAYER * element_bytes * (CHECKPOINTED_SHARE if checkpointing else 1.0)
    return int(tokens * (layers * per_layer + vocab * LOGIT_BYTES))


def training_memory_bytes(parameters: int, trainable: int, activations: int = 0, *, weight_copies: int = 0) -> int:
    """Peak bytes of training a model: float32 weights of all ``parameters``, gradient and Adam's two
    moments of the ``trainable`` ones, the batch's ``activations`` (:func:`activation_bytes`), and
    ``weight_copies`` extra float32 copies of the weights (an early-stopping snapshot)."""
    return int((1 + weight_copies) * WEIGHT_BYTES * parameters + TRAINING_STATE_BYTES * trainable + activations)


def model_dims(config: Any) -> tuple[int, int]:
    """(hidden width, layers) of a Hugging Face model ``config`` (0 where it does not say)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) \
        or getattr(config, "num_layers", 0)
    return int(hidden or 0), int(layers or 0)


def mlp_parameters(input_dim: int, hidden: int, layers: int) -> int:
    """Weights and biases of an MLP with ``layers`` hidden layers of width ``hidden`` and one output."""
    if layers == 0:
        return input_dim + 1
    return (input_dim + 1) * hidden + (layers - 1) * (hidden + 1) * hidden + hidden + 1


def available_memory() -> int:
    """Bytes this process may still allocate: free memory, or the address-space limit (ulimit -v) if lower."""
    import psutil  # reason: psutil is only needed here, when a model is built

    free = psutil.virtual_memory().available
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        free = min(free, max(0, soft - psutil.Process().memory_info().vms))
    return free


# Loading polars, pyarrow and torch reserves about this much address space (thread stacks, allocator
# arenas) before any data is read; below it imports crash with a native error, not a Python one.
MIN_ADDRESS_SPACE = 2 << 30


def address_space_problem() -> str | None:
    """Why the address-space limit (ulimit -v) is too small for prefnoise to load, or None."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft >= MIN_ADDRESS_SPACE:
        return None
    return (f"the address-space limit (ulimit -v) is {human_bytes(soft)}; prefnoise needs at least "
            f"{human_bytes(MIN_ADDRESS_SPACE)} to load its libraries (they reserve address space for threads); "
            "raise the limit, or limit resident memory instead (a cgroup, systemd-run -p MemoryMax=)")


def human_bytes(count: float) -> str:
    """``count`` bytes in the largest fitting unit: ``6.4 TB``."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} PB"


def available_memory_on(device: Any = None) -> int:
    """Bytes still free where a model lives: :func:`available_memory` for the CPU (``None`` or a cpu
    device), the device's free memory for a CUDA device."""
    if device is None or getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return available_memory()
    import torch  # reason: torch is heavy and only a CUDA run gets here

    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def check_fits_in_memory(needed: int, what: str, advice: str, *, doing: str = "to train", device: Any = None,
                         held: int = 0) -> None:
    """PrefnoiseError (exit 2) with the estimate when ``needed`` bytes exceed what this process may allocate
    on ``device`` (None: the CPU); ``held``: bytes of the estimate already allocated there (loaded weights)."""
    free = available_memory_on(device) + held
    if needed > free:
        raise PrefnoiseError(
            f"{what} needs about {human_bytes(needed)} of memory {doing}, and {human_bytes(free)} is available; "
            + advice
        )


def check_inference_fits(config: Any, tokens: int, what: str, advice: str, *, device: Any = None) -> None:
    """Refuse, with the estimate, a forward pass without gradients over ``tokens`` tokens of the model
    ``config`` describes (one layer's activations at a time; its weights are already loaded)."""
    hidden, _ = model_dims(config)
    check_fits_in_memory(activation_bytes(tokens, 1, hidden, WEIGHT_BYTES), f"{what} ({tokens:,} tokens)", advice,
                         doing="for its activations", device=device)


def check_mlp_fits(input_dim: int, hidden: int, layers: int) -> None:
    """Refuse, with the estimate, an MLP reward model whose training state cannot fit in memory."""
    parameters = mlp_parameters(input_dim, hidden, layers)
    check_fits_in_memory(
        training_memory_bytes(parameters, parameters),
        f"an MLP of {layers} layers of width {hidden} on {input_dim} features ({parameters:,} parameters)",
        "lower --hidden or --layers",
    )


_OUT_OF_MEMORY = ("can't start new thread", "could not spawn threads", "can't allocate memory",
                  "Cannot allocate memory", "out of memory", "std::bad_alloc", "failed to allocate")
_FILE_TOO_LARGE = ("File too large", "[errno 27]", "os error 27")


def _limit(kind: int, shell: str) -> str:
    soft, _ = resource.getrlimit(kind)
    if soft == resource.RLIM_INFINITY:
        return ""
    unit = 1024 if kind == resource.RLIMIT_AS else 1
    return f"; the limit ({shell}) is {human_bytes(soft)} ({soft // unit} {'KB' if unit > 1 else 'bytes'})"


def resource_limit_message(error: BaseException) -> str | None:
    """One line for a failure caused by a resource limit (memory, threads, file size), else None."""
    text = f"{error}"
    code = getattr(error, "errno", None)
    if isinstance(error, MemoryError) or code == errno.ENOMEM or any(s in text for s in _OUT_OF_MEMORY):
        reason = text.splitlines()[0][:200] if text.strip() else type(error).__name__
        return (f"out of memory ({reason}){_limit(resource.RLIMIT_AS, 'ulimit -v')}; "
                "lower the sizes (--batch-size, --hidden, ...) or free memory")
    fsize, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    torch_writer = fsize != resource.RLIM_INFINITY and ("inline_container" in text or "unexpected pos" in text)
    if code == errno.EFBIG or any(s in text for s in _FILE_TOO_LARGE) or torch_writer:
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        return (f"{where}file too large: it grew past the file-size limit while being written"
                f"{_limit(resource.RLIMIT_FSIZE, 'ulimit -f')}; raise the limit or write less")
    return None
