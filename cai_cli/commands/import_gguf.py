"""``cai import-gguf``: turn a GGUF file into a standard model directory, offline.

A GGUF file (llama.cpp's format) holds the weights, the tokenizer, the chat template and the
model's settings in one file, often quantised. transformers can read one (with the ``gguf``
package) and dequantises it into an ordinary model, but such a model refuses ``save_pretrained``,
and every load pays the dequantisation again. This writes what ``from_pretrained`` expects:
``config.json`` and ``model.safetensors`` in plain floats, the tokenizer with its chat template,
and ``generation_config.json`` with the model's own recommended sampling where it is known, so
transformers, TRL, vLLM and every stage of this tool load the result like any checkpoint.

Quantisation is not undone: the weights are the quantised values, stored as floats.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from cai_cli.errors import UserError, not_found, reason

MARKER = "gguf_import.json"  # written last into the import: which file, which dtype
DTYPES = ("float32", "bfloat16", "float16")
INSTALL_HINT = "install it with `pip install gguf` (the reader transformers uses for GGUF files)"

# Sampling the model's authors recommend, for files whose metadata does not say it
# (`general.sampling.*`), keyed by `general.basename`. SmolLM2: the model card's example.
RECOMMENDED_SAMPLING = {
    "smollm2": {"temperature": 0.2, "top_p": 0.9},
}
# GGUF metadata keys (llama.cpp's `general.sampling.*`) -> GenerationConfig fields.
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def import_gguf(gguf_file: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Write the model in ``gguf_file`` to ``out_dir`` as a safetensors checkpoint with its
    tokenizer, chat template and generation config; return ``out_dir``.

    The directory is built beside ``out_dir`` and renamed into place when complete (the
    current directory, when empty, is filled instead: a shell must not be left in a removed
    one). An ``out_dir`` that already holds an import of the same file in the same dtype is
    left as it is. What can fail is checked before the minute of work.
    """
    # `.` and `a/b/..` name their directory only once resolved (their last part has no name)
    gguf_file, out_dir = Path(gguf_file).expanduser(), Path(out_dir).expanduser().resolve()
    if out_dir.parent == out_dir:
        raise UserError(f"{out_dir} is the root directory; give a new directory for the model")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    _check_is_gguf(gguf_file)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF tensors through it)
    except ImportError:
        raise UserError(f"{gguf_file}: reading GGUF files needs the `gguf` package; {INSTALL_HINT}") from None

    source = {"file": gguf_file.name, "sha256": _sha256(gguf_file), "dtype": dtype}
    if _previous_import(out_dir, source):
        print(f"import-gguf: {out_dir} already holds {gguf_file.name} in {dtype}; skipped")
        return out_dir

    metadata = _read_metadata(gguf_file)
    _check_tensor_types(gguf_file, metadata["tensor_types"])

    started = time.monotonic()
    staging = out_dir.parent / f".{out_dir.name}.importing"
    if staging.exists():  # a killed earlier import's leftovers; one we cannot remove says so
        shutil.rmtree(staging)
    staging.mkdir(parents=True)  # a place we may not write fails now, not after the work
    try:
        _load_config(gguf_file, metadata)
        tokenizer = _load_tokenizer(gguf_file, metadata)
        model = _load_model(gguf_file, metadata, dtype)
        model.generation_config = _generation_config(model.config, metadata, tokenizer)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_configs(staging, model.config)
        marker = {**source, "architecture": metadata["architecture"],
                  "quantization": metadata["quantization"], "source_path": str(gguf_file.resolve())}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if out_dir == Path.cwd():  # empty (`_previous_import`): fill it, the marker last
            for entry in sorted(staging.iterdir(), key=lambda path: path.name == MARKER):
                entry.rename(out_dir / entry.name)
        else:
            if out_dir.exists():
                out_dir.rmdir()  # empty: `_previous_import` refused anything else
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters())
    sampling = ", ".join(f"{k} {getattr(model.generation_config, k)}" for k in metadata["sampling"]) or "none known"
    template = "chat template" if tokenizer.chat_template else "NO chat template (use prompt_format: transcript)"
    print(f"import-gguf: {metadata['name'] or gguf_file.name}: {params / 1e6:.1f}M parameters, "
          f"{metadata['architecture']} {metadata['quantization']} -> {dtype}, {template}, "
          f"recommended sampling: {sampling}; {time.monotonic() - started:.0f}s -> {out_dir}")
    return out_dir


