"""Turn measured samples into the numbers users compare: medians, spreads, ratios, a table, a chart.
Everything here is computed from the samples in the results; nothing is typed in."""
from __future__ import annotations

import statistics
from pathlib import Path

from bench.modes import MODES

MiB = 1024 * 1024


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(workload: dict) -> dict:
    out: dict = {}
    for mode, samples in workload["samples"].items():
        if not samples:
            continue
        secs = [s["seconds"] for s in samples]
        out[mode] = {"median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
                     "n": len(secs), "mount_s": _median([s["mount_s"] for s in samples]),
                     "fetched_bytes": _median([s["fetched_bytes"] for s in samples]),
                     "requests": _median([s["requests"] for s in samples]),
                     "read_bytes": _median([s["read_bytes"] for s in samples]),
                     # uncompressed bytes of the blocks fetched: the read amplification of the format
                     "fetched_raw_bytes": _median([s["phases"].get("fetched_raw_bytes") for s in samples]),
                     # restores: start → the restored process runs again (lazyfs run -v's line)
                     "resumed_s": _median([s["phases"].get("resumed_s") for s in samples]),
                     # which data path served the lazy modes (lazyfs.fs.kernel, or fuse)
                     "data_path": "/".join(sorted({s["phases"]["data_path"] for s in samples
                                                   if s["phases"].get("data_path")})) or None}
    for base in ("pull", "podman-pull", "containerd-pull", "local", "local-erofs", "local-overlay", "podman-image", "cold-init"):
        if base in out and out[base]["median_s"] > 0:
            for mode in out:
                out[mode][f"x_{base.replace('-', '_')}"] = out[mode]["median_s"] / out[base]["median_s"]
    for mode, row in out.items():
        if row["read_bytes"] and row["fetched_bytes"] is not None:
            row["fetched_over_read"] = row["fetched_bytes"] / row["read_bytes"]
            if row["fetched_raw_bytes"] is not None:
                row["raw_over_read"] = row["fetched_raw_bytes"] / row["read_bytes"]
    return out


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _mib(v: float | None) -> float | None:
    return None if v is None else v / MiB


def markdown(results: dict) -> str:
    m, link = results["machine"], results["link"]
    lines = [f"Cold starts measured {results['date']} on {m['cpus']} CPUs ({m['cpu']}), kernel "
             f"{m['kernel']}; link {link['rate']} with {link['delay_ms']:.1f} ms per request; "
             f"{results['runs']} runs per mode (median, min–max). Before each run the node's page "
             f"cache is dropped" + ("; the servers' files are read back in (other machines in a "
                                   "fleet)" if results.get("servers_page_cache", "").startswith("kept")
                                   else ", and the servers' with it") + ".", ""]
    for w, summary in results["summary"].items():
        info = results["images"][results["workloads"][w]["image"]]
        lines += [f"### {w}: `{' '.join(results['workloads'][w]['argv'])}`", "",
                  f"Image {info['ref']}: {info['files']} files, {info['bytes'] / MiB:.0f} MiB, "
                  f"{info['layers']} layer(s), {info['compressed_bytes'] / MiB:.0f} MiB compressed.", ""]
        if "cold-init" in summary:
            bases = [b for b in ("cold-init", "podman-pull", "containerd-pull") if b in summary]
            lines += ["| mode | median s | min–max s | " + " | ".join(f"× {b}" for b in bases)
                      + " | process resumed s | fetched MiB | requests |",
                      "|---|---|---|" + "---|" * len(bases) + "---|---|---|"]
            lines += [f"| {mode} | {r['median_s']:.2f} | {r['min_s']:.2f}–{r['max_s']:.2f} | "
                      + "".join(f"{_f(r.get('x_' + b.replace('-', '_')), '.2f')} | " for b in bases)
                      + f"{_f(r.get('resumed_s'), '.2f')} | "
                      f"{_f(_mib(r['fetched_bytes']), '.1f')} | {_f(r['requests'], '.0f')} |"
                      for mode, r in summary.items()]
            lines.append("")
            continue
        lines += [
                  "| mode | data path | median s | min–max s | × pull | × podman-pull | × containerd-pull | "
                  "× local | × local-erofs | "
                  "× local-overlay | × podman-image | mount ms | fetched MiB | read MiB | fetched/read | "
                  "raw/read | requests |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode, r in summary.items():
            mount = None if r["mount_s"] is None else r["mount_s"] * 1000
            lines.append(
                f"| {mode} | {r.get('data_path') or '–'} | {r['median_s']:.2f} | "
                f"{r['min_s']:.2f}–{r['max_s']:.2f} | {_f(r.get('x_pull'), '.2f')} | "
                f"{_f(r.get('x_podman_pull'), '.2f')} | {_f(r.get('x_containerd_pull'), '.2f')} | "
                f"{_f(r.get('x_local'), '.2f')} | {_f(r.get('x_local_erofs'), '.2f')} | "
                f"{_f(r.get('x_local_overlay'), '.2f')} | {_f(r.get('x_podman_image'), '.2f')} | {_f(mount, '.0f')} | "
                f"{_f(_mib(r['fetched_bytes']), '.1f')} | {_f(r['read_bytes'] and r['read_bytes'] / MiB, '.1f')} | "
                f"{_f(r.get('fetched_over_read'), '.2f')} | {_f(r.get('raw_over_read'), '.2f')} | "
                f"{_f(r['requests'], '.0f')} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on a worker node
    import matplotlib.pyplot as plt

    workloads = list(results["summary"])
    modes = [m for m in (*MODES, "cold-init", "restore", "lazy-restore", "lazy-restore+ws")
             if any(m in results["summary"][w] for w in workloads)]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(workloads)), 4))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs, med, lo, hi = [], [], [], []
        for j, w in enumerate(workloads):
            r = results["summary"][w].get(mode)
            if r:
                xs.append(j + i * width)
                med.append(r["median_s"])
                lo.append(r["median_s"] - r["min_s"])
                hi.append(r["max_s"] - r["median_s"])
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(workloads))], workloads)
    ax.set_ylabel("seconds to done (median; bars: min–max)")
    ax.set_title(f"lazyfs cold starts, {results['link']['rate']} link, "
                 f"{results['link']['delay_ms']:.0f} ms per request")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
