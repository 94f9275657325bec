"""Loading models and tokenizers through transformers, in one place, and the checks a stage runs
before it writes anything.

Every loader passes the config's ``revision`` and ``trust_remote_code`` and turns a failure into
a ``UserError`` naming the config key. The checks are cheap (no weights are read, the hub is
asked once, without retries) so a stage can run them first:

- ``check_model_source``: the device is valid and present; a local directory is a
  ``save_pretrained`` model whose weights files are whole; a hub id is in the local cache, or
  the hub answers for it (a machine without network fails in a second, not after minutes of
  retries).
- ``check_model``: the same for a model a training stage trains (``finetune.model``, ...).

``what`` names the model in messages: a config section (``models.policy``, whose key is
``models.policy.name_or_path``) or the key that names the model itself (``finetune.model``,
``label_prefs.policy``). Every model other than ``models.feedback`` loads with the settings of
``models.policy`` (revision, remote code, device), so a device problem is reported under
``models.feedback.device`` or ``models.policy.device``.

Heavy libraries are imported inside the functions: the stages' ``spec()`` import this module.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from cai_cli import ui
from cai_cli.config import LoraConfig, ModelConfig
from cai_cli.errors import UserError, reason, relative_note

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$|^[\w.-]+$")
# Files that hold a save_pretrained directory's weights (full models, then peft adapters).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
REDOWNLOAD = "re-save the model with save_pretrained, or download it again"


def quiet_transformers() -> None:
    """Our own progress bars and messages replace the libraries' per-file tqdm bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except (ImportError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# Names and keys


def is_local_model(name_or_path: str) -> bool:
    """A name is a local path when it exists, looks like a path (``./x``, ``/x``, ``~/x``,
    ``a/b/c``) or its first component is a directory here (``runs/tiny-model`` with ``runs/``
    present). Anything else of the form ``org/name`` is a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")) or not _HUB_ID.match(name_or_path):
        return True
    return Path(name_or_path.split("/")[0]).is_dir() and "/" in name_or_path


def local_or_hub(name_or_path: str) -> str:
    """An absolute path for a local model, so a saved LoRA adapter finds its base from anywhere
    (``record_adapter_base`` then writes a base inside the run directory relative to it)."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


# ---------------------------------------------------------------------------------------------
# LoRA adapters saved alone (lora.merge: false)
#
# peft records the base model in the adapter's adapter_config.json (base_model_name_or_path), and
# transformers reads it when it is given the adapter's directory. cai records a base that lies
# inside the run directory (train-rm or optimize on the run's own sft/) relative to the adapter
# ("../sft"), so a run directory that is copied or moved still loads; a base outside it stays as
# peft wrote it (a hub id, or an absolute path: another machine needs that model anyway).
# transformers would read a relative base against the working directory, so cai loads an
# adapter itself (``_from_pretrained``): the base it names, then the adapter on it.


def adapter_only(directory: Path) -> bool:
    """Whether ``directory`` holds a LoRA adapter without merged weights."""
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file()


def saved_model(directory: Path) -> bool:
    """Whether ``directory`` holds a ``save_pretrained`` model: full weights or an adapter."""
    return (directory / "config.json").is_file() or (directory / ADAPTER_CONFIG).is_file()


def recorded_base(directory: Path) -> str | None:
    """The base model of the adapter saved alone in ``directory`` (None for full weights): its
    ``base_model_name_or_path``, where a path that starts with ``./`` or ``../`` is relative to
    ``directory``; anything else is read as transformers reads it (an absolute path, a hub id)."""
    if not adapter_only(directory):
        return None
    try:
        base = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None  # check_weights names a broken adapter_config.json
    if not isinstance(base, str) or not base:
        return None
    if base in (".", "..") or base.startswith(("./", "../")):
        return str((directory / base).resolve())
    return base


def adapter_base(directory: Path, key: str) -> str | None:
    """``recorded_base``, and a local base that is not there is a UserError saying what to do."""
    base = recorded_base(directory)
    if base is not None and is_local_model(base) and not Path(base).expanduser().is_dir():
        raise UserError(
            f"{key}: {directory} is a LoRA adapter saved without merged weights, and its base "
            f"model {base} is missing; put that model there (or set base_model_name_or_path in "
            f"{directory / ADAPTER_CONFIG} to where it is), or rerun the stage that made it with "
            "lora.merge: true, which saves full weights that load alone")
    return base