def _check_is_gguf(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: file {not_found(path)}")
    if not path.is_file():
        raise UserError(f"{path} is not a file; give the path of a .gguf file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                        "give a .gguf model file as written by llama.cpp")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _previous_import(out_dir: Path, source: dict) -> bool:
    """True when ``out_dir`` is a complete import of the same file and dtype; a UserError when it
    holds anything else; False when it is missing or empty."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; give a new directory")
    if not any(out_dir.iterdir()):
        return False
    marker = out_dir / MARKER
    try:
        previous = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{out_dir} is not empty and is not an earlier import; give an empty or new "
                        "directory") from None
    if previous.get("sha256") != source["sha256"]:
        raise UserError(f"{out_dir} holds an import of another file ({previous.get('file')}); "
                        "give an empty or new directory, or delete it")
    if previous.get("dtype") != source["dtype"]:
        raise UserError(f"{out_dir} holds an import of {source['file']} in {previous.get('dtype')}, "
                        f"not {source['dtype']}; give another directory, or delete it")
    return True


def _read_metadata(path: Path) -> dict:
    """What the import checks and records, from the file's header (no tensor is read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises bare ValueErrors, asserts and index errors
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'truncated or corrupt'})") from None

    def field(key, default=None):
        item = reader.fields.get(key)
        if item is None:
            return default
        try:
            return item.contents()
        except Exception:
            return default

    architecture = field("general.architecture")
    if not isinstance(architecture, str):
        raise UserError(f"{path}: the file has no general.architecture in its metadata; it is not a "
                        "model file transformers can read")
    tensor_types = sorted({t.tensor_type.name for t in reader.tensors})
    # The file type names the main quantisation; the tensor types say it when it is missing.
    quantised = [t for t in tensor_types if t not in ("F32", "F16", "BF16")]
    sampling = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        value = field(key)
        if isinstance(value, (int, float)):
            sampling[name] = value
    basename = str(field("general.basename", "") or "").lower()
    if not sampling and basename in RECOMMENDED_SAMPLING:
        sampling = dict(RECOMMENDED_SAMPLING[basename])
    return {
        "architecture": architecture,
        "name": field("general.name"),
        "tensor_types": tensor_types,
        "quantization": "+".join(quantised) or "+".join(tensor_types) or "no tensors",
        "sampling": sampling,
        "eot_token_id": field("tokenizer.ggml.eot_token_id"),
        "has_tokenizer": "tokenizer.ggml.model" in reader.fields,
    }


def _check_tensor_types(path: Path, tensor_types: list[str]) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the types gguf can dequantise, besides F32 and F16

    readable = {"F32", "F16"} | {t.name for t in _type_traits}
    unreadable = [t for t in tensor_types if t not in readable]
    if unreadable:
        known = [t.name for t in GGMLQuantizationType if t.name in readable]
        raise UserError(f"{path}: tensors quantised as {', '.join(unreadable)} cannot be dequantised "
                        f"by the installed gguf package; supported: {', '.join(known)}. Convert the "
                        "model with another quantisation (e.g. Q8_0 or Q4_K_M), or use the original "
                        "safetensors checkpoint")


