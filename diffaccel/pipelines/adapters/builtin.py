"""Registers every built-in adapter and denoiser family. Imported on first use, so `import diffaccel` (and
`diffaccel.kernels`) does not import diffusers."""

from diffaccel.pipelines.adapters import cogvideox, flux, hunyuan_video, ltx, sd3, unet, wan  # noqa: F401
from diffaccel.pipelines.adapters import flux2, flux3, hunyuan_video15, ltx2, qwenimage, z_image  # noqa: F401,E402
