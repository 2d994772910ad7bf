"""Messages -> ClickHouse columns, for the sink's columnar inserts. Pure.

Mappings users see in the tables (docs/storage.md, docs/monitoring.md):
- `predictions.output_names[i]` is `"<output>[<j>]"` for element `j` of a model output, so
  `output_values[indexOf(output_names, 'probabilities[1]')]` is that element.
- `predictions.feature_names/feature_values` keep the order of `Prediction.features`, which
  inference writes in the manifest's column order (drift relies on that order; see sql.py).
- An error prediction has `error_code`/`error_message` set, a NULL score and no features.
- `labels.model` is `''` for a label meant for any model.
- `events.num_*` hold numeric and boolean fields (true = 1), `events.str_*` string fields;
  null fields are left out.
- DateTime columns are the `_ms` field floored to the second, UTC.
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas.messages import Event, Label, Prediction

MAX_DATETIME_MS = (2**32 - 1) * 1000
"""ClickHouse's DateTime ends in 2106; later timestamps cannot be stored."""

Columns = dict[str, list]


def prediction_columns(predictions: Sequence[Prediction]) -> Columns:
    """Columns of the `predictions` table for `predictions`, in order."""
    columns: Columns = {
        name: []
        for name in (
            "request_id", "model", "version", "route", "entity_id", "score",
            "output_names", "output_values", "feature_names", "feature_values", "defaulted",
            "error_code", "error_message", "queue_ms", "features_ms", "model_ms", "total_ms",
            "batch_size", "created_at", "created_at_ms", "scored_at_ms",
        )
    }  # fmt: skip
    append = {name: column.append for name, column in columns.items()}
    for p in predictions:
        append["request_id"](p.request_id)
        append["model"](p.model)
        append["version"](p.version)
        append["route"](p.route.value)
        append["entity_id"](p.entity_id)
        append["score"](p.score)
        append["output_names"](_output_names(p.outputs))
        append["output_values"]([value for values in p.outputs.values() for value in values])
        append["feature_names"](list(p.features))
        append["feature_values"](list(p.features.values()))
        append["defaulted"](p.defaulted)
        append["error_code"](p.error.code if p.error else "")
        append["error_message"](p.error.message if p.error else "")
        latency = p.latency
        append["queue_ms"](latency.queue_ms)
        append["features_ms"](latency.features_ms)
        append["model_ms"](latency.model_ms)
        append["total_ms"](latency.total_ms)
        append["batch_size"](p.batch_size)
        append["created_at"](p.created_at_ms // 1000)
        append["created_at_ms"](p.created_at_ms)
        append["scored_at_ms"](p.scored_at_ms)
    return columns


_OUTPUT_NAMES: dict[tuple[tuple[str, int], ...], list[str]] = {}


def _output_names(outputs: dict[str, list[float]]) -> list[str]:
    """`name[j]` for every element of every output; cached per output shape (a model has one),
    and shared between rows, which the insert only reads."""
    shape = tuple((name, len(values)) for name, values in outputs.items())
    names = _OUTPUT_NAMES.get(shape)
    if names is None:
        names = [f"{name}[{j}]" for name, size in shape for j in range(size)]
        if len(_OUTPUT_NAMES) < 1024:
            _OUTPUT_NAMES[shape] = names
    return names


def label_columns(labels: Sequence[Label]) -> Columns:
    """Columns of the `labels` table for `labels`, in order."""
    return {
        "request_id": [label.request_id for label in labels],
        "model": [label.model or "" for label in labels],
        "entity_id": [label.entity_id for label in labels],
        "value": [label.value for label in labels],
        "ts": [label.ts_ms // 1000 for label in labels],
        "ts_ms": [label.ts_ms for label in labels],
    }


def event_columns(
    events: Sequence[Event], partitions: Sequence[int], offsets: Sequence[int]
) -> Columns:
    """Columns of the `events` table; `partitions`/`offsets` locate each event in Kafka."""
    columns: Columns = {
        name: []
        for name in (
            "event_id", "event_type", "ts", "ts_ms", "entity_names", "entity_ids",
            "num_names", "num_values", "str_names", "str_values", "kafka_partition",
            "kafka_offset",
        )
    }  # fmt: skip
    for event, partition, offset in zip(events, partitions, offsets, strict=True):
        num_names, num_values, str_names, str_values = [], [], [], []
        for name, value in event.fields.items():
            if isinstance(value, str):
                str_names.append(name)
                str_values.append(value)
            elif value is not None:
                num_names.append(name)
                num_values.append(float(value))
        columns["event_id"].append(event.event_id)
        columns["event_type"].append(event.event_type)
        columns["ts"].append(event.ts_ms // 1000)
        columns["ts_ms"].append(event.ts_ms)
        columns["entity_names"].append(list(event.entities))
        columns["entity_ids"].append(list(event.entities.values()))
        columns["num_names"].append(num_names)
        columns["num_values"].append(num_values)
        columns["str_names"].append(str_names)
        columns["str_values"].append(str_values)
        columns["kafka_partition"].append(partition)
        columns["kafka_offset"].append(offset)
    return columns