def record_adapter_base(saved: Path, directory: Path, run_dir: Path) -> None:
    """In the adapter just saved to ``saved`` (and about to move to ``directory``), a base model
    inside ``run_dir`` is recorded relative to ``directory`` ("../sft"); one outside stays as it
    is."""
    file = saved / ADAPTER_CONFIG
    if not file.is_file():
        return
    data = json.loads(file.read_text(encoding="utf-8"))
    base = data.get("base_model_name_or_path")
    if not isinstance(base, str) or not Path(base).is_absolute():
        return
    path, root = Path(base).resolve(), run_dir.resolve()
    if root not in path.parents:
        return
    relative = Path(os.path.relpath(path, directory.resolve())).as_posix()
    data["base_model_name_or_path"] = relative if relative.startswith("..") else f"./{relative}"
    file.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")  # as peft does


def model_key(what: str) -> str:
    """The config key that names the model: ``models.policy`` -> ``models.policy.name_or_path``;
    a key that names a model itself (``finetune.model``) stays as it is."""
    if what.startswith("models.") and not what.endswith(".name_or_path"):
        return f"{what}.name_or_path"
    return what


def device_key(what: str) -> str:
    """The config key of the device the model named by ``what`` loads on."""
    section = "models.feedback" if what.startswith("models.feedback") else "models.policy"
    return f"{section}.device"


# ---------------------------------------------------------------------------------------------
# Devices and dtypes


def resolve_device(device: str, key: str = "models.policy.device") -> str:
    """``auto`` -> cuda, then mps, then cpu; any other name must be a torch device that is
    present here (``key`` names the setting in the message)."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{key}: '{device}' is not a torch device; use auto, cpu, cuda, cuda:1 "
                        "or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is built without CUDA"
                   if torch.version.cuda is None
                   else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise UserError(f"{key}: {device}, but {why}; use auto or cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            devices = "cuda:0" + (f" to cuda:{count - 1}" if count > 1 else "")
            raise UserError(f"{key}: {device}, but this machine has {count} CUDA device"
                            f"{'s' if count != 1 else ''} ({devices}); use auto or one of them")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"{key}: {device}, but Apple's MPS is not available here; "
                            "use auto or cpu")
    elif parsed.type != "cpu":
        module = getattr(torch, parsed.type, None)  # xpu, mtia, ...: their own is_available
        available = getattr(module, "is_available", None)
        if parsed.type == "meta" or (callable(available) and not available()):
            raise UserError(f"{key}: {device}, but no {parsed.type} device is available here; "
                            "use auto or cpu")
    return device


def check_device(model: ModelConfig, what: str) -> str:
    """The device ``model`` loads on, resolved and checked (see ``resolve_device``)."""
    return resolve_device(model.device, device_key(what))


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def free_device_memory() -> None:
    """Give back the memory of a model just dropped, before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()


# ---------------------------------------------------------------------------------------------
# Checks before anything is written


def check_model_source(model: ModelConfig, what: str) -> None:
    """Fail early, before anything is written, for a model that cannot load: a bad or missing
    device, a local path that is not a model or whose weights are cut short, a hub id that is
    neither cached nor reachable (the stages and ``cai config validate`` alike). A model served
    elsewhere (``backend: openai``) has nothing here to check: its engine asks the server when
    it starts."""
    if model.remote:
        return
    check_device(model, what)
    key = model_key(what)
    if not is_local_model(model.name_or_path):
        check_hub_model(model, key)
        return
    path = Path(model.name_or_path).expanduser()
    if not path.exists():
        raise UserError(f"{key}: model directory not found: {path}{relative_note(path)} (build a test model with "
                        f"`cai tiny-model {ui.shell(model.name_or_path)}`, or give a hub id)")
    if not path.is_dir():
        raise UserError(f"{key}: {path} is a file; expected a directory written by save_pretrained")
    if not saved_model(path):
        raise UserError(f"{key}: {path} has no config.json; expected a directory "
                        "written by save_pretrained")
    check_weights(path, key)
    adapter_base(path, key)  # an adapter's base model is there


def check_model(model: ModelConfig, key: str) -> None:
    """A model a training stage trains, named by ``key`` (``models.policy.name_or_path`` or an
    override such as ``finetune.model``): as ``check_model_source``, and an override must hold
    full weights (a ``config.json``), not an adapter alone."""
    if key.startswith("models."):
        check_model_source(model, key)
        return
    check_device(model, key)
    if not is_local_model(model.name_or_path):
        check_hub_model(model, key)
        return
    path = Path(model.name_or_path).expanduser()
    if not (path / "config.json").is_file():
        state = "has no config.json" if path.exists() else f"does not exist{relative_note(path)}"
        raise UserError(f"{key}: {path} {state}; expected a directory written by "
                        "save_pretrained, or a hub id")
    check_weights(path, key)


