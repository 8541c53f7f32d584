"""The plot both issue-12 plot scripts draw per variant: the mean over seeds by epoch, with a band from the lowest to
the highest seed."""
import statistics


def mean_band(ax, series, colour, label, alpha=0.15, linestyle="-"):
    """Plot the mean of ``series`` (one list of values by epoch per seed; cut to the epochs every seed reached) and,
    for more than one seed, the band spanning them; the legend label gets the number of seeds (``label`` None: no
    legend entry)."""
    n = min(len(s) for s in series)
    cols = list(zip(*(s[:n] for s in series)))
    epochs = range(1, n + 1)
    ax.plot(epochs, [statistics.mean(c) for c in cols], marker="o", color=colour, linestyle=linestyle,
            label="_nolegend_" if label is None else f"{label} ({len(series)} seed{'s' if len(series) > 1 else ''})")
    if len(series) > 1:
        ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols], color=colour, alpha=alpha)
