"""PNG plots of the benchmark results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import GIB, MIB  # noqa: E402

STYLE = {"tv-eager": ("tab:red", "o"), "tv-memeff": ("tab:orange", "s"), "tv-compile": ("tab:brown", "D")}
FAST_COLOURS = ["tab:blue", "tab:green", "tab:purple", "tab:cyan", "tab:olive", "tab:pink"]


def style(impl: str, impls: list[str]) -> tuple[str, str]:
    """(colour, marker) of an implementation, stable within one figure."""
    if impl in STYLE:
        return STYLE[impl]
    fast = [i for i in impls if i not in STYLE]
    return FAST_COLOURS[fast.index(impl) % len(FAST_COLOURS)], "^" if impl.endswith("keep") else "v"


def title(result: dict, what: str) -> str:
    env = result["environment"]
    return f"{what}\n{env['device_name']}"


def plot_depth(result: dict, path: Path) -> Path:
    """Left: peak memory of one training step vs depth (budget line, deepest
    depth under it); right: step time vs depth."""
    settings = result["environment"]["settings"]
    impls = settings["impls"]
    timed_any = any(t.get(i, {}).get("status") == "ok" for t in result["timings"].values() for i in impls)
    fig, axes = plt.subplots(1, 2 if timed_any else 1, figsize=(13 if timed_any else 8, 5.2), squeeze=False)
    ax_mem, ax_time = axes[0, 0], axes[0, -1]
    deepest = {s["impl"]: s for s in result["budget_search"]}
    for impl in impls:
        colour, marker = style(impl, impls)
        ok = sorted((p["depth"], p["total_bytes"] / MIB) for p in result["points"]
                    if p["impl"] == impl and p["status"] == "ok")
        label = impl
        if impl in deepest and deepest[impl]["deepest_fitting"]:
            found = deepest[impl]
            label += f" (deepest {found['deepest_fitting']}{'+' if found['limited_by'] else ''})"
        if ok:
            ax_mem.plot(*zip(*ok), marker=marker, color=colour, label=label)
        over = [p["depth"] for p in result["points"] if p["impl"] == impl and p["status"] in ("over_budget", "refused")]
        if over and settings.get("budget_gib"):
            ax_mem.plot(over, [settings["budget_gib"] * GIB / MIB] * len(over), "x", color=colour, markersize=10)
        timed = sorted((int(d), t[impl]["seconds"]) for d, t in result["timings"].items()
                       if t.get(impl, {}).get("status") == "ok")
        if timed:
            depths, stats = zip(*timed)
            medians = [s["median"] for s in stats]
            spread = [[m - s["min"] for m, s in zip(medians, stats)], [s["max"] - m for m, s in zip(medians, stats)]]
            shift = (impls.index(impl) - (len(impls) - 1) / 2) * 0.01 * max(depths)  # keep the bars apart
            ax_time.errorbar([d + shift for d in depths], medians, yerr=spread, marker=marker, color=colour,
                             label=impl, capsize=4)
    if settings.get("budget_gib"):
        ax_mem.axhline(settings["budget_gib"] * GIB / MIB, color="black", linestyle="--",
                       label=f"budget {settings['budget_gib']:g} GiB (x: stopped above it, or refused)")
    batch = f"batch {settings['batch']}, {settings['image_size']}x{settings['image_size']}, k={settings['growth_rate']}"
    ax_mem.set(xlabel="depth (layers)", ylabel="training step: parameters, gradients, optimizer state\n"
                                                "and the step's peak above them (MiB)", title="memory vs depth")
    if timed_any:
        ax_time.set(xlabel="depth (layers)", ylabel="training step time (s): median, bars min-max",
                    title="step time vs depth")
    for ax in set((ax_mem, ax_time)):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title(result, f"DenseNet-BC training step, {batch}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bars(ax, labels: list[str], values: list, colours: list[str], ylabel: str, heading: str) -> None:
    """One bar per implementation, value written on top; ``None`` bars are marked n/a."""
    positions = range(len(labels))
    ax.bar(positions, [v or 0 for v in values], color=colours)
    for x, v in zip(positions, values):
        ax.annotate("n/a" if v is None else f"{v:.3g}", (x, v or 0), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=heading)
    ax.grid(axis="y", alpha=0.3)


def plot_models(result: dict, path: Path) -> Path:
    """Bars per implementation: images/s (train, inference), peak memory, largest batch."""
    rows = result["rows"]
    impls = [r["impl"] for r in rows]
    colours = [style(i, impls)[0] for i in impls]
    panels = [("train_images_per_s", "images/s", "training throughput"),
              ("infer_images_per_s", "images/s", "inference throughput"),
              ("train_peak_MiB", "MiB", "peak memory, training step"),
              ("largest_batch", "images", f"largest batch under {result['environment']['settings']['budget_gib']:g} GiB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8))
    for ax, (key, unit, heading) in zip(axes, panels):
        bars(ax, impls, [r.get(key) for r in rows], colours, unit, heading)
    s = result["environment"]["settings"]
    fig.suptitle(title(result, f"{result['model_label']}, batch {s['batch']}, {s['image_size']}x{s['image_size']}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernels(result: dict, path: Path) -> Path:
    """Per primitive: fraction of the roofline of every implementation, per shape."""
    rows = [r for r in result["rows"] if "error" not in r]
    primitives = list(dict.fromkeys(r["primitive"] for r in rows))
    fig, axes = plt.subplots(len(primitives), 1, figsize=(11, 2.6 * len(primitives)), squeeze=False)
    for ax, primitive in zip(axes[:, 0], primitives):
        mine = [r for r in rows if r["primitive"] == primitive]
        shapes = list(dict.fromkeys(r["shape"] for r in mine))
        impls = list(dict.fromkeys(r["impl"] for r in mine))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            values = [next((r["roofline_fraction"] for r in mine if r["shape"] == s and r["impl"] == impl), 0)
                      for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], values, width, label=impl,
                   color=FAST_COLOURS[j % len(FAST_COLOURS)] if impl != "torch-unfused" else "tab:red")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set(ylabel="achieved / roofline", title=primitive)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title(result, f"primitives ({result['dtype']}): roofline time / measured time, log scale "
                                "(higher is better; 1 = at the roofline; above 1: data in cache, or a product "
                                "faster than torch.mm)"), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_memory(result: dict, path: Path) -> Path:
    """Predicted against measured peak of a training step (log-log), one marker
    per recompute policy, the tolerance band around the diagonal."""
    fig, ax = plt.subplots(figsize=(7, 6))
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    for policy, (colour, marker) in {"keep": ("tab:blue", "^"), "recompute": ("tab:green", "v")}.items():
        mine = [r for r in ok if r["policy"] == policy]
        if mine:
            ax.scatter([r["measured_step_bytes"] / MIB for r in mine], [r["predicted_step_bytes"] / MIB for r in mine],
                       color=colour, marker=marker, label=policy)
    if ok:
        low = min(min(r["measured_step_bytes"], r["predicted_step_bytes"]) for r in ok) / MIB / 1.5
        high = max(max(r["measured_step_bytes"], r["predicted_step_bytes"]) for r in ok) / MIB * 1.5
        tolerance = result["tolerance"]
        ax.plot([low, high], [low, high], color="black", linewidth=1, label="prediction = measurement")
        ax.fill_between([low, high], [low * (1 - tolerance), high * (1 - tolerance)],
                        [low * (1 + tolerance), high * (1 + tolerance)], color="grey", alpha=0.2,
                        label=f"+-{tolerance:.0%}")
        step, total = result["worst"]["error"], result["worst"]["total_error"]
        ax.set_title(title(result, f"Memory model: peak of a training step above parameters, gradients and "
                                   f"optimizer state\nworst error {step['error']:+.1%} ({step['model']}, batch "
                                   f"{step['batch']}, {step['policy']}); of the total (with them) "
                                   f"{total['total_error']:+.1%}"), fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (MiB, fresh process)")
    ax.set_ylabel("predicted (MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
