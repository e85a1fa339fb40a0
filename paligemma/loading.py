"""Load and save checkpoints in the layout Google published on the Hugging Face hub (the seed's `utils.py`).

Loading is strict and streaming: the model is built on the `meta` device, each stored tensor is read
from the safetensors files (one file or shards through `model.safetensors.index.json`), checked
against the parameter it fills, converted to the requested dtype and device on its own, and assigned.
Tensors are read in row blocks, each mapped on its own and dropped once converted (`safetensors_stream`),
so peak memory is about the model's size in the target dtype plus one block. With `quantize`, the
Linear and embedding weights are converted (to int8 / bf16) as they are read (`cpu/formats.py`); the
default "auto" keeps a bf16 checkpoint's weights in bf16 on a CPU (`resolve_quantize`). Three
key spellings are accepted (DESIGN.md, checkpoint keys): the hub's (`vision_tower.vision_model.*`,
`language_model.model.*`), transformers-5-saved (`vision_tower.*`), and transformers-5 in-memory
(`model.*`). Every parameter must be filled and every
stored tensor consumed; `lm_head` is tied to the embeddings when absent. Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import save_file

from .atomic import atomic_files
from .checks import is_regular_file, read_json_file
from .config import PaliGemmaConfig, token_ids
from .keys import canonical_key, hub_key  # noqa: F401 - the key spellings, re-exported
from .cpu.formats import check_format, convert, swap_modules, weight_format
from .errors import CheckpointError, InputError, PaliGemmaError
from .modeling_paligemma import PaliGemmaForConditionalGeneration
from .safetensors_stream import SafetensorsStream

INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU (no bf16 units on common CPUs), bfloat16 on accelerators."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES.values():
        raise InputError(f"dtype={dtype!r}; the model runs in torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device={device!r}; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device={device!r}: MPS is not available on this machine; use 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device={device!r}: this library runs on 'cpu', 'cuda' or 'mps'")
    return dev


def checkpoint_dir(path: Path) -> Path:
    """`path` when it is a directory; otherwise an error saying what it is (missing, a file, a symlink loop)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint directory {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"checkpoint directory {path} is a symlink loop; point it at a real directory") from None
        raise CheckpointError(f"cannot access checkpoint directory {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} is not a directory; pass the checkpoint directory (with config.json)")
    return path


