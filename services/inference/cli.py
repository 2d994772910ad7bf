"""`sluice models`: register, import, list and show model versions in the model repository.

`--root` comes from `SLUICE_MODEL_REPOSITORY` (the setting every service reads), else
`./models`.
Publishing announces a new version on `sluice.models` through the broker of `SluiceSettings`
(`SLUICE_KAFKA_BOOTSTRAP`); the inference service loads versions announced there.
Every `RegistryError` exits with code 2 and prints `error [code]: message`, without a traceback.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from schemas.messages import ModelRegistered
from services.common.settings import SluiceSettings
from services.inference import registry
from services.inference.convert import Framework, import_model
from services.inference.manifest import Manifest
from services.inference.registry import RegistryError

app = typer.Typer(
    help="Register, import, list and show models in the model repository.",
    no_args_is_help=True,
)

Root = Annotated[
    Path,
    typer.Option(
        envvar="SLUICE_MODEL_REPOSITORY",
        help="Root of the Triton-style model repository.",
    ),
]
Publish = Annotated[
    bool,
    typer.Option(
        "--publish/--no-publish",
        help="Announce the version on sluice.models (broker from SLUICE_KAFKA_BOOTSTRAP).",
    ),
]
DEFAULT_ROOT = Path("models")


def _fail(error: RegistryError) -> typer.Exit:
    typer.echo(f"error [{error.code}]: {error.message}", err=True)
    return typer.Exit(2)


def _publisher(publish: bool) -> Callable[[ModelRegistered], None] | None:
    return registry.kafka_publisher(SluiceSettings()) if publish else None


@app.command()
def register(
    model_onnx: Annotated[Path, typer.Argument(help="The model.onnx file to register.")],
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="Our manifest.json; without it one is derived (needs --model/--version)."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name when deriving a manifest.")] = None,
    version: Annotated[str | None, typer.Option(help="Version when deriving a manifest.")] = None,
    root: Root = DEFAULT_ROOT,
    publish: Publish = True,
) -> None:
    """Validate a model and its manifest and add them as a new version (idempotent)."""
    try:
        if manifest is not None:
            chosen: Manifest | Path = manifest
        elif model and version:
            chosen = registry.manifest_from_onnx(model_onnx, model, version)
        else:
            raise RegistryError(
                "invalid_manifest", "give --manifest, or --model and --version to derive one"
            )
        folder = registry.register(root, model_onnx, chosen, publish=_publisher(publish))
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.echo(f"registered {folder.parent.name}/{folder.name} at {folder}")


@app.command("list")
def list_command(root: Root = DEFAULT_ROOT) -> None:
    """List every model and its versions, latest last."""
    models = registry.list_models(root)
    if not models:
        typer.echo(f"no models in {root}")
        return
    width = max(len(name) for name in models)
    for name, found in models.items():
        typer.echo(f"{name:<{width}}  versions: {', '.join(found)}")


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str | None, typer.Argument(help="Version; the latest if omitted.")] = None,
    root: Root = DEFAULT_ROOT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest.")] = False,
) -> None:
    """Show a version's manifest: features, outputs, score, sha256 and metrics."""
    try:
        chosen = version or registry.latest_version(root, model)
        manifest = registry.load_manifest(root, model, chosen)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.echo(manifest.model_dump_json(indent=2) if as_json else _summary(manifest))


def _summary(manifest: Manifest) -> str:
    created = datetime.fromtimestamp(manifest.created_at_ms / 1000, UTC).isoformat()
    lines = [
        f"{manifest.model} version {manifest.version} ({manifest.framework}), created {created}",
        f"sha256: {manifest.sha256}",
        f"input: {manifest.input_name} [batch, {len(manifest.features)}] float32",
        "features:",
    ]
    for i, feature in enumerate(manifest.features):
        origin = (
            f"online {feature.entity}.{feature.feature}"
            if feature.source == "online"
            else f"request {feature.field}"
        )
        default = "required" if feature.default is None else f"default {feature.default:g}"
        lines.append(f"  {i:>3} {feature.name} <- {origin} ({feature.dtype}, {default})")
    lines.append("outputs:")
    for output in manifest.outputs:
        shape = ", ".join("batch" if dim is None else str(dim) for dim in output.shape)
        lines.append(f"  {output.name} [{shape}] {output.meaning}".rstrip())
    lines.append(
        f"score: {manifest.score_output}[:, {manifest.score_index}], "
        f"threshold {manifest.decision_threshold:g}"
    )
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in manifest.metrics.items()) or "none"
    lines.append(f"metrics: {metrics}")
    reference = manifest.reference
    lines.append(
        f"reference profile: {reference.rows} rows" if reference else "reference profile: none"
    )
    if manifest.description:
        lines.append(f"description: {manifest.description}")
    return "\n".join(lines)


