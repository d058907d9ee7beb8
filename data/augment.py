"""Random views of a batch on the batch's own device, each image with its own random parameters.

`BatchAugment` is the hot path of training: a whole (B, C, H, W) uint8 batch is augmented with a few
batched tensor ops instead of B calls into per-image transforms.

* Geometry, one `grid_sample` pass: random resized crop, horizontal flip, random affine (rotation,
  translation, x-shear about the centre) and the elastic displacement field compose into one sampling
  grid on the original image (bilinear). Samples are clamped to the crop box (as resizing the cropped
  image does), and areas that the affine/elastic step moves in from outside the crop are black
  (fill 0, as torchvision's fill=None). With the image at its native size this equals torchvision's
  resized_crop / horizontal_flip / affine / elastic applied in turn, up to the one interpolation
  instead of several.
* Colour, in this fixed order (torchvision's ColorJitter picks a random order per image): brightness,
  contrast, saturation, hue, each with torchvision's definition (`adjust_*`); then grayscale
  (0.2989 R + 0.587 G + 0.114 B), Gaussian blur (reflect padding, per-image sigma), solarize
  (x >= 0.5 -> 1 - x), normalise. On 1-channel images saturation, hue and grayscale do nothing.

All randomness comes from the `torch.Generator` passed to `forward` (on the images' device), so a
seed reproduces the views. `build_sample_transform` is the per-sample torchvision.transforms.v2
pipeline with the same parameters (for the workers loader and as a benchmark baseline), and
`EvalTransform` the deterministic test-time path.

SCAN's strong views add two per-sample steps that only the per-sample pipeline has (the workers
loader): `augment.strong_ops` random ops at random magnitudes (`RandomStrongOps`, after the geometry,
on uint8 pixels) and Cutout (`Cutout`, one square hole after normalising).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from data.config import AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SOLARIZE_THRESHOLD = 0.5
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 times, then falls back to a centre crop


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side (3 at 32 px, 9 at 96 px, 23 at 224 px)."""
    k = int(0.1 * image_size)
    return max(3, k if k % 2 else k + 1)


