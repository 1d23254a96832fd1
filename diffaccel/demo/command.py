"""``diffaccel demo``: serve the side-by-side page (gradio, torch and diffusers are imported when it runs)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

DEFAULT_PORT = 7860


def demo_command(
    model: Annotated[
        Optional[str],
        typer.Option(help="Preselected model: a tiny pipeline name, a Hub id or a local folder (default: "
                     "tiny-flux-trained without CUDA, FLUX.1-dev with CUDA)."),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = DEFAULT_PORT,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 serves the network).")] = "127.0.0.1",
    share: Annotated[bool, typer.Option("--share", help="Also open a public gradio.live link.")] = False,
    method: Annotated[str, typer.Option("--method", "-m", help="Side B's initial method.")] = "gna",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16.")] = "auto",
) -> None:
    """Serve the Gradio side-by-side demo: dense versus a method (or two methods), timing, fidelity, masks."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        from diffaccel.errors import ConfigError

        raise ConfigError("diffaccel demo needs gradio: pip install 'diffaccel[demo]'") from None
    from diffaccel.demo.ui import build_app
    from diffaccel.run import default_model

    app = build_app(model or default_model(), method_b=method, device=device, dtype=dtype)
    app.launch(server_name=host, server_port=port, share=share, footer_links=["api"])