def _supported_architectures() -> list[str]:
    """GGUF architectures transformers can read as a causal language model (best effort: the
    lists live in transformers' internals)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer", "t5", "umt5"})


def _unsupported(path: Path, architecture: str, why: str) -> UserError:
    supported = _supported_architectures()
    listed = f"; transformers reads these: {', '.join(supported)}" if supported else ""
    return UserError(f"{path}: transformers cannot load GGUF architecture '{architecture}' as a chat "
                     f"model ({why}){listed}")


def _load_tokenizer(path: Path, metadata: dict):
    from transformers import AutoTokenizer

    if not metadata["has_tokenizer"]:
        raise UserError(f"{path}: the file holds no tokenizer (no tokenizer.ggml.model in its metadata); "
                        "it cannot be used without one")
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"{path}: transformers cannot build its tokenizer: "
                        f"{reason(exc)}") from None


def _load_config(path: Path, metadata: dict):
    """The model's config as transformers reads it from the file: the cheap check that the
    architecture is one it can load as a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from cai_cli.engines.hf import quiet_transformers

    quiet_transformers()
    architecture = metadata["architecture"]
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        raise _unsupported(path, architecture, reason(exc)) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise _unsupported(path, architecture, f"'{config.model_type}' is not a causal language model")
    return config


@contextmanager
def _no_tensor_bar():
    """transformers reads a GGUF file's tensors under a tqdm bar of its own, which its switch
    for progress bars does not reach; our one summary line says what was imported."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    bar = getattr(reader, "tqdm", None)
    reader.tqdm = lambda items, *args, **kwargs: items
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar


def _load_model(path: Path, metadata: dict, dtype: str):
    """The dequantised model, rebuilt as a plain model: the one transformers returns for a GGUF
    file carries its quantisation config and refuses ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    architecture = metadata["architecture"]
    torch_dtype = getattr(torch, dtype)
    try:
        with _no_tensor_bar():
            loaded = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch_dtype,
                # Dense weights even where a GGUF matmul kernel is installed: they are what we save.
                quantization_config=GgufConfig(dequantize=True))
    except NotImplementedError as exc:  # gguf: "Dequantization for X is not yet implemented"
        raise UserError(f"{path}: {exc}; convert the model with another quantisation (e.g. Q8_0)") from None
    except ValueError as exc:
        raise _unsupported(path, architecture, str(exc).splitlines()[0]) from None

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # assign=True takes the loaded tensors as they are: no second copy of the weights.
    result = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if not _is_tied(model, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"rebuilding the GGUF model left weights unmatched: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    leftovers = [name for name, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise RuntimeError(f"rebuilding the GGUF model left weights unset: {leftovers[:5]}")
    model.eval()
    return model


def _portable_configs(directory: Path, config) -> None:
    """Make the saved files readable by older libraries too (vLLM often runs transformers 4.x),
    and drop what only describes how this process loaded the file."""
    path = directory / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    rope = saved.get("rope_parameters") or {}
    if "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        # transformers 4.x reads `rope_theta` only and would silently fall back to 10000.
        saved.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in saved:
        saved.setdefault("torch_dtype", saved["dtype"])
    saved.pop("_model_name_or_path", None)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    path = directory / "tokenizer_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # loader arguments, not tokenizer settings
        saved.pop(key, None)
    if saved.get("tokenizer_class") == "TokenizersBackend":
        saved["tokenizer_class"] = "PreTrainedTokenizerFast"  # the same class, under a name 4.x knows
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and saved.get("model_max_length", 0) > context:
        saved["model_max_length"] = context
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


def _generation_config(config, metadata: dict, tokenizer):
    """End tokens from the model (and the end-of-turn token, when the file names one) and, when
    known, the sampling the model's authors recommend."""
    from transformers import GenerationConfig

    eos = config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    eot = metadata["eot_token_id"]
    if isinstance(eot, int) and eot not in eos:
        eos.append(eot)
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=pad,
    )
    if metadata["sampling"]:
        generation.do_sample = True
        for name, value in metadata["sampling"].items():
            setattr(generation, name, value)
    return generation
