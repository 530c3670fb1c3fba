"""The routing study of the debiasing benchmark: the gates of a trained run's MoE sites per (label, text cue, image
cue) group on the synthetic test splits, and its summaries (balance, separation, cue sensitivity); `launch_run`
trains a run and studies it."""

from __future__ import annotations

import itertools
import math
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfmoe.trainer.data.synthetic import NO_CUE, group_parts

from .debiasing import (
    LOG_FILE,
    RESULTS_FILE,
    ROUTING_FAILED,
    ROUTING_FILE,
    ROUTING_SPLITS,
    STATE_FILE,
    Run,
    load_json,
    run_cli,
    summarize,
    write_json,
)


def launch_run(run: Run, threads: int) -> tuple[int, str]:
    """Train the run (`run_cli`) unless `all_results.json` exists, then study its routing in this process (unless
    done); returns (exit code, tail of the log), the code `ROUTING_FAILED` when only the routing study failed."""
    code, tail = (0, "") if run.done else run_cli(run, threads)
    if code != 0 or (run.run_dir / ROUTING_FILE).is_file():
        return code, tail
    import torch

    torch.set_num_threads(threads)
    try:
        write_json(run.run_dir / ROUTING_FILE, study_routing(run.run_dir))
    except Exception:  # the metrics stand; the report marks the routing as missing
        with (run.run_dir / LOG_FILE).open("a") as log:
            log.write(traceback.format_exc())
        return ROUTING_FAILED, tail
    return 0, tail


# ------------------------------------------------------------------------------------------------ routing study
def cue_category(label: int, text_cue: int, image_cue: int) -> str:
    """aligned (every cue the item has points at the label), text_conflicting, image_conflicting or
    both_conflicting; a modality without a cue (`NO_CUE`) never conflicts."""
    text_ok, image_ok = text_cue in (label, NO_CUE), image_cue in (label, NO_CUE)
    if text_ok and image_ok:
        return "aligned"
    if image_ok:
        return "text_conflicting"
    return "image_conflicting" if text_ok else "both_conflicting"


CATEGORIES = ("aligned", "text_conflicting", "image_conflicting", "both_conflicting")
ROUTING_SUMMARIES = (
    "balance", "separation", "text_cue_sensitivity", "image_cue_sensitivity", "source_separation",
    "text_gate_auroc", "image_gate_auroc",
)  # fmt: skip


def mean_gates(gates: dict[str, np.ndarray], members: np.ndarray) -> dict[str, Any]:
    """Item count and mean gate per expert of each MoE site over `members` (a boolean mask)."""
    means = {site: g[members].mean(0, dtype=np.float64).round(4).tolist() for site, g in gates.items()}
    return {"n": int(members.sum()), **means}


def routing_by_group(
    gates: dict[str, np.ndarray], groups: np.ndarray, num_labels: int, sources: np.ndarray | None = None
) -> dict[str, Any]:
    """Routing shares of each site (mean gates), overall, per group id, per cue category and per item source (the
    modality that carries the cue in the `mixed` setting)."""
    parts = {int(g): group_parts(int(g), num_labels) for g in np.unique(groups)}
    category = np.array([cue_category(*parts[int(g)]) for g in groups])
    result = {"overall": mean_gates(gates, np.ones(len(groups), dtype=bool)), "groups": {}, "categories": {}}
    for group, (label, text_cue, image_cue) in parts.items():
        entry = {"label": label, "text_cue": text_cue, "image_cue": image_cue}
        entry |= {"category": cue_category(label, text_cue, image_cue), **mean_gates(gates, groups == group)}
        result["groups"][str(group)] = entry
    for name in CATEGORIES:
        if (category == name).any():
            result["categories"][name] = mean_gates(gates, category == name)
    if sources is not None:
        result["sources"] = {str(name): mean_gates(gates, sources == name) for name in np.unique(sources)}
    return result


