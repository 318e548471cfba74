"""What a `DiffusersChain` holds besides its step math: the peft LoRA and the model's files.

The step math (scheduler-derived mean, std, score) lives in `rlft.models.diffusers_chain`; `DiffusersChain`
inherits the two mixins here:

- `LoRAMixin`: attach, switch, merge a peft LoRA, and the control it defines. The convention (DESIGN.md "A
  fine-tuned sampler is a model"): `mean()` is ALWAYS the pretrained (base) mean, whatever the adapter holds;
  `lora_mean()` is the fine-tuned mean (adapter on); `lora_control()` is the control
  delta_k = mean_lora(k, x) - mean_base(k, x), so `rlft.sampling.sample(chain, n, control=chain.lora_control())`
  samples the fine-tuned model, the per-step KL is |delta_k|^2 / (2 s_k^2), and
  `ControlledChain(chain, chain.lora_control())` is the fine-tuned model as a model.
  Adapters are saved through `rlft.checkpoint`: ``rlft.json`` (format ``rlft-lora``, version 2, the `LoRAConfig`)
  + ``lora.safetensors``; adapters of earlier releases (``lora_config.json``, version 1) still load.
- `PretrainedFilesMixin`: the pretrained model's directories (``unet/`` + ``scheduler/``, diffusers' own format,
  locally or by hub id) and a random UNet from configs, for tests and benchmarks.

Pinned against peft 0.21 (`_disable_adapters`, `merge`, `get_base_layer`) and diffusers 0.42.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

import rlft.checkpoint as checkpoint

#: LoRA targets tried by default (those present in the UNet are used): attention projections and resnet convs.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
LORA_WEIGHTS_FILE = "lora.safetensors"
LORA_STATE_FILE = checkpoint.STATE_FILE
#: the state file of format version 1 (read as legacy)
LORA_CONFIG_FILE = "lora_config.json"
LORA_FORMAT = "rlft-lora"
LORA_FORMAT_VERSION = 2
ADAPTER = "default"
SCHEDULERS = ("ddpm", "ddim")
_UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoRAConfig:
    """Shape of a LoRA adapter on a UNet (what `add_lora` takes and what a saved adapter records)."""

    rank: int = 4
    """LoRA rank r >= 1."""
    lora_alpha: float | None = None
    """Scale numerator (scale = lora_alpha / rank); None means rank (scale 1)."""
    target_modules: tuple[str, ...] | None = None
    """Module-name suffixes to adapt; None: those of `DEFAULT_LORA_TARGETS` present in the UNet."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1 (got {self.rank!r}); e.g. rank=4")
        if self.lora_alpha is not None:
            if not float(self.lora_alpha) > 0:
                raise ValueError(f"lora_alpha must be > 0 (got {self.lora_alpha!r}); leave it out for lora_alpha = rank")
            object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not self.target_modules:
                raise ValueError(f"target_modules must be a non-empty list of module names (got {self.target_modules!r})")
            object.__setattr__(self, "target_modules", tuple(str(t) for t in self.target_modules))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able mapping (`add_lora(**cfg.to_dict())` attaches this adapter)."""
        targets = list(self.target_modules) if self.target_modules is not None else None
        return {"rank": self.rank, "lora_alpha": self.lora_alpha, "target_modules": targets}

    @staticmethod
    def from_dict(data: dict[str, Any], path: str = "lora") -> "LoRAConfig":
        """The config a mapping describes; unknown keys and bad values name `path`."""
        from rlft.config import from_dict

        return from_dict(LoRAConfig, dict(data), path)


class LoRAMixin:
    """LoRA methods of `DiffusersChain`. The chain provides `unet`, `device`, `dtype`, `_mean(k, x, cond)` (the
    step math with whatever adapters are on), `_shared_mean` and the `_shared` one-call cache, and sets
    `lora_config = None` at construction."""

    unet: Any
    lora_config: LoRAConfig | None

    @property
    def has_lora(self) -> bool:
        return self.lora_config is not None

    def _lora_layers(self) -> list[torch.nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]

    @contextmanager
    def _adapters_enabled(self, enabled: bool) -> Iterator[None]:
        """Switches the LoRA on/off without touching requires_grad (peft's enable_adapters would)."""
        if not self.has_lora:
            yield
            return
        layers = self._lora_layers()
        before = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = not enabled  # what peft's `disable_adapters` property reads (peft 0.21)
        try:
            yield
        finally:
            for layer, b in zip(layers, before):
                layer._disable_adapters = b

    def add_lora(
        self,
        rank: int = 4,
        lora_alpha: float | None = None,
        target_modules: list[str] | tuple[str, ...] | None = None,
        seed: int | None = None,
    ) -> list[torch.nn.Parameter]:
        """Attaches a peft LoRA (B = 0, so delta = 0 at first) to the UNet and returns its trainable parameters.

        Args:
            rank, lora_alpha, target_modules: the adapter's `LoRAConfig` (`add_lora(**cfg.to_dict())`).
            seed: seeds the random init of the A matrices (global RNG untouched); None uses the global RNG.
        """
        from peft import LoraConfig, inject_adapter_in_model

        if self.has_lora:
            raise ValueError("this chain already has a LoRA; call merge_lora() first or load weights with load_lora()")
        wanted = LoRAConfig(rank, lora_alpha, target_modules)
        names = [n for n, _ in self.unet.named_modules()]

        def present(t: str) -> bool:
            return any(n == t or n.endswith("." + t) for n in names)

        if wanted.target_modules is None:
            targets = [t for t in DEFAULT_LORA_TARGETS if present(t)]
            if not targets:
                raise ValueError(
                    f"none of the default LoRA targets {DEFAULT_LORA_TARGETS} exist in this UNet; pass target_modules"
                )
        else:
            targets = list(wanted.target_modules)
            missing = [t for t in targets if not present(t)]
            if missing:
                raise ValueError(f"target_modules {missing} match no module of the UNet; e.g. {list(DEFAULT_LORA_TARGETS)}")
        config = LoRAConfig(rank, float(rank if lora_alpha is None else lora_alpha), tuple(targets))
        peft_config = LoraConfig(r=rank, lora_alpha=config.lora_alpha, target_modules=targets, init_lora_weights=True)
        if seed is None:
            inject_adapter_in_model(peft_config, self.unet, adapter_name=ADAPTER)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                inject_adapter_in_model(peft_config, self.unet, adapter_name=ADAPTER)
        torch.nn.Module.to(self.unet, device=self.device, dtype=self.dtype)
        self.lora_config = config
        self._shared = None
        return self.lora_parameters()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA's parameters (what an optimiser updates); empty without a LoRA."""
        return [p for n, p in self.unet.named_parameters() if "lora_" in n]

    def lora_mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The fine-tuned transition mean (LoRA on), differentiable in x and the LoRA parameters."""
        if not self.has_lora:
            raise ValueError("lora_mean needs a LoRA: call add_lora() or load_lora() first")
        with self._adapters_enabled(True):
            return self._mean(k, x, cond)

    def lora_control(self) -> "LoRAControl":
        """The control delta_k = lora_mean - mean (a `rlft.sampling.Control`)."""
        if not self.has_lora:
            raise ValueError("lora_control needs a LoRA: call add_lora() or load_lora() first")
        return LoRAControl(self)

    def save_lora(self, directory: str | os.PathLike) -> Path:
        """Writes the adapter weights and its `LoRAConfig` to `directory` through `rlft.checkpoint` (atomic per file)."""
        if not self.has_lora:
            raise ValueError("save_lora needs a LoRA: call add_lora() first")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {n: p for n, p in self.unet.named_parameters() if "lora_" in n}
        checkpoint.save_tensors(out / LORA_WEIGHTS_FILE, state, metadata={"format": LORA_FORMAT})
        meta = {"unet_class": type(self.unet).__name__, **self.lora_config.to_dict()}
        checkpoint.write_state(out, LORA_FORMAT, LORA_FORMAT_VERSION, meta, name=LORA_STATE_FILE)
        return out

    def load_lora(self, directory: str | os.PathLike) -> list[torch.nn.Parameter]:
        """Loads an adapter written by `save_lora`, any format version (adding the LoRA if the chain has none);
        returns its parameters."""
        src = Path(directory)
        has_state = any((src / n).is_file() for n in (LORA_STATE_FILE, LORA_CONFIG_FILE))
        if not has_state or not (src / LORA_WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{src} holds no LoRA: expected {LORA_STATE_FILE} (or {LORA_CONFIG_FILE} of rlft releases before the "
                f"checkpoint module) and {LORA_WEIGHTS_FILE} written by save_lora"
            )
        meta = checkpoint.read_state(src, LORA_FORMAT, LORA_FORMAT_VERSION, name=LORA_STATE_FILE, legacy={LORA_CONFIG_FILE: 1})
        config = LoRAConfig(int(meta["rank"]), float(meta["lora_alpha"]), tuple(meta["target_modules"]))
        if not self.has_lora:
            self.add_lora(**config.to_dict())
        elif self.lora_config != config:
            raise ValueError(
                f"the chain's LoRA {self.lora_config} differs from the saved one {config}; load into a chain without a LoRA"
            )
        state = checkpoint.load_tensors(src / LORA_WEIGHTS_FILE)
        own = {n for n, _ in self.unet.named_parameters() if "lora_" in n}
        if set(state) != own:
            diff = sorted(set(state) ^ own)[:5]
            raise ValueError(f"{src / LORA_WEIGHTS_FILE} does not fit this UNet's LoRA (mismatched keys, e.g. {diff})")
        self.unet.load_state_dict(state, strict=False)
        self._shared = None
        return self.lora_parameters()

    def merge_lora(self) -> None:
        """Folds the LoRA into the UNet's weights and removes it: the fine-tuned model becomes the pretrained one."""
        if not self.has_lora:
            raise ValueError("merge_lora needs a LoRA: call add_lora() or load_lora() first")
        lora = {id(m) for m in self._lora_layers()}
        for name, module in list(self.unet.named_modules()):
            if id(module) in lora:
                module._disable_adapters = False
                module.merge(adapter_names=[ADAPTER])
                parent_name, _, child = name.rpartition(".")
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                setattr(parent, child, module.get_base_layer())
        if hasattr(self.unet, "peft_config"):
            del self.unet.peft_config
        self.unet.requires_grad_(False)
        self.lora_config = None
        self._shared = None

    def base_unet(self) -> Any:
        """The UNet without its LoRA (itself when there is none), e.g. to save the pretrained model."""
        if not self.has_lora:
            return self.unet
        state = {
            n.replace(".base_layer", ""): t for n, t in self.unet.state_dict().items() if "lora_" not in n
        }
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the global RNG alone
            base = type(self.unet).from_config(self.unet.config)
        base.load_state_dict(state, strict=True)
        return base


class PretrainedFilesMixin:
    """Loading and saving the pretrained model of `DiffusersChain` (its constructor takes (unet, scheduler,
    num_steps, eta=, cond_seq_len=); `base_unet()` comes from `LoRAMixin`)."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes the pretrained (base) UNet to `directory/unet` and the scheduler config to `directory/scheduler`.

        A LoRA is not saved here (use `save_lora`, or `merge_lora` first to save the fine-tuned model).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.base_unet().save_pretrained(out / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(out / "scheduler")
        return out

    @classmethod
    def from_config(
        cls,
        unet_config: dict[str, Any],
        scheduler_config: dict[str, Any] | None = None,
        num_steps: int = 50,
        scheduler: Literal["ddpm", "ddim"] = "ddpm",
        eta: float = 1.0,
        cond_seq_len: int = 77,
        seed: int | None = None,
    ) -> Any:
        """A randomly initialised UNet (class from `_class_name`, default UNet2DModel) and a scheduler from configs.

        Args:
            unet_config: keyword arguments of the UNet class (keys starting with "_" are ignored).
            scheduler_config: keyword arguments of the scheduler (None: diffusers' defaults).
            num_steps, scheduler, eta, cond_seq_len: as in the constructor / `from_pretrained`.
            seed: seeds the UNet's random init (global RNG untouched); None draws from the global RNG.
        """
        unet_cls = _unet_class(unet_config.get("_class_name", "UNet2DModel"), "unet_config['_class_name']")
        config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        if seed is None:
            unet = unet_cls.from_config(config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                unet = unet_cls.from_config(config)
        sched = _scheduler_class(scheduler).from_config(dict(scheduler_config or {}))
        return cls(unet, sched, num_steps, eta=eta, cond_seq_len=cond_seq_len)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        num_steps: int,
        scheduler: Literal["ddpm", "ddim"] = "ddpm",
        eta: float = 1.0,
        subfolder_unet: str = "unet",
        subfolder_scheduler: str = "scheduler",
        cond_seq_len: int = 77,
    ) -> Any:
        """Loads `path/subfolder_unet` and `path/subfolder_scheduler` (a local directory, or a hub id with network).

        Args:
            path: a local directory written by `save_pretrained` / a diffusers pipeline, or "owner/name" on the hub.
            num_steps: K.
            scheduler: which scheduler's transitions the chain uses ("ddpm" or "ddim"; the saved config is reused).
            eta: DDIM stochasticity in (0, 1].
        """
        sched_cls = _scheduler_class(scheduler)
        text = os.fspath(path)
        local = Path(text).expanduser()
        if local.is_dir():
            for sub, name in ((subfolder_unet, "config.json"), (subfolder_scheduler, "scheduler_config.json")):
                if not (local / sub / name).is_file():
                    raise FileNotFoundError(
                        f"{local / sub / name} does not exist: a diffusers model directory needs {subfolder_unet}/ and "
                        f"{subfolder_scheduler}/ subfolders (as DiffusersChain.save_pretrained writes them)"
                    )
            source, is_local = str(local), True
        elif _HUB_ID.match(text):
            source, is_local = text, False  # diffusers downloads (or reads its cache); errors are explained below
        else:
            raise FileNotFoundError(
                f"model path {text!r} is not a local directory (resolved to {local.resolve()}); give a directory with "
                f"{subfolder_unet}/ and {subfolder_scheduler}/ (see `python -m rlft.tasks.digits_unet --out DIR`), or a hub id "
                "'owner/name' where the network allows hub downloads"
            )
        try:
            config = UNet2DModel.load_config(source, subfolder=subfolder_unet)
            unet_cls = _unet_class(config.get("_class_name", "UNet2DModel"), f"{source}/{subfolder_unet}/config.json")
            unet = unet_cls.from_pretrained(source, subfolder=subfolder_unet)
            sched = sched_cls.from_pretrained(source, subfolder=subfolder_scheduler)
        except (OSError, ValueError) as err:
            if is_local:
                raise
            raise FileNotFoundError(
                f"model path {text!r} is not a local directory and loading it as a hub id failed ({err}); "
                "hub downloads need network access (and no HF_HUB_OFFLINE=1): download the model elsewhere and pass "
                "its directory"
            ) from err
        return cls(unet, sched, num_steps, eta=eta, cond_seq_len=cond_seq_len)


class LoRAControl:
    """delta_k(x) = mean_lora(k, x) - mean_base(k, x): the fine-tuned chain as a control of the pretrained one."""

    def __init__(self, chain: LoRAMixin) -> None:
        self.chain = chain

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        base = self.chain._shared_mean(k, x, cond)  # the transition that follows reuses it
        return self.chain.lora_mean(k, x, cond) - base

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.chain.lora_parameters()


def _unet_class(name: str, where: str) -> type:
    if name not in _UNET_CLASSES:
        raise ValueError(f"{where} is {name!r}; supported UNets: {sorted(_UNET_CLASSES)}")
    return _UNET_CLASSES[name]


def _scheduler_class(name: str) -> type:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS} (got {name!r})")
    return DDPMScheduler if name == "ddpm" else DDIMScheduler