def check_weights(directory: Path, key: str) -> None:
    """A ``save_pretrained`` directory has weights files, and each safetensors file is whole:
    its header is read and the file must be as long as the tensors it lists (a download or copy
    cut short fails here, not halfway through loading)."""
    for name in ("config.json", "adapter_config.json"):
        if (directory / name).is_file():
            try:
                json.loads((directory / name).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise UserError(f"{key}: {directory / name} is not valid JSON ({exc}); "
                                f"{REDOWNLOAD}") from None
    present = [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise UserError(f"{key}: {directory} holds no model weights (none of "
                        f"{', '.join(WEIGHT_FILES)}); expected a directory written by "
                        "save_pretrained")
    shards: list[Path] = []
    for file in present:
        if file.name.endswith(".index.json"):
            try:
                index = json.loads(file.read_text(encoding="utf-8"))
                names = sorted(set(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                raise UserError(f"{key}: {file} is not a valid weights index; "
                                f"{REDOWNLOAD}") from None
            for name in names:
                if not (directory / name).is_file():
                    raise UserError(f"{key}: {directory / name}, listed in {file.name}, is "
                                    f"missing; {REDOWNLOAD}")
            shards += [directory / name for name in names]
        else:
            shards.append(file)
    for shard in shards:
        if shard.suffix == ".safetensors":
            check_safetensors(shard, key)


def check_safetensors(file: Path, key: str) -> None:
    """``file`` is a whole safetensors file: an 8-byte header length, a JSON header giving each
    tensor's byte range, then exactly those bytes. Only the header is read."""
    size = file.stat().st_size

    def broken(why: str) -> UserError:
        return UserError(f"{key}: {file} is truncated or corrupt ({why}); {REDOWNLOAD}")

    with file.open("rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        raise broken(f"{size} bytes, shorter than a safetensors header")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
        raise broken(f"its header claims {length:,} bytes, the file has {size:,}")
    try:
        header = safetensors_header(file)
        end = max((int(entry["data_offsets"][1]) for name, entry in header.items()
                   if name != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
        raise broken("its header is not a safetensors header") from None
    if size != 8 + length + end:
        raise broken(f"{size:,} bytes where its header describes {8 + length + end:,}")


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (each tensor's dtype, shape and byte range): an
    8-byte length, then the header; nothing else is read."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def check_hub_model(model: ModelConfig, key: str) -> None:
    """A hub id loads when it is in the local cache; otherwise (unless offline) the hub is
    asked once, with no retries, whether it has the model, so that a machine without network
    fails at once with a hint instead of retrying every file for a minute."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name, revision = model.name_or_path, model.revision
    at = f" at revision '{revision}'" if revision else ""
    names = ("config.json", "adapter_config.json")
    if any(isinstance(try_to_load_from_cache(name, file, revision=revision), str)
           for file in names):
        return
    if constants.is_offline_mode():
        raise UserError(f"{key}: '{name}'{at} is not in the local Hugging Face cache and "
                        "HF_HUB_OFFLINE=1 forbids downloading it; download it once where there is "
                        f"network (`hf download {name}`), or give a local directory")
    for file in names:
        try:
            get_hf_file_metadata(hf_hub_url(name, file, revision=revision),
                                 timeout=constants.HF_HUB_ETAG_TIMEOUT)
            return
        except GatedRepoError:
            raise UserError(f"{key}: '{name}' is gated: accept its terms on huggingface.co and log "
                            "in (`hf auth login` or HF_TOKEN)") from None
        except RepositoryNotFoundError:
            raise UserError(f"{key}: no model '{name}' on the Hugging Face hub (or it is private: "
                            "log in with `hf auth login` or HF_TOKEN); check the name, or give a "
                            "local directory") from None
        except RevisionNotFoundError:
            raise UserError(f"{key}: '{name}' has no revision '{revision}'; check the revision "
                            "setting of this model") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 404:
                continue  # no such file: try the adapter's
            return  # the hub answers (busy, rate limits): loading retries by itself
        except Exception as exc:
            if not _network_error(exc):
                raise
            raise UserError(f"{key}: cannot reach the Hugging Face hub for '{name}' "
                            f"({reason(exc)}); with no network, set HF_HUB_OFFLINE=1 to use the "
                            "models in the local cache, or give a local directory") from None
    raise UserError(f"{key}: '{name}'{at} on the Hugging Face hub has no config.json, so it is not "
                    "a transformers model")


def _network_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the hub could not be reached (no network, DNS, timeout, proxy)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    try:
        import httpx2 as httpx
    except ImportError:
        try:
            import httpx
        except ImportError:
            return False
    return isinstance(exc, httpx.TransportError)


# ---------------------------------------------------------------------------------------------
# Loading


def _from_pretrained(auto_class, model: ModelConfig, what: str, kind: str, fix: str = "",
                     name: str | None = None, **kwargs):
    """``auto_class.from_pretrained`` with the config's revision and remote-code setting; a
    failure becomes a UserError (naming the broken weights file when that is the cause). A LoRA
    adapter saved alone loads as transformers loads one (its base, then the adapter on it), with
    a base recorded relative to the adapter found from its directory (``recorded_base``); a
    config is the base's."""
    from safetensors import SafetensorError

    key = model_key(what)
    target = name or model.name_or_path
    adapter = Path(target).expanduser()
    base = adapter_base(adapter, key) if is_local_model(target) else None
    try:
        loaded = auto_class.from_pretrained(
            base or target, revision=model.revision,
            trust_remote_code=model.trust_remote_code, **kwargs)
        if base is not None and hasattr(loaded, "load_adapter"):
            loaded.load_adapter(str(adapter))
        return loaded
    except (OSError, ValueError, SafetensorError) as exc:
        if is_local_model(model.name_or_path) and Path(model.name_or_path).expanduser().is_dir():
            check_weights(Path(model.name_or_path).expanduser(), key)  # raises when they are broken
        raise UserError(f"{key}: cannot load {kind} from '{model.name_or_path}': {reason(exc)}"
                        + (f"; {fix}" if fix else "")) from None


def load_tokenizer(model: ModelConfig, what: str, *, padding_side: str | None = "left",
                   fix: str = ""):
    """The model's tokenizer, with a pad token (the end-of-sequence token when it has none) and
    ``padding_side`` (left, for generation; None keeps the saved one). It tokenises message
    contents as text in every call (``literal.protect``): whoever renders a conversation with
    it (our engines, TRL's trainers) gets a control-token string in the data as text."""
    from transformers import AutoTokenizer

    key = model_key(what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot load a tokenizer from '{model.name_or_path}': "
                        f"{reason(exc)}"
                        + (f"; {fix}" if fix else "")) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    from cai_cli.engines.literal import protect

    return protect(tokenizer)


def load_config(model: ModelConfig, what: str, **config_kwargs):
    """The model's transformers config (``config_kwargs`` such as ``num_labels=1`` applied)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model, what, "a model config", **config_kwargs)


def load_causal_lm(model: ModelConfig, what: str, device: str | None = None):
    """The causal LM for inference, in ``model.dtype``, on ``device`` (default: the config's,
    resolved), in eval mode."""
    from transformers import AutoModelForCausalLM

    device = device or check_device(model, what)
    loaded = _from_pretrained(AutoModelForCausalLM, model, what, "a causal LM",
                              dtype=resolve_dtype(model.dtype, device))
    return loaded.to(device).eval()


def load_reward_model(model: ModelConfig, what: str, *, dtype=None, device: str | None = None,
                      fix: str = ""):
    """A sequence-classification model with one label (a reward model), in eval mode; in
    ``dtype`` when given (else as transformers loads it) and moved to ``device`` when given."""
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"num_labels": 1}
    if dtype is not None:
        kwargs["dtype"] = dtype
    loaded = _from_pretrained(AutoModelForSequenceClassification, model, what, "a reward model",
                              fix=fix, **kwargs)
    return (loaded.to(device) if device is not None else loaded).eval()


def load_model(model: ModelConfig, key: str, lora: LoraConfig, args, auto_class=None,
               **model_kwargs):
    """The model to train (``auto_class`` defaults to ``AutoModelForCausalLM``; ``model_kwargs``
    such as ``num_labels=1`` go to its ``from_pretrained``). Full training keeps fp32 master
    weights (bf16/fp16 is autocast); under LoRA the base weights are frozen, so they sit in the
    training precision and take half the memory. A local model is loaded by its absolute path,
    so a saved LoRA adapter finds its base from anywhere. ``key`` names the config key in the
    message when the model cannot be loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32
    if lora.enabled and (args.bf16 or args.fp16):
        dtype = torch.bfloat16 if args.bf16 else torch.float16
    return _from_pretrained(auto_class or AutoModelForCausalLM, model, key, "a model",
                            name=local_or_hub(model.name_or_path), dtype=dtype, **model_kwargs)
