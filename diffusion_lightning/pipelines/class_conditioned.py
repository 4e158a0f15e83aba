"""Class-conditioned image generation with classifier-free guidance, as a diffusers pipeline.

This module imports nothing but torch, NumPy, PIL and diffusers: an exported pipeline folder carries a
copy of it as ``pipeline.py``, so the folder also loads where only diffusers is installed, the way
diffusers loads custom pipelines::

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)

A UNet class of the package (``ClassConditionedUnet``) travels the same way, as its module in the
``unet`` folder (diffusers' convention for custom components); where the package is installed, the
installed class is used instead (:data:`INSTALLED_COMPONENTS`) and no code of the folder runs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")
#: Component classes installed with this module, by the ``[module, class]`` entry that an exported
#: ``model_index.json`` records for a component whose module the folder carries (``unet/<module>.py``):
#: :meth:`ClassConditionedPipeline.from_pretrained` builds such a component with the installed class.
INSTALLED_COMPONENTS: dict[tuple[str, str], type] = {}
#: ``from_pretrained`` arguments that also apply to reading ``model_index.json`` and one model.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
_MODEL_KWARGS = (*_HUB_KWARGS, "variant", "use_safetensors", "low_cpu_mem_usage")
#: Pixels between the images of a grid (white), as in the package's other grids.
GRID_PADDING = 2


def num_classes_of(unet: Any) -> int:
    """Number of real classes a class-conditioned network was built for (null class excluded)."""
    config = unet.config
    if "num_classes" in config:
        return int(config["num_classes"])
    embeds = config.get("num_class_embeds")
    if not embeds:
        raise ValueError(
            f"{type(unet).__name__} has no class embedding (num_class_embeds={embeds!r}); "
            "build it with num_class_embeds = classes + 1."
        )
    return int(embeds) - 1


def _make_grid(images: torch.Tensor, nrow: int, padding: int = GRID_PADDING) -> torch.Tensor:
    """Tile ``(B, C, H, W)`` images in ``[0, 1]`` into a ``(C, H', W')`` grid on white, ``nrow`` per row."""
    images = images.float().clamp(0, 1)
    count, channels, height, width = images.shape
    if count == 1:  # one image is its own grid, unpadded
        return images[0]
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for k, image in enumerate(images):
        top, left = (k // columns) * (height + padding) + padding, (k % columns) * (width + padding) + padding
        grid[:, top : top + height, left : left + width] = image
    return grid


def _label_grid(grid: torch.Tensor, row_labels: Sequence[str] | None, scale: int = 1) -> PIL.Image.Image:
    """The grid as an RGB PIL image, upscaled by ``scale`` and with a label left of each row."""
    if scale < 1:
        raise ValueError(f"scale={scale!r} must be >= 1.")
    arr = (grid.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    image = PIL.Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else PIL.Image.fromarray(arr.transpose(1, 2, 0))
    image = image.convert("RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)
    if not row_labels:
        return image
    font = PIL.ImageFont.load_default()
    margin = 8 + max(int(PIL.ImageDraw.Draw(image).textlength(str(label), font=font)) for label in row_labels)
    canvas = PIL.Image.new("RGB", (image.width + margin, image.height), "white")
    canvas.paste(image, (margin, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    row_height = (image.height - GRID_PADDING * scale) / len(row_labels)
    for r, label in enumerate(row_labels):
        draw.text(
            (4, GRID_PADDING * scale + r * row_height + row_height / 2),
            str(label),
            fill="black",
            font=font,
            anchor="lm",
        )
    return canvas


def _is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _preview(tensor: torch.Tensor, limit: int = 8) -> str:
    """The first ``limit`` values of ``tensor``, for error messages."""
    values = tensor.detach().flatten()[:limit].tolist()
    return f"{values}{' ...' if tensor.numel() > limit else ''}"


@dataclass
class ClassConditionedPipelineOutput(BaseOutput):
    """Output of :class:`ClassConditionedPipeline`.

    Args:
        images: PIL images, a ``(B, H, W, C)`` array or a ``(B, C, H, W)`` tensor, in ``[0, 1]``.
        class_labels: The class of each image, a ``(B,)`` long tensor.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    class_labels: torch.Tensor