def _read_sample(path: Path, features: list[str]) -> tuple[np.ndarray, list[str]]:
    """Rows from `.npy` or `.csv`; a CSV header names columns and may stand in for --features.

    With both a header and --features, the CSV's columns are picked and ordered by name. Empty
    CSV cells become NaN.
    """
    if not path.is_file():
        raise RegistryError("not_found", f"no sample file at {path}")
    try:
        if path.suffix == ".npy":
            if not features:
                raise RegistryError("input_mismatch", "--features is required with a .npy sample")
            return np.load(path, allow_pickle=False), features
        with path.open(newline="") as handle:
            first = next(csv.reader(handle), [])
        has_header = any(not _is_number(cell) for cell in first)
        rows = np.genfromtxt(path, delimiter=",", skip_header=int(has_header), ndmin=2)
    except ValueError as exc:
        raise RegistryError("input_mismatch", f"cannot read {path}: {exc}") from None
    if not has_header:
        if not features:
            raise RegistryError("input_mismatch", "--features is required without a CSV header")
        return rows, features
    header = [cell.strip() for cell in first]
    missing = [name for name in features if name not in header]
    if missing:
        raise RegistryError("input_mismatch", f"features {missing} are not columns of {path}")
    names = features or header
    return rows[:, [header.index(name) for name in names]], names


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell.strip() == ""
    return True


@app.command("import")
def import_command(
    source: Annotated[
        str,
        typer.Argument(
            help="Model file (pickle/joblib, LightGBM .txt, XGBoost .json/.ubj, TorchScript .pt) "
            "or, for pytorch, a 'package.module:factory' spec used with --state-dict."
        ),
    ],
    framework: Annotated[Framework, typer.Option(help="The model's library.")],
    model: Annotated[str, typer.Option(help="Model name in the repository.")],
    version: Annotated[str, typer.Option(help="Version (digits).")],
    sample: Annotated[Path, typer.Option(help="Parity/profile rows: .npy or .csv.")],
    features: Annotated[
        str, typer.Option(help="Comma-separated input columns, in order (or a CSV header).")
    ] = "",
    state_dict: Annotated[
        Path | None, typer.Option(help="PyTorch: a torch.save'd state dict for the factory.")
    ] = None,
    quantize: Annotated[bool, typer.Option(help="Serve a dynamic int8 quantized model.")] = False,
    tolerance: Annotated[float, typer.Option(help="Largest fp32 score difference.")] = 1e-4,
    root: Root = DEFAULT_ROOT,
    publish: Publish = True,
) -> None:
    """Convert a trained model to ONNX, check parity on a sample, and register it."""
    try:
        rows, names = _read_sample(sample, [n.strip() for n in features.split(",") if n.strip()])
        result = import_model(
            source,
            framework,
            names,
            rows,
            tolerance=tolerance,
            quantize=quantize,
            model=model,
            version=version,
            state_dict=state_dict,
        )
        with tempfile.TemporaryDirectory() as folder:
            model_path = result.write(Path(folder) / registry.MODEL_FILE)
            target = registry.register(
                root, model_path, result.manifest, publish=_publisher(publish)
            )
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.echo(f"parity: max |onnx - original| = {result.max_abs_diff:.3g} on {len(rows)} rows")
    report = result.quantization
    if report is not None:
        typer.echo(
            f"int8: max |int8 - original| = {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:g}), {report.quantized_ops} integer ops, "
            f"{report.int8_rows_per_s:,.0f} rows/s vs fp32 {report.fp32_rows_per_s:,.0f} "
            f"({report.speedup:.2f}x)"
        )
    else:
        typer.echo(f"speed: {result.rows_per_s:,.0f} rows/s (one thread, one batch)")
    typer.echo(f"registered {model}/{version} at {target}")
