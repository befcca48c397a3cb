"""The search section of report.html, built from OUT/search.json alone (the study is rebuilt in memory, so
`tuneforge report OUT` needs neither the storage nor the models): optimisation history, parameter importances,
a parallel-coordinate plot, the best trial beside the defaults, and every trial."""
from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import matplotlib

from tuneforge.html import img, png, table
from tuneforge.tuning.space import fmt_value


def _study(search: dict):
    """An in-memory study holding the finished trials of search.json."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" on the console
    study = optuna.create_study(direction=search["summary"]["direction"])
    for t in search["trials"]:
        if t["state"] not in ("COMPLETE", "PRUNED"):
            continue
        study.add_trial(create_trial(
            state=TrialState[t["state"]], value=t["value"], params=t["params"],
            distributions={k: json_to_distribution(d) for k, d in t["distributions"].items()},
            intermediate_values={int(step): v for step, v in t["intermediate"]}))
    return study


def _varying(trials: list[dict]) -> list[str]:
    keys = sorted({k for t in trials for k in t["params"]})
    return [k for k in keys if len({json.dumps(t["params"].get(k)) for t in trials}) > 1]


def search_section(out: Path) -> str:
    """HTML of the search behind the run in OUT."""
    import optuna
    from optuna.visualization import matplotlib as vis

    search = json.loads((out / "search.json").read_text(encoding="utf-8"))
    s, trials = search["summary"], search["trials"]
    metric = s["chosen_by"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    parts = ["<h2>Search</h2>",
             f"<p>{s['trials']} trials of study <code>{html.escape(s['study'])}</code> ({s['complete']} complete, "
             f"{s['pruned']} pruned, {s['failed']} failed; {s['planned']} planned), {s['sampler']} sampler seeded "
             f"{s['seed']}, {s['pruner']} pruning, over {html.escape(s['space_source'])}. The model was chosen by "
             f"{html.escape(metric)} ({s['direction']}) among the {s['trials_that_chose_it']} finished trials: trial "
             f"{s['best_trial']}" + (", trained again with its config and seed" if s.get("retrained") else "")
             + ". The test split above was read once, by that model.</p>"]
    study = _study(search)
    name = metric.replace("validation ", "val. ")
    with warnings.catch_warnings(), matplotlib.rc_context():  # optuna's plots set the ggplot style: kept inside
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if complete:
            ax = vis.plot_optimization_history(study, target_name=name)
            parts.append(img(png(ax.figure), f"optimisation history: {metric} of each trial and the best so far"))
        varying = _varying(complete)
        if len({t["value"] for t in complete}) == 1 and len(complete) >= 2:
            parts.append(f"<p>Every complete trial scored {complete[0]['value']:.4f}: the values searched made no "
                         "difference here, so there are no importances to show.</p>")
        elif len(complete) >= 2 and len(varying) >= 2:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=s["seed"])
            ax = vis.plot_param_importances(study, evaluator=evaluator, params=varying, target_name=name)
            parts.append(img(png(ax.figure), f"parameter importances (fANOVA over the {len(complete)} complete trials)"))
            ax = vis.plot_parallel_coordinate(study, params=varying, target_name=name)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            parts.append(img(png(fig), f"parallel coordinates: each complete trial's values and its {metric}"))
        else:
            parts.append(f"<p>Parameter importances and parallel coordinates need at least 2 complete trials and 2 "
                         f"parameters that vary among them (here {len(complete)} and {len(varying)}).</p>")
    parts.append("<h3>Best trial vs the defaults</h3>" + _best_vs_defaults(s))
    parts.append("<h3>Trials</h3>" + _trials_table(trials, list(s["space"])))
    return "".join(parts)


def _best_vs_defaults(s: dict) -> str:
    if s["defaults_trial"] is None:
        return "<p>The defaults' trial is not in this study.</p>"
    d, b = s["defaults_params"] or {}, s["best_params"] or {}
    rows = [[s["chosen_by"], "-" if s["defaults_value"] is None else f"{s['defaults_value']:.4f}",
             "-" if s["best_value"] is None else f"{s['best_value']:.4f}"]]
    rows += [[k, fmt_value(d.get(k, "-")), fmt_value(b.get(k, "-"))] for k in s["space"]]
    header = ["", f"defaults (trial {s['defaults_trial']})", f"best (trial {s['best_trial']})"]
    same = "" if s["best_trial"] != s["defaults_trial"] else "<p>The config's own values were not beaten.</p>"
    return same + table(header, rows)


def _trials_table(trials: list[dict], keys: list[str]) -> str:
    rows = [[t["number"], t["state"].lower(), "-" if t["value"] is None else f"{t['value']:.4f}",
             *[fmt_value(t["params"].get(k, "-")) for k in keys],
             "-" if t["duration_s"] is None else f"{t['duration_s']:.0f}", t["note"]] for t in trials]
    return table(["trial", "state", "value", *[k.removeprefix("train.") for k in keys], "s", "note"], rows)
