"""Reading checkpoints: model references (local path or Hub id) and lazy, tensor-at-a-time reading.

The shard headers are parsed once; each tensor is then read on demand with ``pread`` into a
fresh buffer that is freed when the caller drops it. We deliberately do not keep the shards
memory-mapped: pages of a mapping count towards the process's resident set until it is unmapped,
so a mapped 16 GB model looks (and, under cgroup limits, is charged) like 16 GB of memory by the
end of a pass. ``pread`` keeps peak memory at the size of the tensors in flight.

Model files are never unpickled: a checkpoint with only ``.bin``/``.pt`` weights is refused with
instructions for converting it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from deltamoe.errors import CheckpointError
from deltamoe.io.format import CONFIG_NAME, INDEX_NAME, TOKENIZER_FILES, TensorInfo, TensorSpec, parse_shard, torch_dtype
from deltamoe.preflight import broken_link_message, is_broken_link

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_ref(spec: str | os.PathLike[str], base_dir: Path | None = None) -> tuple[str, Path | str]:
    """Classify a model argument without fetching anything: ``("local", path)`` or ``("hub", repo_id)``.

    The rule: a path that exists (relative to ``base_dir`` first, then to the working directory)
    is local. ``hf://owner/name`` is always a Hub id. Otherwise the text is a Hub id only if it is
    exactly ``owner/name``, does not start with ``.``, ``/`` or ``~``, and ``owner`` is not a local
    directory (then it is a mistyped local path). A symbolic link that loops or dangles is an error.
    """
    text = str(spec)
    if text.startswith("hf://"):
        return "hub", text[5:]
    cands = [Path(text).expanduser()]
    if base_dir is not None and not cands[0].is_absolute():
        cands.insert(0, base_dir / cands[0])
    for c in cands:
        if is_broken_link(c):
            raise CheckpointError(broken_link_message(c))
        if c.exists():
            return "local", c
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such directory (and it is not a Hugging Face Hub id)")
    owner = next((c.parent for c in cands if c.parent.is_dir()), None)
    if owner is not None:
        raise CheckpointError(
            f"{text}: no such directory. {owner} exists locally, so this is taken as a mistyped local path, "
            f"not as a Hugging Face Hub id; check the path, or write hf://{text} to fetch it from the Hub"
        )
    return "hub", text


def resolve_model(spec: str | os.PathLike[str], base_dir: Path | None = None) -> Path:
    """Turn a local path or a Hugging Face Hub id (see :func:`model_ref`) into a local directory.

    Hub ids are fetched with ``huggingface_hub`` (config, safetensors and tokenizer files only).
    """
    kind, ref = model_ref(spec, base_dir)
    if kind == "local":
        return Path(ref)
    text = str(ref)
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", INDEX_NAME, *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=patterns))
    except Exception as e:  # hub errors have many types: offline, DNS, auth, 404
        raise CheckpointError(
            f"{text}: there is no local directory of that name, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Check the path; without network access, download the model elsewhere "
            f"(safetensors, config and tokenizer files) and pass its local path."
        ) from None


class Checkpoint:
    """A Hugging Face checkpoint directory opened for lazy, tensor-at-a-time reading.

    Only the headers are read on opening; :meth:`read` loads one tensor.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        cfg_path = self.path / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{self.path}: missing {CONFIG_NAME}; a Hugging Face checkpoint directory needs one"
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object")
        self.shard_files = self._find_shards()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shard_files:
            for name, info in parse_shard(shard).items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is stored twice "
                        f"({self.tensors[name].file.name} and {shard.name})"
                    )
                self.tensors[name] = info
        self._check_index()

    def _find_shards(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.path / name).is_file():
                    raise CheckpointError(f"{index}: lists shard {name}, which does not exist")
            return [self.path / f for f in files]
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{self.path}: only pickle weights found ({', '.join(pickled)}). deltamoe never "
                "unpickles model files, because unpickling can run arbitrary code. If you trust the "
                "file, convert it once with: python -c \"from transformers import "
                "AutoModelForCausalLM as M; M.from_pretrained('IN').save_pretrained('OUT')\" "
                "(save_pretrained writes safetensors), then pass OUT."
            )
        raise CheckpointError(f"{self.path}: no *.safetensors weights found")

    def _check_index(self) -> None:
        index = self.path / INDEX_NAME
        if not index.is_file():
            return
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise CheckpointError(f"{index}: says tensor {name!r} is in {file}, but it is not there")
        extra = sorted(set(self.tensors) - set(weight_map))
        if extra:
            raise CheckpointError(f"{index}: shards hold tensors missing from the index: {extra[:5]}")

    # -- reading -----------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> TensorSpec:
        try:
            return self.tensors[name].spec
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor into a new CPU buffer (owned by the caller)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        spec = info.spec
        buf = torch.empty(spec.nbytes, dtype=torch.uint8)
        if spec.nbytes:
            view = memoryview(buf.numpy())
            done = 0
            with open(info.file, "rb", buffering=0) as f:
                fd = f.fileno()
                while done < spec.nbytes:
                    n = os.preadv(fd, [view[done:]], info.offset + done)
                    if n <= 0:
                        raise CheckpointError(f"{info.file}: unexpected end of file reading {name!r}")
                    done += n
        return buf.view(torch_dtype(spec.dtype)).reshape(spec.shape)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.spec.nbytes for t in self.tensors.values()), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors.values())

    def aux_files(self) -> list[Path]:
        """Tokenizer, chat-template and generation-config files present in the directory."""
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


def open_checkpoint(spec: str | os.PathLike[str]) -> Checkpoint:
    """Open a local checkpoint directory or a Hub id (see :func:`resolve_model`)."""
    return Checkpoint(resolve_model(spec))


