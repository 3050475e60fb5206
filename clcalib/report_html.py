"""report.html: the report of a calibration as one self-contained page (figures embedded as
SVG, no external assets), written beside report.json by the CLI and by every job.

Drawn from report.json alone, so a page can be rebuilt from any saved report:
``write_report_html(json.load(open("report.json")), "report.html")``.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

from clcalib.atomic import atomic_path

REPORT_HTML_NAME = "report.html"


def preload() -> None:
    """matplotlib imported and its font list loaded now, once, in a process that forks the children
    that write reports (the worker's zygote), rather than in each job's child."""
    import matplotlib.backends.backend_svg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    from matplotlib import font_manager

    font_manager.fontManager.findfont("DejaVu Sans")


def _subplots(figsize: tuple[float, float]):
    """A figure and its axes without pyplot: no global figure registry or GUI backend to set up,
    safe beside threads."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog: the figure sits inside the page


@contextlib.contextmanager
def _plain_text():
    """Figures drawn with their text as written: class folder names and unit and site
    names come from the upload, and matplotlib would read ``a$$b`` as math and fail on it. The
    text stays SVG text (escaped by matplotlib's XML writer), not glyph outlines: a page a
    reader can search for a layer's name, and half the bytes."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False, "svg.fonttype": "none"}):
        yield


def _log_y(ax) -> None:
    """A log y axis labelled in plain numbers: its default labels are math text ("10^1"), which
    ``text.parse_math`` off (see _plain_text) would print as their source."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def _figures(report: dict) -> dict[str, str]:
    with _plain_text():
        return _draw(report)


def _figures_or_none(report: dict) -> tuple[dict[str, str], str | None]:
    """The figures, or none and why: a page without figures beats a job that fails after its
    calibration finished (the checkpoint and report.json are written before the page)."""
    try:
        return _figures(report), None
    except Exception as e:  # noqa: BLE001 - any drawing failure; the numbers are in the tables and report.json
        warnings.warn(f"report.html: the figures could not be drawn ({type(e).__name__}: {e}); the page has "
                      "the tables only", RuntimeWarning, stacklevel=2)
        return {}, f"{type(e).__name__}: {e}"[:300]


def _draw(report: dict) -> dict[str, str]:
    figs: dict[str, str] = {}
    units = report.get("units") or []
    if units:
        fig, ax = _subplots(figsize=(max(6, 0.45 * len(units)), 3.2))
        x = range(len(units))
        before = [u["loss_before"] or float("nan") for u in units]
        after = [u["loss_after"] or float("nan") for u in units]
        ax.bar([i - 0.2 for i in x], before, 0.4, label="before (nearest rounding)", color="#bbb")
        ax.bar([i + 0.2 for i in x], after, 0.4, label="after reconstruction", color="#1f77b4")
        ax.set_xticks(list(x), [u["name"] for u in units], rotation=60, ha="right", fontsize=8)
        _log_y(ax)
        ax.set_ylabel("unit output MSE")
        ax.legend(fontsize=8)
        figs["units"] = _svg(fig)
    layers = report.get("layers") or []
    if layers:
        fig, ax = _subplots(figsize=(max(6, 0.22 * len(layers)), 3.2))
        x = range(len(layers))
        ax.plot(x, [v["weight_sqnr_db"] if v["weight_sqnr_db"] is not None else math.nan for v in layers],
                "o-", ms=3, label="weights")
        ax.plot(x, [v["output_sqnr_db"] if v["output_sqnr_db"] is not None else math.nan for v in layers],
                "s-", ms=3, label="layer output (error accumulated so far)")
        ax.set_xticks(list(x), [v["name"] for v in layers], rotation=75, ha="right", fontsize=6)
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figs["layers"] = _svg(fig)
    figs.update(mixed_figures(report.get("mixed_precision") or {}))
    pc = report.get("per_class")
    if pc:
        names = _class_names(report, len(pc["images"]))
        fig, ax = _subplots(figsize=(max(6, 0.5 * len(names)), 3.2))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [v if v is not None else math.nan for v in pc["fp_top1"]], 0.4, label="FP",
               color="#bbb")
        ax.bar([i + 0.2 for i in x], [v if v is not None else math.nan for v in pc["quant_top1"]], 0.4,
               label="quantized", color="#1f77b4")
        ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        figs["classes"] = _svg(fig)
        if pc.get("confusion"):
            cm = pc["confusion"]
            fig, ax = _subplots(figsize=(4.5 + 0.15 * len(cm), 4 + 0.15 * len(cm)))
            im = ax.imshow(cm, cmap="Blues")
            ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(list(x), names, fontsize=7)
            ax.set_xlabel("predicted (quantized model)")
            ax.set_ylabel("true class")
            if len(cm) <= 20:
                top = max(max(r) for r in cm) or 1
                for i, row in enumerate(cm):
                    for j, v in enumerate(row):
                        if v:
                            ax.text(j, i, v, ha="center", va="center", fontsize=6,
                                    color="white" if v > top / 2 else "black")
            fig.colorbar(im, ax=ax, fraction=0.046)
            figs["confusion"] = _svg(fig)
    return figs


