"""A PNG of the plugin / in-tree ratio of every figure."""

from pathlib import Path


def draw_ratios(measurements, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides: dict[str, dict[str, dict[str, float]]] = {}
    for m in measurements:
        sides.setdefault(m.workload, {})[m.backend] = m.metrics
    labels, ratios = [], []
    for workload, by_backend in sides.items():
        for metric, value in by_backend["plugin"].items():
            baseline = by_backend["in-tree"][metric]
            labels.append(f"{workload}: {metric}")
            ratios.append(value / baseline if baseline else 0.0)

    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
    ax.barh(labels, ratios, color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("plugin / in-tree (ms and GiB: lower is better; tokens/s: higher is better)")
    ax.set_title("vllm-kunlun (emulated XPU) vs vLLM in-tree CPU backend")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
