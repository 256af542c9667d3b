"""The model card (README.md) of a release."""

from __future__ import annotations

from typing import Any


def _scale(config: dict[str, Any]) -> str:
    t = config.get("trainer", {})
    devices, nodes = t.get("devices", 1), t.get("num_nodes", 1)
    batch = config.get("data", {}).get("batch_size")
    parts = [
        f"{nodes} node(s) x {devices} device(s)",
        f"strategy {t.get('strategy')}",
        f"precision {t.get('precision')}",
    ]
    if t.get("global_batch_size"):
        parts.append(f"global batch {t['global_batch_size']}")
    elif batch:
        parts.append(f"batch {batch} per device")
    if t.get("max_steps", -1) and t.get("max_steps", -1) > 0:
        parts.append(f"{t['max_steps']} steps")
    elif t.get("max_epochs"):
        parts.append(f"{t['max_epochs']} epochs")
    return ", ".join(parts)


def _metrics_table(metrics: Any) -> str:
    if not metrics:
        return "No evaluation report was found in the run folder (`scalegen eval` writes one).\n"
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (int, float, str, bool)) or node is None:
            flat[prefix] = node

    walk("", metrics)
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat.items()
    )
    return "| metric | value |\n|---|---|\n" + rows + "\n"


def model_card(config: dict[str, Any], spec: dict[str, Any], info: dict[str, Any], metrics: Any) -> str:
    model = config["model"]
    data = config.get("data", {})
    family = model["family"]
    hyper = ", ".join(f"{k}={v}" for k, v in model.items() if k != "family")
    ema = "yes (`model_ema.safetensors`, used by default)" if info.get("ema_weights") else "no"
    return f"""# {config.get("run", {}).get("name", family)}: a scalegen `{family}` model

{config.get("description", "")}

| | |
|---|---|
| family | `{family}` ({hyper}) |
| data | `{data.get("dataset")}`: {spec.get("kind")} of shape {tuple(spec.get("shape", ()))}, \
{spec.get("num_classes")} classes, {spec.get("levels")} levels |
| training scale | {_scale(config)} |
| optimizer steps | {info.get("global_step")} |
| EMA weights | {ema} |
| scalegen | {info.get("scalegen_version")} (release format {info.get("format")}) |
| licence | {info.get("licence")} |

## Metrics

{_metrics_table(metrics)}
## Use

Check the files first (`scalegen finetune` does this itself):

```bash
sha256sum -c SHA256SUMS
```

Sample from it in Python (weights are safetensors; nothing here unpickles code):

```python
from scalegen.hub import load_release_model
model, cfg = load_release_model("path/to/this/folder")  # EMA weights when present
images = model.sample(64)
```

Fine-tune it on your data with its own recipe (`config.yaml`, the default) or another of the same
family; tensors whose shapes change (a new number of classes, image size or channels) must be named for
re-initialization:

```bash
scalegen finetune path/or/https/url/of/this/release data.root=/my/shards trainer.max_steps=2000
scalegen finetune path/or/https/url/of/this/release my_recipe.yaml \\
    'finetune.reinit=[decoder.out.*]' trainer.max_steps=2000
```

The exact recipe this model was trained with is `config.yaml`; `scalegen train config.yaml`
reproduces the run.
"""
