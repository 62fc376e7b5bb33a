"""What every `dicom-fusion` command module shares: the `--config` option and loading the settings, with a
configuration error printed on stderr (never wrapped: paths stay whole) and exit code 2."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.errors import ServiceError

err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file "
                                                   "(default: $DICOM_FUSION_CONFIG).")]


def settings_or_exit(config: Path | None) -> Settings:
    """The settings of `config` (or $DICOM_FUSION_CONFIG); an invalid configuration exits with code 2."""
    try:
        return load_settings(config)
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