def read_index(index: Path) -> list[str]:
    """The shard file names `model.safetensors.index.json` lists (in first-use order), checked: a JSON
    object whose `weight_map` maps tensor names to plain file names inside the directory."""
    doc = read_json_file(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = type(doc).__name__ if not isinstance(doc, dict) else f"weight_map={str(weight_map)[:60]}"
        raise CheckpointError(f"{index}: expected a JSON object with a non-empty \"weight_map\" object "
                              f"{{tensor name: shard file}}, got {got}; re-download it")
    for key, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise CheckpointError(f"{index}: weight_map[{key!r}]={file!r}; expected the name of a shard file "
                                  "in the checkpoint directory (no path)")
    return list(dict.fromkeys(weight_map.values()))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, driven by the index when there is one."""
    checkpoint_dir(path)
    index = path / INDEX_NAME
    if index.exists():
        files = [path / f for f in read_index(index)]
        missing = [f.name for f in files if not is_regular_file(f)]
        if missing:
            raise CheckpointError(f"{index.name} lists shard(s) missing from {path} (or not regular files): "
                                  f"{', '.join(missing[:5])}")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
    hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
    raise CheckpointError(f"no model.safetensors or {INDEX_NAME} in {path}{hint}")


def generation_eos(path: Path, vocab_size: int) -> tuple[int, ...] | None:
    """The eos ids of `generation_config.json` (None when the file or the field is absent), checked."""
    file = path / "generation_config.json"
    if not file.exists():
        return None
    doc = read_json_file(file)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(doc).__name__}; re-download it")
    eos = doc.get("eos_token_id")
    return None if eos is None else token_ids("eos_token_id", eos, vocab_size, str(file))


def check_sizes(config: PaliGemmaConfig, files: list[Path], path: Path) -> None:
    """Refuse, before the model is built, a config implying far more parameters than the files hold values
    (a config from another model, or sizes that would build thousands of layers); a small shortfall is
    left to the strict loading, which names each missing tensor."""
    stored = 0
    for file in files:
        with _open(file) as f:
            stored += sum(math.prod(f.shape(k)) for k in f.entries)
    wanted = config.num_parameters()
    if wanted > 2 * stored + 1_000_000:
        raise CheckpointError(f"{path}/config.json implies {wanted:,} parameters but the weight files hold "
                              f"{stored:,} values; config.json does not belong to these weights")


def _finite(key: str, file: Path, blocks: Iterable[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    """Pass blocks through, refusing one with a NaN or an infinity. One `aminmax` per block (NaN
    propagates to both, an infinity shows as the min or the max): the cheapest full check there is,
    about a fifth of the block's conversion (benchmarks/bench_load_checks.py)."""
    for r0, block in blocks:
        if block.is_floating_point() and block.numel() and not _all_finite(block):
            bad = ~torch.isfinite(block)
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise CheckpointError(f"tensor {key} in {file} holds {int(bad.sum())} non-finite value(s) (NaN or inf; "
                                  f"first at index {(where[0] + r0, *where[1:])}); the weights are corrupt: "
                                  "re-download or re-save them")
        yield r0, block


def _all_finite(t: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _read(f: SafetensorsStream, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `key` converted to `dtype` block by block, each block checked finite as it passes."""
    shape = f.shape(key)
    blocks = _finite(key, f.path, f.blocks(key))
    if len(shape) < 2 or not shape[0]:
        return next(iter(blocks))[1].to(dtype, copy=True)
    out = torch.empty(shape, dtype=dtype)
    for r0, block in blocks:
        out[r0:r0 + block.shape[0]] = block
    return out


def _open(file: Path) -> SafetensorsStream:
    try:
        return SafetensorsStream(file)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}. The file is truncated or corrupt; download it again") from None


def resolve_quantize(quantize: str | None, files: list[Path], device: torch.device, dtype: torch.dtype,
                     config: PaliGemmaConfig | None = None) -> str | None:
    """"auto" (the default) -> the default CPU mode: "bf16" when running on a CPU in float32 and every
    matrix of the checkpoint is stored in bf16 (all of Google's: keeping them in bf16 is lossless, half the
    memory of fp32 and ~1.7x faster decoding) and the compiled kernels are available; otherwise None
    (plain modules: bit-for-bit transformers' computation); "int8" for a checkpoint this library saved in
    int8. Other values are checked and returned."""
    if config is not None and config.quantization == "int8":
        if quantize not in ("auto", "int8"):
            raise CheckpointError(f"this checkpoint was saved with int8 weights (config.json quantization_config); "
                                  f"load it with quantize='int8' or the default, not quantize={quantize!r}")
        return "int8"
    if quantize != "auto":
        return check_format(quantize)
    if device.type != "cpu" or dtype != torch.float32:
        return None
    stored = set()
    for file in files:
        with _open(file) as f:
            stored |= {f.dtype(key) for key in f.entries if len(f.shape(key)) == 2}
    if stored != {torch.bfloat16}:
        return None
    from .cpu import kernels

    return "bf16" if kernels.extension() is not None else None


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
               quantize: str | None = "auto") -> PaliGemmaForConditionalGeneration:
    """Build the model from `path`/config.json and fill it strictly from the safetensors weights.
    quantize: "auto" (see `resolve_quantize`), None for plain modules, or the weight format "int8" / "bf16" /
    "fp32" of the CPU fast path (see cpu/formats.py)."""
    path = Path(path)
    check_format(None if quantize == "auto" else quantize)
    files = weight_files(path)
    config = PaliGemmaConfig.from_file(path)
    eos = generation_eos(path, config.vocab_size)
    if eos is not None:
        config.eos_token_ids = eos
    check_sizes(config, files, path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if dtype == torch.float16 and config.text.is_gemma2:  # DESIGN.md, precision: Gemma 2 activations overflow fp16
        raise CheckpointError("PaliGemma 2 is not supported in float16 (its activations overflow); "
                              "use bfloat16 or float32")
    quantize = resolve_quantize(quantize, files, device, dtype, config)
    prequantized = config.quantization == "int8"  # int8 weights and their scales are read as stored
    with torch.device("meta"), _no_init():
        model = PaliGemmaForConditionalGeneration(config)
    expected = {n: p.shape for n, p in model.named_parameters()}
    converted = swap_modules(model, quantize, dtype) if quantize else set()
    if prequantized:
        expected.update({n.removesuffix("weight") + "weight_scale": torch.Size([expected[n][0]]) for n in converted})
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected, misshapen, tied_head = [], [], None
    for file in files:
        with _open(file) as f:
            for key in f.entries:
                name = canonical_key(key)
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    tied_head = (file, key)  # checked against the embeddings below
                    continue
                if name not in expected:
                    unexpected.append(f"{key} ({file.name})")
                    continue
                if name in state:
                    raise CheckpointError(f"{key} in {file.name} fills {name}, already filled by {source[name]}")
                shape = f.shape(key)
                if shape != tuple(expected[name]):
                    misshapen.append(f"{key}: stored {list(shape)}, model expects {list(expected[name])}")
                    continue
                stored = f.dtype(key)
                if prequantized and (name in converted) != (stored == torch.int8):
                    raise CheckpointError(f"{key} in {file.name} is stored as {stored}, but an int8 checkpoint holds "
                                          "int8 exactly for its quantized weights; the file does not match config.json")
                if not prequantized and not stored.is_floating_point:
                    raise CheckpointError(f"{key} in {file.name} is stored as {stored}; weights must be floating point "
                                          "(bf16/fp32/fp16), or int8 with the quantization_config this library writes")
                try:
                    if name in converted and not prequantized:
                        blocks = _finite(key, file, f.blocks(key))
                        state.update({k: t.to(device) for k, t in convert(name, blocks, shape, quantize).items()})
                    elif name in converted:
                        state[name] = f.read(key).to(device)  # int8, as saved
                    elif name.endswith("weight_scale"):
                        state[name] = _read(f, key, torch.float32).to(device)
                    else:
                        state[name] = _read(f, key, dtype).to(device)
                except PaliGemmaError:  # a setting refused on the way (PALIGEMMA_CPU_ISA, ...): not the file's fault
                    raise
                except (OSError, RuntimeError, ValueError) as e:
                    raise CheckpointError(f"cannot read tensor {key} from {file}: {e}; the file is corrupt") from None
                source[name] = f"{key} ({file.name})"
    missing = [n for n in expected if n not in state]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(hub_key(n) for n in missing[:10])}"
                        + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}"
                        + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    if misshapen:
        problems.append("wrong shapes: " + "; ".join(misshapen[:10]))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + " | ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    if tied_head is not None:
        _check_tied_head(model, *tied_head, quantize)
    return model.eval()


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip torch's random init while building on `meta` (the loader fills every tensor anyway): on meta
    tensors it runs through torch._refs, whose first use imports torch._dynamo, about 1.5 s."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


@torch.no_grad()
def _check_tied_head(model, file: Path, key: str, quantize: str | None = None) -> None:
    """A stored lm_head is accepted when it equals the embeddings it is tied to; otherwise it is an error."""
    emb = model.language_model.embed_tokens
    with _open(file) as f:
        shape = f.shape(key)
        if quantize:  # compare in the stored format: the same conversion of equal tensors gives equal results
            head = convert("weight", f.blocks(key), shape, quantize) if shape == tuple(emb.weight.shape) else {}
            same = bool(head) and all(torch.equal(t.to(emb.weight.device), getattr(emb, k)) for k, t in head.items())
        else:
            head = f.read(key)
            same = head.shape == emb.weight.shape and torch.equal(head.to(emb.weight.dtype).to(emb.weight.device),
                                                                  emb.weight)
    if not same:
        raise CheckpointError(
            f"{key} in {file.name} differs from the token embeddings, but config.json says "
            "tie_word_embeddings=true; fix the config (set it to false) or the checkpoint"
        )


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
         quantize: str | None = "auto", adapter: str | Path | None = None):
    """Load `(model, processor)` from a checkpoint directory in the hub layout.

    dtype: torch dtype or name; default float32 on CPU, bfloat16 on CUDA/MPS. With `quantize`, the compute
        dtype (activations, norms, biases, KV cache); keep float32 on CPU.
    device: "cpu", "cuda", "mps", or None for the best available.
    quantize: weight storage of the CPU fast path (cpu/formats.py): "int8" (per-output-channel int8, ~1/4 of
        the fp32 memory), "bf16" (half), "fp32" (same values, faster batched decoding); None = plain
        modules, exactly transformers' computation (use it to fine-tune or to compare bit for bit);
        "auto" (default) = "bf16" for a bf16 checkpoint on a CPU in float32, else None (`resolve_quantize`).
    adapter: a LoRA adapter directory in PEFT's layout (`lora.load_adapter`), applied unmerged over the base.
    """
    from .processing_paligemma import PaliGemmaProcessor

    model = load_model(path, dtype, device, quantize)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter).eval()
    processor = PaliGemmaProcessor.from_pretrained(path)
    if processor.num_image_tokens != model.config.num_image_tokens:
        raise CheckpointError(
            f"{path}: the processor writes {processor.num_image_tokens} <image> tokens but the vision tower "
            f"makes {model.config.num_image_tokens}; preprocessor_config.json and config.json disagree"
        )
    return model, processor


# ------------------------------------------------------------------------------------------- saving
def _weight_set(directory: Path) -> list[Path]:
    """The files a weight set consists of: what a new set replaces (old shards, an old index)."""
    return [*directory.glob("model*.safetensors"), directory / INDEX_NAME]


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], directory: str | Path,
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write (hub name, tensor) pairs as `model.safetensors`, or as shards plus an index when they exceed
    `max_shard_bytes`, replacing any previous weight set in `directory` all at once (`atomic.py`): on an
    error the old weights stay as they were. Tensors are consumed one by one, so a shard is the most ever
    held in memory."""
    with atomic_files(directory, _weight_set) as stage:
        return _write_shards(tensors, stage, max_shard_bytes)


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], stage: Path, max_shard_bytes: int) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, written, weight_map, total = 0, [], {}, 0

    def flush():
        nonlocal size
        name = f"shard-{len(written):05d}.tmp"
        save_file(shards[-1], str(stage / name), metadata={"format": "pt"})
        written.append(name)
        shards[-1] = {}
        size = 0

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][key] = t.detach().contiguous().cpu()
        weight_map[key] = len(written)
        size += nbytes
        total += nbytes
    flush()
    n = len(written)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(written, names):
        (stage / tmp).replace(stage / final)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        (stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def save_pretrained(model: PaliGemmaForConditionalGeneration, processor, directory: str | Path,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the model in the hub layout (hub key spelling, no tied lm_head) with config, generation config
    and tokenizer/processor files, loadable by `paligemma.load` and by transformers. A quantize="int8"
    model is saved as it is held (int8 weights + `weight_scale` per output channel, config.json marked
    with a quantization_config): `paligemma.load` reads it back as is; transformers cannot use it (it warns of
    an unknown quantization type and unexpected `weight_scale` tensors).

    All or nothing (`atomic.py`): every file is written to a staging directory first and the whole set
    swapped in at the end, so a failed save (full disk, no permission, ...) raises `atomic.SaveError`
    and leaves the previous checkpoint in `directory` loadable and unchanged. Weights with a NaN or an
    infinity are refused (`InputError`) before anything is written."""
    from .lora import has_lora

    if has_lora(model):  # its state_dict names base_layer / lora_A tensors no loader reads
        raise CheckpointError("the model holds LoRA layers: save the adapter with lora.save_adapter, or fold it in "
                              "with lora.merge_lora before saving the full model")
    _check_finite_model(model)
    config = copy.copy(model.config)
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.quantization = "int8" if weight_format(model) == "int8" else None
    gen = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
           "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_id}
    with atomic_files(directory, _weight_set) as stage:
        _write_shards(((hub_key(n), p) for n, p in model.state_dict().items()), stage, max_shard_bytes)
        config.save(stage / "config.json")
        (stage / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        if processor is not None:
            processor.save_pretrained(stage)
    model.config.dtype, model.config.quantization = config.dtype, config.quantization


@torch.no_grad()
def _check_finite_model(model: torch.nn.Module) -> None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            raise InputError(f"the model's {name} holds NaN or infinite values; refusing to save non-finite "
                             "weights (training diverged? lower the learning rate)")