@dataclass
class ClassGridOutput(BaseOutput):
    """Output of :meth:`ClassConditionedPipeline.generate_grid`.

    Args:
        grid: The grid as a ``(C, H, W)`` tensor in ``[0, 1]``, one row per class.
        pil_grid: The same grid as a PIL image, rows labelled with their class.
        images: The individual images, ``(B, C, H, W)`` in ``[0, 1]``, row-major.
        class_labels: The class of each image.
    """

    grid: torch.Tensor
    pil_grid: PIL.Image.Image
    images: torch.Tensor
    class_labels: torch.Tensor


class ClassConditionedPipeline(DiffusionPipeline):
    """Generate images of given classes with a class-conditioned UNet and any diffusers scheduler.

    The UNet is either a plain ``UNet2DModel`` with ``num_class_embeds = classes + 1`` or a
    :class:`~diffusion_lightning.ClassConditionedUnet`; in both, label ``num_classes`` is the null
    class that classifier-free guidance uses for the unconditional prediction.

    ``guidance_scale`` follows the diffusers convention: ``1`` is the plain conditional model, ``0``
    the unconditional one, and ``s > 1`` extrapolates ``eps_u + s * (eps_c - eps_u)``; for
    ``s`` not in ``{0, 1}`` both predictions come from one batched forward of ``2B`` samples.

    Args:
        unet: The class-conditioned denoiser.
        scheduler: Any diffusers scheduler (DDPM, DDIM, DPMSolverMultistep, Euler, ...); swap it with
            ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.
        class_names: Optional names of the classes, used to label grids.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "noise_pred", "pred_original_sample"]

    def __init__(self, unet, scheduler, class_names: list[str] | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if class_names is not None and unet is not None and len(class_names) != num_classes_of(unet):
            raise ValueError(
                f"class_names has {len(class_names)} entries but the unet has {num_classes_of(unet)} classes."
            )
        self.register_to_config(class_names=list(class_names) if class_names is not None else None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``, with an installed class for a UNet the folder carries as code.

        When ``model_index.json`` names the UNet ``[module, class]`` of :data:`INSTALLED_COMPONENTS`
        (a folder with ``unet/<module>.py``), the UNet is built with the installed class, so the
        folder loads without ``trust_remote_code`` and its code is not run. Otherwise, as diffusers.
        """
        installed = None
        if "unet" not in kwargs and INSTALLED_COMPONENTS:
            index = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
            entry = index.get("unet")
            if isinstance(entry, (list, tuple)) and len(entry) == 2:
                installed = INSTALLED_COMPONENTS.get((entry[0], entry[1]))
        if installed is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        options = {k: kwargs[k] for k in _MODEL_KWARGS if k in kwargs}
        dtype = kwargs.get("torch_dtype")
        if isinstance(dtype, dict):
            dtype = dtype.get("unet", dtype.get("default"))
        if dtype is not None:
            options["torch_dtype"] = dtype
        unet = installed.from_pretrained(pretrained_model_name_or_path, subfolder="unet", **options)
        pipeline = super().from_pretrained(pretrained_model_name_or_path, unet=None, **kwargs)
        pipeline.register_modules(unet=unet)
        return pipeline

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null class excluded)."""
        return num_classes_of(self.unet)

    def class_label_tensor(
        self, class_labels: int | Sequence[int] | torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """Validate ``class_labels`` and return them as a ``(B,)`` long tensor.

        Nothing is cast before it is checked: an int (not a bool), a list or tuple of such ints, or a
        1-D tensor of an integer dtype are accepted; floats, bools, strings and tensors of another
        rank are rejected rather than rounded or flattened.

        Raises:
            ValueError: Naming ``class_labels`` (or ``batch_size``), the value and what is accepted.
        """
        if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive int or None.")
        accepted = "an int, a list of ints or a 1-D integer tensor"
        if _is_int(class_labels):
            labels = torch.full((batch_size or 1,), int(class_labels), dtype=torch.long)
        elif isinstance(class_labels, torch.Tensor):
            if class_labels.dtype == torch.bool or class_labels.dtype.is_floating_point or class_labels.is_complex():
                raise ValueError(
                    f"class_labels is a tensor of dtype {class_labels.dtype} ({_preview(class_labels)}); "
                    f"accepted: {accepted} (dtype int64, int32, ...)."
                )
            if class_labels.dim() != 1:
                raise ValueError(
                    f"class_labels is a {class_labels.dim()}-D tensor of shape {tuple(class_labels.shape)}; "
                    f"accepted: {accepted} of shape (B,)."
                )
            labels = class_labels.detach().to(device="cpu", dtype=torch.long)
        elif isinstance(class_labels, Sequence) and not isinstance(class_labels, (str, bytes)):
            if not all(_is_int(c) for c in class_labels):
                raise ValueError(f"class_labels={list(class_labels)!r} must hold ints only; accepted: {accepted}.")
            labels = torch.tensor([int(c) for c in class_labels], dtype=torch.long)
        else:
            raise ValueError(f"class_labels={class_labels!r} is not accepted; give {accepted}.")
        if labels.numel() == 0:
            raise ValueError("class_labels is empty; give at least one class.")
        if batch_size is not None and labels.numel() != batch_size:
            raise ValueError(
                f"class_labels has {labels.numel()} entries but batch_size={batch_size}; "
                "give batch_size=None or a matching number of labels."
            )
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(
                f"class_labels contains {sorted(set(bad.tolist()))}; accepted classes are 0..{self.num_classes - 1}."
            )
        return labels

    def _extra_step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, eta: float
    ) -> dict[str, Any]:
        """``generator`` and ``eta`` for schedulers whose ``step`` takes them.

        A list of generators goes to the scheduler as it is: stochastic schedulers draw their step
        noise with ``randn_tensor``, which takes sample ``i``'s noise from ``generator[i]``.
        """
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = eta
        return kwargs

    def _check_call_arguments(
        self,
        num_inference_steps: Any,
        guidance_scale: Any,
        output_type: Any,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        """The checks of :meth:`__call__` that need neither the labels nor the model."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; expected one of {list(OUTPUT_TYPES)}.")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0 (1 disables guidance).")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int.")
        train_steps = getattr(self.scheduler.config, "num_train_timesteps", None)
        if train_steps is not None and num_inference_steps > train_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} exceeds the scheduler's num_train_timesteps={train_steps}; "
                f"give at most {train_steps} steps."
            )
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {sorted(unknown)}; accepted: {self._callback_tensor_inputs}."
            )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, torch.Tensor]], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ClassConditionedPipelineOutput | tuple:
        """Generate one image per class label.

        Args:
            class_labels: An int (repeated ``batch_size`` times, default once), a list of ints or a
                1-D tensor of classes in ``0..num_classes-1``.
            batch_size: Number of images; must match the labels' length when they are a list.
            num_inference_steps: Denoising steps of the scheduler.
            guidance_scale: Classifier-free guidance scale, ``>= 0`` (1 = no guidance).
            generator: A torch generator for reproducible noise, or a list of one generator per image:
                image ``i`` then draws its initial noise and every step's noise from ``generator[i]``,
                so it is the same whatever the other images of the batch.
            output_type: ``pil`` (list of images), ``np`` (``B, H, W, C`` array) or ``pt`` (``B, C, H, W``).
            return_dict: Return a :class:`ClassConditionedPipelineOutput` rather than a tuple.
            latents: Initial noise of shape ``(B, C, H, W)``; drawn from ``generator`` when omitted.
            eta: DDIM's eta (ignored by schedulers without it).
            callback_on_step_end: Called after every step as ``fn(pipe, i, t, tensors)`` with the
                tensors named in ``callback_on_step_end_tensor_inputs``; a returned ``latents``
                replaces the current sample.
            callback_on_step_end_tensor_inputs: Names from ``latents``, ``noise_pred``,
                ``pred_original_sample``.
        """
        self._check_call_arguments(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        labels = self.class_label_tensor(class_labels, batch_size)
        device = self._execution_device
        batch = labels.numel()
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {batch} images; give one generator per "
                "image (or a single generator)."
            )
        config = self.unet.config
        shape = (batch, config.out_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}, expected {shape}.")
        # flow-matching schedulers start from unit noise and have no input scaling
        latents = latents.to(device=device, dtype=self.unet.dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

        labels = labels.to(device)
        null = torch.full_like(labels, self.num_classes)
        if guidance_scale == 1.0:
            model_labels = labels
        elif guidance_scale == 0.0:
            model_labels = null
        else:
            model_labels = torch.cat([null, labels])
        do_cfg = model_labels.numel() == 2 * batch

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self._extra_step_kwargs(generator, eta)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, class_labels=model_labels).sample
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            step = self.scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = step.prev_sample
            if callback_on_step_end is not None:
                tensors = {
                    "latents": latents,
                    "noise_pred": noise_pred,
                    "pred_original_sample": getattr(step, "pred_original_sample", None),
                }
                chosen = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, i, t, chosen) or {}
                latents = returned.get("latents", latents)

        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        labels = labels.cpu()
        if output_type == "pt":
            out: Any = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            out = arr if output_type == "np" else self.numpy_to_pil(arr)
        if not return_dict:
            return (out, labels)
        return ClassConditionedPipelineOutput(images=out, class_labels=labels)

    @torch.no_grad()
    def generate_grid(
        self,
        num_per_class: int = 8,
        classes: Sequence[int] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int | None = None,
        scale: int = 2,
        label_rows: bool = True,
    ) -> ClassGridOutput:
        """A grid with one row per class and ``num_per_class`` samples per row.

        Args:
            num_per_class: Columns of the grid.
            classes: Rows, in order (default: every class): a list of ints or a 1-D integer tensor.
            num_inference_steps: Denoising steps.
            guidance_scale: Classifier-free guidance scale.
            generator: A torch generator for reproducible grids, or one generator per image (row-major), which
                makes every image independent of ``batch_size``.
            batch_size: Images per forward pass (default: the whole grid at once).
            scale: Integer upscaling of the PIL grid (nearest neighbour), for small images.
            label_rows: Write each row's class (or class name) left of it in the PIL grid.
        """
        if num_per_class < 1:
            raise ValueError(f"num_per_class={num_per_class!r} must be >= 1.")
        row_labels = self.class_label_tensor(list(range(self.num_classes)) if classes is None else classes)
        rows = row_labels.tolist()
        labels = row_labels.repeat_interleave(num_per_class)
        if isinstance(generator, list) and len(generator) != labels.numel():
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {labels.numel()} images "
                f"({len(rows)} classes x {num_per_class}); give one generator per image (or a single generator)."
            )
        chunk = batch_size or labels.numel()
        parts = [
            self(
                labels[i : i + chunk],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator[i : i + chunk] if isinstance(generator, list) else generator,
                output_type="pt",
            ).images.cpu()
            for i in range(0, labels.numel(), chunk)
        ]
        images = torch.cat(parts)
        grid = _make_grid(images, nrow=num_per_class)
        names = self.config.get("class_names") or [str(c) for c in range(self.num_classes)]
        pil = _label_grid(grid, [names[c] for c in rows] if label_rows else None, scale=scale)
        return ClassGridOutput(grid=grid, pil_grid=pil, images=images, class_labels=labels)