def study_routing(run_dir: Path, batch_size: int = 128) -> dict[str, Any]:
    """Gates of the saved model on test_iid and test_ood (regenerated from the run's data config), per group."""
    import torch
    from transformers import AutoProcessor

    from cfmoe.modeling_cfmoe import CFMoEForMultimodalClassification
    from cfmoe.trainer.collator import CFMoECollator
    from cfmoe.trainer.data.synthetic import SyntheticConfig, make_synthetic_benchmark

    data_config = load_json(run_dir / RESULTS_FILE)["data"]
    model = CFMoEForMultimodalClassification.from_pretrained(run_dir).eval()
    processor = AutoProcessor.from_pretrained(run_dir)
    num_labels = model.config.num_labels
    collator = CFMoECollator(processor, num_labels=num_labels, prompt_template=model.config.prompt_template)
    # split seeds do not depend on the other splits' sizes: the test splits come out as in the run
    data = make_synthetic_benchmark(SyntheticConfig(**{**data_config, "num_train": 0, "num_validation": 0}))
    sites = ("visual", "text")
    collected: dict[str, dict[str, Any]] = {}
    for split in ROUTING_SPLITS:
        dataset, batches = data[split], {site: [] for site in sites}
        for begin in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))])
            batch.pop("labels")
            with torch.no_grad():
                outputs = model(**batch)
            for site in sites:
                batches[site].append(getattr(outputs, f"{site}_gates").float().numpy())
        collected[split] = {
            "gates": batches,
            "groups": np.asarray(dataset["group"]),
            "sources": np.asarray(dataset["source"]),
        }
    result: dict[str, Any] = {"num_labels": num_labels, "splits": {}}
    for split, parts in collected.items():
        gates = {site: np.concatenate(parts["gates"][site]) for site in sites}
        result["splits"][split] = routing_by_group(gates, parts["groups"], num_labels, parts["sources"])
        result["splits"][split]["modality_auroc"] = modality_auroc(gates, parts["sources"])
    pooled = {site: np.concatenate([np.concatenate(c["gates"][site]) for c in collected.values()]) for site in sites}
    groups = np.concatenate([c["groups"] for c in collected.values()])
    sources = np.concatenate([c["sources"] for c in collected.values()])
    result["pooled"] = routing_by_group(pooled, groups, num_labels, sources)
    return result


def modality_auroc(gates: dict[str, np.ndarray], sources: np.ndarray) -> dict[str, dict[str, float]]:
    """Per site, how well the gates detect which modality carries an item's cue (`source`: "text", "image", or
    "none"/"both"): for each modality the best expert's ROC AUC of its gate against "the cue is in this modality"
    (order-invariant: no expert is assumed to have a job). Empty where a modality never or always carries it."""
    from sklearn.metrics import roc_auc_score

    result: dict[str, dict[str, float]] = {}
    for modality in ("text", "image"):
        truth = sources == modality
        if truth.any() and not truth.all():
            for site, values in gates.items():
                best = max(roc_auc_score(truth, values[:, e]) for e in range(values.shape[1]))
                result.setdefault(site, {})[modality] = round(float(best), 4)
    return result