@dataclass
class AugmentParams:
    """Per-image parameters of one view of a batch of B images (all tensors on the batch's device).

    crop: (B, 4) top, left, height, width of the crop box in input pixels. flip: (B,) bool.
    angle: (B,) degrees, clockwise on screen as torchvision's `affine`. translate: (B, 2) pixels
    (x, y) of the output image. shear: (B,) x-shear, degrees. displacement: (B, S, S, 2) elastic
    offsets in normalised [-1, 1] units (x, y). brightness/contrast/saturation: (B,) factors
    (1 = unchanged). hue: (B,) shift in turns (0 = unchanged). grayscale, solarize: (B,) bool.
    blur_sigma: (B,) pixels, 0 = no blur. None = the op is off for the whole batch (the config
    disables it), so that deciding what to run never waits on the device.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    angle: torch.Tensor | None = None
    translate: torch.Tensor | None = None
    shear: torch.Tensor | None = None
    displacement: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    hue: torch.Tensor | None = None
    grayscale: torch.Tensor | None = None
    blur_sigma: torch.Tensor | None = None
    solarize: torch.Tensor | None = None

    @classmethod
    def identity(cls, batch: int, height: int, width: int, device: torch.device | str = "cpu") -> AugmentParams:
        """Parameters that change nothing: full-image crop, no flip, every other op off."""
        crop = torch.tensor([0.0, 0.0, float(height), float(width)], device=device).expand(batch, 4).clone()
        return cls(crop=crop, flip=torch.zeros(batch, dtype=torch.bool, device=device))

    def replace(self, **changes) -> AugmentParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return AugmentParams(**values)


def _uniform(shape: Sequence[int] | int, low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def _sync_free(device: torch.device) -> bool:
    """On accelerators, choose what to run without reading device values (a read waits for the device)."""
    return device.type != "cpu"


def _any(mask: torch.Tensor) -> bool:
    """Whether an op may have work: looks on the CPU; on an accelerator assumes yes."""
    return True if _sync_free(mask.device) else bool(mask.any())


def _bernoulli(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(batch, generator=generator, device=device) < p


def sample_crop_boxes(batch: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                      generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """RandomResizedCrop boxes for a batch, vectorised: (B, 4) top, left, height, width (integers).

    Same distribution as torchvision: up to 10 tries of area ~ U(scale) * H * W and log-aspect ~
    U(log ratio), the first box that fits wins; otherwise the centre crop with the ratio clamped.
    """
    area = height * width
    u = torch.rand(batch, CROP_ATTEMPTS, 2, generator=generator, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    position = torch.rand(batch, 2, generator=generator, device=device)
    top = torch.floor(position[:, 0] * (height - h + 1))
    left = torch.floor(position[:, 1] * (width - w + 1))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    box = torch.stack([top, left, h, w], dim=1)
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=box.dtype, device=device)
    return torch.where(found[:, None], box, fallback)


def _gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) sigmas -> (B, size) normalised 1-D Gaussian kernels (torchvision's sampling of the kernel)."""
    half = (size - 1) / 2
    x = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (x[None, :] / sigma[:, None]).square())
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur_batch(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own sigma (B,), separable, reflect padding."""
    b, c, h, w = images.shape
    kernel = _gaussian_kernels(sigma.to(images.dtype), kernel_size).repeat_interleave(c, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    x = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def elastic_displacement(batch: int, size: int, *, alpha: float, sigma: float,
                         generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Smooth random displacement fields (B, S, S, 2), normalised units, statistics like torchvision's
    ElasticTransform(alpha, sigma): uniform noise in [-1, 1] blurred with `sigma` pixels, times
    alpha / S. The noise is drawn at a resolution `f` times lower (f ~ sigma / 2), blurred with
    sigma / f, scaled by 1 / f (blurred white noise has std ~ 1 / sigma) and upsampled bilinearly."""
    factor = max(1, int(sigma // 2))
    low = max(2, round(size / factor))
    factor = size / low
    noise = torch.rand(batch, 2, low, low, generator=generator, device=device) * 2 - 1
    low_sigma = sigma / factor
    radius = max(1, math.ceil(4 * low_sigma))
    field = gaussian_blur_batch(noise.reshape(batch * 2, 1, low, low),
                                torch.full((batch * 2,), low_sigma, device=device), 2 * radius + 1)
    field = field.reshape(batch, 2, low, low) / factor
    if low != size:
        field = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
    return (field * (alpha / size)).permute(0, 2, 3, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_hue_batch(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each RGB image (B, 3, H, W) in [0, 1] by shift (B,) turns, through HSV as
    torchvision's adjust_hue."""
    tiny = torch.finfo(images.dtype).tiny
    r, g, b = images.unbind(dim=1)
    maxc = images.amax(dim=1)
    delta = maxc - images.amin(dim=1)
    saturation = delta / maxc.clamp_min(tiny)  # 0 where the pixel is black
    safe = delta.clamp_min(tiny)  # where delta is 0 the numerators below are 0 too: grey has hue 0
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.remainder(hue / 6.0 + shift.view(-1, 1, 1), 1.0)
    # HSV -> RGB in closed form: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) * (1.0 - saturation.unsqueeze(1) * ramp)


def adjust_colour_batch(images: torch.Tensor, *, brightness: torch.Tensor | None = None,
                        contrast: torch.Tensor | None = None, saturation: torch.Tensor | None = None,
                        hue: torch.Tensor | None = None) -> torch.Tensor:
    """Colour jitter with per-image factors (B,), brightness -> contrast -> saturation -> hue, each as
    torchvision's adjust_* on float images (None skips one). Saturation and hue do nothing on
    1-channel images."""
    x = images
    if brightness is not None:
        x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if contrast is not None:
        gray = _grayscale(x) if x.shape[1] == 3 else x
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.lerp(mean.expand_as(x), x, contrast.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)  # exact at factor 1
    if x.shape[1] != 3:
        return x
    if saturation is not None:
        x = torch.lerp(_grayscale(x).expand_as(x), x, saturation.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if hue is not None:
        if _sync_free(x.device):  # rotate all, keep the originals where the shift is 0
            x = torch.where((hue != 0).view(-1, 1, 1, 1), adjust_hue_batch(x, hue), x)
        else:  # rotate only the images that move (jitter_p of them)
            rotate = torch.nonzero(hue != 0).squeeze(1)
            if rotate.numel():
                x = x.index_copy(0, rotate, adjust_hue_batch(x.index_select(0, rotate), hue.index_select(0, rotate)))
    return x


def _coverage(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear weight that falls inside a size-pixel image at normalised coordinates (align_corners=False)."""
    q = ((coord + 1.0) * size - 1.0) / 2.0
    return torch.minimum(q + 1.0, size - q).clamp(0.0, 1.0)


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return images.to(torch.float32)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] -> (x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return torch.addcmul(-m / s, images, 1.0 / s)  # (x - m) / s in one pass


class BatchAugment(torch.nn.Module):
    """One random view of a batch: (B, C, H, W) uint8 (or float in [0, 1]) on any device ->
    (B, C, S, S) float32 on that device, normalised, each image with its own random parameters.

    `view` (0 or 1) selects the per-view entries of the config (blur_p, solarize_p) for the
    asymmetric BYOL transform.
    """

    def __init__(self, cfg: AugmentConfig, *, image_size: int, channels: int, mean: Sequence[float],
                 std: Sequence[float], view: int = 0):
        super().__init__()
        if view not in (0, 1):
            raise ValueError(f"view: expected 0 or 1, got {view}")
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels}")
        cfg.validate()
        self.cfg = cfg
        self.image_size = image_size
        self.channels = channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.view = view
        self.blur_p = cfg.blur_p[view]
        self.solarize_p = cfg.solarize_p[view]
        self.kernel_size = blur_kernel_size(image_size)
        self.use_affine = cfg.affine_degrees > 0 or cfg.affine_translate > 0 or cfg.affine_shear > 0
        self.use_elastic = cfg.elastic_p > 0 and cfg.elastic_alpha > 0

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, channels={self.channels}, view={self.view}"

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images (B, {self.channels}, H, W), got {tuple(images.shape)}")
        params = self.sample_params(images.shape[0], images.shape[2], images.shape[3],
                                    device=images.device, generator=generator)
        return self.apply(images, params)

    def sample_params(self, batch: int, height: int, width: int, *, device: torch.device | str,
                      generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every image's parameters; the draws do not depend on the pixels."""
        cfg, device = self.cfg, torch.device(device)
        crop = sample_crop_boxes(batch, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
        params = AugmentParams(crop=crop, flip=_bernoulli(batch, cfg.hflip_p, generator, device))
        if self.use_affine:
            params.angle = _uniform(batch, -cfg.affine_degrees, cfg.affine_degrees, generator, device)
            max_shift = cfg.affine_translate * self.image_size
            params.translate = torch.round(_uniform((batch, 2), -max_shift, max_shift, generator, device))
            params.shear = _uniform(batch, -cfg.affine_shear, cfg.affine_shear, generator, device)
        if self.use_elastic:
            on = _bernoulli(batch, cfg.elastic_p, generator, device)
            field = elastic_displacement(batch, self.image_size, alpha=cfg.elastic_alpha,
                                         sigma=cfg.elastic_sigma, generator=generator, device=device)
            params.displacement = field * on.view(-1, 1, 1, 1)
        colour = self.channels == 3
        if cfg.jitter_p > 0:
            jitter = _bernoulli(batch, cfg.jitter_p, generator, device)

            def factor(spread: float) -> torch.Tensor | None:
                if spread == 0:
                    return None
                drawn = _uniform(batch, max(0.0, 1.0 - spread), 1.0 + spread, generator, device)
                return torch.where(jitter, drawn, 1.0)

            params.brightness, params.contrast = factor(cfg.brightness), factor(cfg.contrast)
            if colour:
                params.saturation = factor(cfg.saturation)
                if cfg.hue > 0:
                    params.hue = torch.where(jitter, _uniform(batch, -cfg.hue, cfg.hue, generator, device), 0.0)
        if colour and cfg.grayscale_p > 0:
            params.grayscale = _bernoulli(batch, cfg.grayscale_p, generator, device)
        if self.blur_p > 0:
            blur_on = _bernoulli(batch, self.blur_p, generator, device)
            sigma = _uniform(batch, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, device)
            params.blur_sigma = torch.where(blur_on, sigma, 0.0)
        if self.solarize_p > 0:
            params.solarize = _bernoulli(batch, self.solarize_p, generator, device)
        return params

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply given per-image parameters (deterministic)."""
        x = to_float_images(images)
        x = self._geometry(x, params)
        x = adjust_colour_batch(x, brightness=params.brightness, contrast=params.contrast,
                                saturation=params.saturation, hue=params.hue)
        if self.channels == 3 and params.grayscale is not None and _any(params.grayscale):
            x = torch.where(params.grayscale.view(-1, 1, 1, 1), _grayscale(x).expand_as(x), x)
        if params.blur_sigma is not None:
            x = self._blur(x, params.blur_sigma)
        if params.solarize is not None and _any(params.solarize):
            x = torch.where(params.solarize.view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)
        return normalize(x, self.mean, self.std) if self.cfg.normalize else x

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Blur the images whose sigma is > 0. On the CPU only those; on an accelerator all of them
        (no host sync), the others with a vanishing sigma, whose kernel is exactly [0, .., 1, .., 0]."""
        if _sync_free(x.device):
            return gaussian_blur_batch(x, torch.where(sigma > 0, sigma, 1e-3), self.kernel_size)
        chosen = torch.nonzero(sigma > 0).squeeze(1)
        if not chosen.numel():
            return x
        blurred = gaussian_blur_batch(x.index_select(0, chosen), sigma.index_select(0, chosen), self.kernel_size)
        return x.index_copy(0, chosen, blurred)

    def _geometry(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Crop + flip + affine + elastic as one bilinear grid_sample on the original image."""
        b, _, height, width = x.shape
        size = self.image_size
        device, dtype = x.device, x.dtype
        affine = params.angle is not None or params.translate is not None or params.shear is not None
        if (not _sync_free(device) and height == width == size and not affine and params.displacement is None
                and not bool(params.flip.any())
                and bool((params.crop == torch.tensor([0.0, 0.0, height, width])).all())):
            return x  # nothing moves: skip the resampling (exact, and free); not checked on accelerators (sync)
        # Output pixel centres in normalised coordinates (align_corners=False): (1, S, S, 2) as (x, y).
        axis = (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).unsqueeze(0)
        if params.displacement is not None:
            grid = grid + params.displacement.to(dtype)
        mask = None
        if affine or params.displacement is not None:
            grid = self._inverse_affine(grid, params) if affine else grid.expand(b, -1, -1, -1)
            mask = (_coverage(grid[..., 0], size) * _coverage(grid[..., 1], size)).unsqueeze(1)
        # Crop box (input pixels) as a scale and offset in normalised coordinates; flip negates x.
        top, left, h, w = params.crop.to(dtype).unbind(dim=1)
        scale = torch.stack([torch.where(params.flip, -w, w) / width, h / height], dim=1)
        offset = torch.stack([(2 * left + w) / width - 1, (2 * top + h) / height - 1], dim=1)
        grid = grid * scale.view(b, 1, 1, 2) + offset.view(b, 1, 1, 2)
        # Clamp to the crop box's first and last pixel centres, as resizing the cropped image does.
        low = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=1).view(b, 1, 1, 2)
        high = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], dim=1)
        grid = torch.maximum(torch.minimum(grid, high.view(b, 1, 1, 2)), low)
        if height > size and width > size:  # shrink first so that sampling does not alias
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = F.grid_sample(x, grid.expand(b, -1, -1, -1), mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out * mask if mask is not None else out

    def _inverse_affine(self, grid: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Map output coordinates back through the random affine (rotation, x-shear, translation
        about the centre, torchvision's convention) to the cropped-and-flipped image's coordinates."""
        n = params.crop.shape[0]
        zeros = torch.zeros(n, dtype=grid.dtype, device=grid.device)
        angle = torch.deg2rad(params.angle.to(grid.dtype)) if params.angle is not None else zeros
        shear = torch.deg2rad(params.shear.to(grid.dtype)) if params.shear is not None else zeros
        translate = params.translate.to(grid.dtype) if params.translate is not None else zeros[:, None].expand(n, 2)
        # forward linear part R(angle) @ [[1, -tan(shear)], [0, 1]] with R = [[cos, -sin], [sin, cos]]
        # (y points down, so positive angles turn clockwise on screen); its inverse is
        # [[1, tan(shear)], [0, 1]] @ R(-angle) = [[a, b], [c, d]] below
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        a, b_ = cos - tan * sin, sin + tan * cos
        c, d = -sin, cos
        shift = translate * (2.0 / self.image_size)  # pixels -> normalised
        px = grid[..., 0] - shift[:, 0].view(-1, 1, 1)
        py = grid[..., 1] - shift[:, 1].view(-1, 1, 1)
        ix = a.view(n, 1, 1) * px + b_.view(n, 1, 1) * py
        iy = c.view(n, 1, 1) * px + d.view(n, 1, 1) * py
        return torch.stack([ix, iy], dim=-1)


def build_batch_augments(cfg: AugmentConfig, *, num_views: int, image_size: int, channels: int,
                         mean: Sequence[float], std: Sequence[float]) -> list[BatchAugment]:
    """One BatchAugment per view; view k uses the per-view entries of view k % 2. With
    `cfg.random_views` false every view is the deterministic evaluation transform (no augmentation)."""
    if not cfg.random_views:
        return [_FixedView(EvalTransform(image_size=image_size, mean=mean, std=std, normalize=cfg.normalize))
                for _ in range(num_views)]
    return [BatchAugment(cfg, image_size=image_size, channels=channels, mean=mean, std=std, view=k % 2)
            for k in range(num_views)]


class EvalTransform(torch.nn.Module):
    """Deterministic test-time transform of a batch: (B, C, H, W) uint8 or float -> (B, C, S, S)
    float32: shorter side resized to S (bilinear, antialiased) and centre crop when H, W != S, then
    normalised."""

    def __init__(self, *, image_size: int, mean: Sequence[float], std: Sequence[float], normalize: bool = True):
        super().__init__()
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float_images(images)
        size = self.image_size
        height, width = x.shape[-2:]
        if (height, width) != (size, size):
            scale = size / min(height, width)
            new = (max(size, round(height * scale)), max(size, round(width * scale)))
            x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        return normalize(x, self.mean, self.std) if self.normalize else x.contiguous()


class _FixedView(torch.nn.Module):
    """A view without randomness, called like BatchAugment (the generator is not used)."""

    def __init__(self, transform: EvalTransform):
        super().__init__()
        self.transform = transform

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.transform(images)


def build_eval_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float],
                         normalize: bool = True) -> EvalTransform:
    return EvalTransform(image_size=image_size, mean=mean, std=std, normalize=normalize)


# SCAN's strong views: RandAugment's ops, each at a magnitude drawn uniformly from its range (not
# RandAugment's one fixed magnitude). Factors below 1 only degrade (SCAN's ranges for the enhancement ops);
# shear is a shear factor (tan of the angle), translation a fraction of the side.
STRONG_OPS: dict[str, tuple[float, float]] = {
    "identity": (0.0, 0.0), "autocontrast": (0.0, 0.0), "equalize": (0.0, 0.0),
    "rotate": (-30.0, 30.0), "solarize": (0.0, 256.0), "posterize": (4.0, 8.0),
    "color": (0.05, 0.95), "contrast": (0.05, 0.95), "brightness": (0.05, 0.95), "sharpness": (0.05, 0.95),
    "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}


def apply_strong_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """One op of STRONG_OPS on a (C, H, W) uint8 image at `magnitude` (within the op's range)."""
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    if name == "identity":
        return image
    if name == "autocontrast":
        return TF.autocontrast(image)
    if name == "equalize":
        return TF.equalize(image)
    if name == "rotate":
        return TF.rotate(image, magnitude)
    if name == "solarize":   # pixels >= the threshold are inverted; 256 leaves the image as it is
        return image if magnitude >= 256 else TF.solarize(image, int(magnitude))
    if name == "posterize":
        return TF.posterize(image, int(magnitude))
    if name == "color":
        return TF.adjust_saturation(image, magnitude) if image.shape[-3] == 3 else image
    if name in ("contrast", "brightness", "sharpness"):
        return getattr(TF, f"adjust_{name}")(image, magnitude)
    if name in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(magnitude))
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[degrees, 0.0] if name == "shear_x" else [0.0, degrees])
    if name in ("translate_x", "translate_y"):
        shift = [round(magnitude * width), 0] if name == "translate_x" else [0, round(magnitude * height)]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
    raise ValueError(f"unknown strong op {name!r}; expected one of {', '.join(STRONG_OPS)}")


class RandomStrongOps(torch.nn.Module):
    """`num_ops` ops drawn uniformly (with replacement) from STRONG_OPS, each applied at a magnitude drawn
    uniformly from its range: (C, H, W) uint8 -> (C, H, W) uint8. Randomness from torch's global RNG."""

    def __init__(self, num_ops: int):
        super().__init__()
        self.num_ops = num_ops
        self.names = list(STRONG_OPS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_ops):
            name = self.names[int(torch.randint(len(self.names), ()))]
            low, high = STRONG_OPS[name]
            image = apply_strong_op(image, name, low + (high - low) * float(torch.rand(())))
        return image


class Cutout(torch.nn.Module):
    """Cutout (DeVries and Taylor, 2017) as SCAN uses it: one square hole, side drawn from 1..`max_size`,
    centred on a uniformly drawn pixel and clipped at the border, set to 0 (the mean, after normalising).
    (C, H, W) float -> the same."""

    def __init__(self, max_size: int):
        super().__init__()
        self.max_size = max_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        side = int(torch.randint(1, self.max_size + 1, ()))
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        bottom, right = min(height, cy - side // 2 + side), min(width, cx - side // 2 + side)
        image = image.clone()
        image[..., top:bottom, left:right] = 0.0
        return image


class _FixedOrderColorJitter(torch.nn.Module):
    """ColorJitter for one float image with the batched path's fixed order of the four adjustments."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, channels: int):
        super().__init__()
        self.spreads = (brightness, contrast, saturation if channels == 3 else 0.0)
        self.hue = hue if channels == 3 else 0.0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        b, c, s = (float(torch.empty(1).uniform_(max(0.0, 1 - v), 1 + v)) for v in self.spreads)
        h = float(torch.empty(1).uniform_(-self.hue, self.hue))
        image = TF.adjust_brightness(image, b)
        image = TF.adjust_contrast(image, c)
        if self.spreads[2] > 0:
            image = TF.adjust_saturation(image, s)
        if self.hue > 0:
            image = TF.adjust_hue(image, h)
        return image


def build_sample_transform(cfg: AugmentConfig, *, image_size: int, channels: int, mean: Sequence[float],
                           std: Sequence[float], view: int = 0) -> Callable:
    """The per-sample torchvision.transforms.v2 pipeline with the parameters of `BatchAugment`:
    (C, H, W) uint8 tensor or PIL image -> (C, S, S) float32. Randomness from torch's global RNG."""
    from torchvision.transforms import v2

    cfg.validate()
    bilinear = v2.InterpolationMode.BILINEAR
    if not cfg.random_views:  # the evaluation transform, per sample
        fixed: list[Callable] = [v2.ToImage(), v2.Resize(image_size, interpolation=bilinear, antialias=True),
                                 v2.CenterCrop(image_size), v2.ToDtype(torch.float32, scale=True)]
        return v2.Compose(fixed + ([v2.Normalize(list(mean), list(std))] if cfg.normalize else []))
    ops: list[Callable] = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                             interpolation=bilinear, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip_p),
    ]
    if cfg.affine_degrees > 0 or cfg.affine_translate > 0 or cfg.affine_shear > 0:
        ops.append(v2.RandomAffine(cfg.affine_degrees,
                                   translate=(cfg.affine_translate,) * 2 if cfg.affine_translate else None,
                                   shear=(-cfg.affine_shear, cfg.affine_shear) if cfg.affine_shear else None,
                                   interpolation=bilinear))
    if cfg.elastic_p > 0 and cfg.elastic_alpha > 0:
        ops.append(v2.RandomApply([v2.ElasticTransform(cfg.elastic_alpha, cfg.elastic_sigma, bilinear)],
                                  p=cfg.elastic_p))
    if cfg.strong_ops:
        ops.append(RandomStrongOps(cfg.strong_ops))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.jitter_p > 0:
        ops.append(v2.RandomApply([_FixedOrderColorJitter(cfg.brightness, cfg.contrast, cfg.saturation,
                                                          cfg.hue, channels)], p=cfg.jitter_p))
    if channels == 3 and cfg.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p[view] > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), tuple(cfg.blur_sigma))],
                                  p=cfg.blur_p[view]))
    if cfg.solarize_p[view] > 0:
        ops.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=cfg.solarize_p[view]))
    if cfg.normalize:
        ops.append(v2.Normalize(list(mean), list(std)))
    if cfg.cutout_size:
        ops.append(Cutout(cfg.cutout_size))
    return v2.Compose(ops)