def mixed_figures(mixed: dict) -> dict[str, str]:
    """The sensitivity bars (each site's cost at each width, the chosen width outlined) and the
    target search's frontier (weight size against top-1, FP and the target drawn)."""
    with _plain_text():
        return _draw_mixed(mixed)


def _draw_mixed(mixed: dict) -> dict[str, str]:
    figs: dict[str, str] = {}
    sites = mixed.get("sensitivity") or []
    if sites:
        chosen = (mixed.get("allocation") or {}).get("layer_bits") or {}
        widths = sorted({int(b) for c in sites for b in c["cost"]})
        fig, ax = _subplots(figsize=(max(6, 0.3 * len(sites)), 3.4))
        step = 0.8 / len(widths)
        for j, b in enumerate(widths):
            xs = [i - 0.4 + step * (j + 0.5) for i in range(len(sites))]
            ys = [max(c["cost"].get(str(b), math.nan), 1e-7) for c in sites]
            edges = ["black" if chosen.get(c["name"]) == b else "none" for c in sites]
            ax.bar(xs, ys, step, label=f"{b} bits", edgecolor=edges, linewidth=0.8)
        ax.set_xticks(range(len(sites)), [("A " if c["kind"] == "act" else "") + c["name"] for c in sites],
                      rotation=75, ha="right", fontsize=6)
        _log_y(ax)
        ax.set_ylabel("KL(FP || this site alone quantized)")
        ax.legend(fontsize=7, ncol=len(widths))
        figs["sensitivity"] = _svg(fig)
    search = mixed.get("search") or {}
    probes = [p for p in search.get("probes") or [] if p.get("top1") is not None]
    if probes and search.get("fp_top1") is not None:
        fig, ax = _subplots(figsize=(6, 3.4))
        fp, drop = search["fp_top1"], search["max_top1_drop"]
        for p in probes:
            ax.plot(p["weight_bytes"] / 1e6, p["top1"], "o", color="#1f77b4" if p["meets"] else "#d62728")
            ax.annotate(f"{p['w_bits_avg']:g} b", (p["weight_bytes"] / 1e6, p["top1"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.axhline(fp, color="#555", lw=1, label="FP")
        ax.axhline(fp - drop, color="#555", lw=1, ls="--", label=f"target: FP - {drop:g}")
        ax.set_xlabel("stored weights (MB)")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        figs["frontier"] = _svg(fig)
    return figs


def _class_names(report: dict, n: int) -> list[str]:
    mapping = report.get("class_mapping") or {}
    names = [str(i) for i in range(n)]
    for name, i in mapping.items():
        if 0 <= i < n:
            names[i] = name
    return names


def _num(v, digits: int = 2, unit: str = "") -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "–"  # null, missing (a jinja Undefined), NaN or infinite
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def render(report: dict) -> str:
    """The page as a string."""
    from jinja2 import Environment, PackageLoader

    # every value escaped, whatever the template's name (class folder names, warnings and unit names come
    # from the upload); the figures are marked safe: matplotlib escapes the text it writes into them
    env = Environment(loader=PackageLoader("clcalib", "templates"), autoescape=True)
    env.filters["num"] = _num
    m = report.get("metrics") or {}
    c = report.get("config") or {}
    settings = {k: v for k, v in c.items() if not isinstance(v, dict)}
    if "device" in settings and report.get("device") and settings["device"] != report["device"]:
        settings["device"] = f"{settings['device']} (ran on {report['device']})"
    on = {"preprocess": True, "cl_calib": bool((c.get("cl_calib") or {}).get("enabled")),
          "pdquant": c.get("method") == "pdquant"}  # a term that is off: its settings say nothing
    for block in ("preprocess", "cl_calib", "pdquant"):
        if not on[block]:
            settings[block] = "off"
            continue
        for k, v in (c.get(block) or {}).items():
            settings[f"{block}.{k}"] = v
    from clcalib.export.profiles import widens_activations

    widened = widens_activations(m.get("export_target"), report.get("config") or {})
    figs, figures_error = _figures_or_none(report)
    return env.get_template("report.html.j2").render(r=report, m=m, c=c, settings=settings, figs=figs,
                                                     figures_error=figures_error, widened=widened)


def write_report_html(report: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(render(report), encoding="utf-8")
    return path