def final_training_shares(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Routing share of each expert per site at the last logging step that has them (`routing_<site>_expert_<i>`)."""
    for entry in reversed(log_history):
        keys = [key for key in entry if key.startswith("routing_")]
        if keys:
            shares: dict[str, dict[int, float]] = {}
            for key in keys:
                site, _, index = key.removeprefix("routing_").rpartition("_expert_")
                shares.setdefault(site, {})[int(index)] = float(entry[key])
            return {site: [values[i] for i in sorted(values)] for site, values in shares.items()}
    return {}


def balance(shares: Sequence[float]) -> float:
    """Normalised entropy of a share vector: 1 when every expert gets the same share, 0 when one takes all."""
    p = np.asarray(shares, dtype=float)
    if p.size < 2:
        return 1.0
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(shares)))


def separation(groups: dict[str, dict[str, Any]], site: str) -> float | None:
    """How differently the router treats cue-conflicting items: within each label, the total-variation distance
    between the mean gates of the cue-aligned groups and of the cue-conflicting groups (n-weighted), averaged over
    labels (weighted by conflicting items). 0: the cues do not change the routing. Invariant to expert order."""
    distances, weights = [], []
    for label in sorted({group["label"] for group in groups.values()}):
        members = [g for g in groups.values() if g["label"] == label and g["n"] and site in g]
        aligned = [g for g in members if g["category"] == "aligned"]
        conflicting = [g for g in members if g["category"] != "aligned"]
        if aligned and conflicting:
            mean = {}
            for name, part in (("aligned", aligned), ("conflicting", conflicting)):
                mean[name] = np.average([g[site] for g in part], axis=0, weights=[g["n"] for g in part])
            distances.append(0.5 * np.abs(mean["aligned"] - mean["conflicting"]).sum())
            weights.append(sum(g["n"] for g in conflicting))
    return float(np.average(distances, weights=weights)) if distances else None


def cue_sensitivity(groups: dict[str, dict[str, Any]], site: str, cue: str) -> float | None:
    """How much one cue's value alone moves the routing: the total-variation distance between the mean gates of two
    groups that differ only in the class `cue` points at ("text_cue" or "image_cue"; same label, same other cue;
    both with that cue), averaged over such pairs weighted by the smaller group. 0: the router ignores which class
    the cue points at. Invariant to expert order."""
    other = "image_cue" if cue == "text_cue" else "text_cue"
    by_rest: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for group in groups.values():
        if group["n"] and site in group and group[cue] != NO_CUE:
            by_rest.setdefault((group["label"], group[other]), []).append(group)
    distances, weights = [], []
    for members in by_rest.values():
        for first, second in itertools.combinations(members, 2):
            distances.append(0.5 * np.abs(np.asarray(first[site]) - np.asarray(second[site])).sum())
            weights.append(min(first["n"], second["n"]))
    return float(np.average(distances, weights=weights)) if distances else None


def source_separation(study: dict[str, Any], site: str) -> float | None:
    """How much the routing follows the item's bias type: the total-variation distance between the mean gates of
    the items whose cue is in the text and of those whose cue is in the image (the `mixed` setting; None
    elsewhere). Invariant to expert order."""
    sources = study.get("sources", {})
    if not {"text", "image"} <= set(sources):
        return None
    return float(0.5 * np.abs(np.asarray(sources["text"][site]) - np.asarray(sources["image"][site])).sum())


def routing_report(runs: Sequence[Run]) -> dict[str, Any]:
    """Per method and seed, the final training shares and the test-time shares overall, per group and per cue
    category and per source; per method and site, over seeds: balance, separation, the sensitivity to each cue's
    value and the source separation."""
    report: dict[str, Any] = {}
    for run in runs:
        if not run.done:
            continue
        entry: dict[str, Any] = {}
        state = run.run_dir / STATE_FILE
        if state.is_file():
            entry["final_training_shares"] = final_training_shares(load_json(state).get("log_history", []))
        routing = run.run_dir / ROUTING_FILE
        if routing.is_file():
            study = load_json(routing)
            entry["test"] = study["pooled"]
            entry["test_per_split"] = {split: value["overall"] for split, value in study["splits"].items()}
            entry["modality_auroc"] = study["splits"].get("test_iid", {}).get("modality_auroc", {})
        report.setdefault(run.method, {"seeds": {}})["seeds"][str(run.seed)] = entry
    for summary in report.values():
        studied = [s["test"] for s in summary["seeds"].values() if "test" in s]
        sites = sorted({key for s in studied for key in s["overall"] if key != "n"})
        summary["balance"] = {site: summarize([balance(s["overall"][site]) for s in studied]) for site in sites}
        summary["separation"] = {site: summarize([separation(s["groups"], site) for s in studied]) for site in sites}
        for cue in ("text_cue", "image_cue"):
            summary[f"{cue}_sensitivity"] = {
                site: summarize([cue_sensitivity(s["groups"], site, cue) for s in studied]) for site in sites
            }
        separations = {site: [source_separation(s, site) for s in studied] for site in sites}
        summary["source_separation"] = {site: summarize(values) for site, values in separations.items()}
        for modality in ("text", "image"):
            aurocs = [seed.get("modality_auroc", {}) for seed in summary["seeds"].values()]
            summary[f"{modality}_gate_auroc"] = {
                site: summarize([auroc.get(site, {}).get(modality) for auroc in aurocs]) for site in sites
            }
    return report
