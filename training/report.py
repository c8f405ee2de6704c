"""Writing results: JSON (numbers for scripts and the model card) and Markdown (for people and the README).

Every table in the Markdown is generated from the same dict that is written as JSON, never typed by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """JSON-safe copy: NumPy scalars/arrays to Python, NaN/inf to None, tuples to lists, Paths to str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(data), indent=1, sort_keys=False) + "\n")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``0.912``; intervals as ``0.912 [0.85, 0.96]``; missing as ``–``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}f}"
    return str(value)


def with_ci(metrics: Mapping[str, Any], name: str) -> str:
    """``value [lo, hi]`` when ``<name>_ci`` is present, else the value."""
    ci = metrics.get(f"{name}_ci")
    return fmt(metrics.get(name)) + (f" {fmt(ci, 2)}" if ci else "")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


METRIC_COLUMNS = [("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"),
                  ("specificity", "specificity"), ("f1", "F1"), ("roc_auc", "ROC AUC")]


def metrics_table(named: Mapping[str, Mapping[str, Any]], first: str = "set") -> str:
    """One row per entry of ``named`` (name -> binary metrics), with n and positives."""
    rows = [{**v, first: k, "n": int(v.get("n") or 0), "positives": int(v.get("positives") or 0)}
            for k, v in named.items()]
    return table(rows, [(first, first), ("n", "n"), ("positives", "covid"), *METRIC_COLUMNS])


def _comparison_rows(configs: Mapping[str, Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    return [{"configuration": name, "threshold": c["threshold"], "val_auc": c["val"]["roc_auc"],
             "val_attention": c.get("val_attention", {}).get("positives", {}).get("median"),
             "val_auc_copies": (c.get("val_counterfactual") or {}).get("roc_auc_with_copies"), **c[key]}
            for name, c in configs.items()]


def comparison_markdown(configs: Mapping[str, Mapping[str, Any]], chosen: str,
                        reference: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The method's comparison table: architecture x {whole, lung} on the one test split.

    ``reference`` are configurations of an earlier run on the same split (listed, marked, not selectable). A
    column of validation lung attention appears when any configuration has it.
    """
    cols = [("configuration", "configuration"), ("val_auc", "val AUC"), ("threshold", "threshold"),
            *METRIC_COLUMNS]
    rows = _comparison_rows(configs, "test")
    for r in rows:
        if r["configuration"] == chosen:
            r["configuration"] = f"**{chosen}** (chosen)"
    reference = reference or {}
    for (name, c), r in zip(reference.items(), _comparison_rows(reference, "test"), strict=True):
        rows.append({**r, "configuration": name if "run" in c else f"{name} (reference run)"})
    if any(r["val_attention"] is not None for r in rows):
        cols.insert(2, ("val_attention", "val lung attention (covid, median)"))
    if any(r["val_auc_copies"] is not None for r in rows):
        cols.insert(2, ("val_auc_copies", "val AUC with counterfactual copies"))
    return table(rows, cols)


COUNTERFACTUAL_TEXT = (
    "Share of normal images called positive at the operating threshold, as they are and with one mark of "
    "the COVID-19 images' sources put on every image (the anatomy unchanged); a network that reads the lungs "
    "keeps its answers. Last column: ROC AUC over the images and all their marked copies. A network trained "
    "with these marks as augmentation (artefact-augmented) passes by construction: for it the check shows "
    "only that the augmentation took.")


def counterfactual_markdown(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """Per configuration and side, the share of normals called positive as they are and with each probe of
    the counterfactual check, and the ROC AUC over the images and their probed copies ('' if none has it)."""
    rows: list[dict[str, Any]] = []
    probes: list[str] = []
    for name, c in configs.items():
        for side in ("val", "test"):
            cf = c.get(f"{side}_counterfactual")
            if not cf:
                continue
            probes = probes or list(cf["probes"])
            rows.append({"configuration": name, "side": side, "plain": cf["plain"]["normals_positive"],
                         "auc": cf["roc_auc_with_copies"],
                         **{k: v["normals_positive"] for k, v in cf["probes"].items()}})
    if not rows:
        return ""
    return table(rows, [("configuration", "configuration"), ("side", "side"), ("plain", "as they are"),
                        *((k, k) for k in probes), ("auc", "ROC AUC with copies")])


def _attention_line(results: Mapping[str, Any]) -> str:
    """The chosen configuration's lung attention on test, in one sentence ('' when not measured)."""
    att = results.get("lung_attention", {}).get(results.get("chosen", ""), {})
    pos, neg = att.get("positives", {}), att.get("negatives", {})
    if not pos.get("n"):
        return ""
    return (f"Lung attention of `{results['chosen']}` on test (share of the Grad-CAM++ mass inside the lung "
            f"mask): median {fmt(pos.get('median'))} on covid images (p25 {fmt(pos.get('p25'))}), "
            f"{fmt(neg.get('median'))} on normal images.")


def within_source_line(per_source: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence: ROC AUC over the COVID-19/normal pairs that come from the same source only."""
    from training.metrics import within_group_auc

    w = within_group_auc(per_source)
    if not w["pairs"]:
        return "Within-source ROC AUC: not measurable, no source holds both COVID-19 and normal test images."
    return (f"Within-source ROC AUC (only pairs of a COVID-19 and a normal test image from the same source, "
            f"so the source cannot help): {fmt(w['roc_auc'])} over {w['pairs']} pairs "
            f"({w['positives']} COVID-19 and {w['negatives']} normal images from {', '.join(w['groups'])}).")


_RECIPE_TEXT = {  # how networks trained with each stage 2 recipe option were trained ({} = its value)
    "source_balance": "Networks named source-balanced were trained with their loss balanced across sources "
                      "within each class (power {}: an image weighs the number of images of its source and "
                      "class to minus that power), so that a source holding most of one class does not make "
                      "the other sources' style a cue.",
    "style_augment": "Networks named style-augmented were trained with texture degradations added to their "
                     "augmentation (blur, sharpening and noise, each with probability {} per image), so that "
                     "an image's sharpness and noise, which name its source on these data, stop being a cue.",
    "source_adversary": "Networks named source-adversarial were trained with a source adversary (weight {}, "
                        "ramped up from 0): a small head predicts each training image's source from the "
                        "network's pooled features and the image's class, and its gradient reaches the "
                        "network reversed, so that within a class the features stop telling sources apart.",
    "artefact_augment": "Networks named artefact-augmented were trained with the marks of a film's source "
                        "added to their augmentation (padding bars, printed markers, histogram equalisation "
                        "and sharpening, each with probability {} per image), so that these marks, common on "
                        "the COVID-19 images of these data and rare on the normals, stop being a cue.",
    "equalize": "Networks named equalised histogram-equalise their input, in training and at inference (the "
                "bundle card says so): every pixel becomes the share of the image's pixels at or below its "
                "value, so the grey-level look of a source or site (contrast, brightness, window, look-up "
                "table) stops being a cue; the counterfactual check's equalisation mark leaves them "
                "unchanged by construction.",
    "pretrained": "Networks named pretrained started from the weights of a local checkpoint instead of "
                  "random weights (its file name and SHA-256 are in the results and the bundle card), e.g. "
                  "from `cxr-node pretrain`: contrastive learning without labels on the training side's "
                  "images and the `other` images, with the marks of a film's source among the changes its "
                  "views must not notice.",
}


def input_sizes(configs: Mapping[str, Mapping[str, Any]]) -> list[int]:
    """The stage 2 input sizes of the candidates that record one, ascending."""
    return sorted({int(c["input_size"]) for c in configs.values() if c.get("input_size")})


def _selection_text(results: Mapping[str, Any]) -> str:
    """How the shipped configuration was chosen, from the run's own settings."""
    sel = results.get("selection")
    if not sel:
        return "selection by validation ROC AUC."
    text = ("selection by validation ROC AUC among the configurations whose median lung attention on "
            f"validation covid images is at least {fmt(sel.get('min_attention'), 2)} (among all when none "
            "is).")
    if sel.get("attention_weight"):
        text += (" Stage 2 was trained with a lung-attention penalty (weight "
                 f"{fmt(sel['attention_weight'], 2)}): the share of Grad-CAM++ mass outside the lung mask is "
                 "added to the loss.")
    # every candidate records the recipe it was trained with, also those of earlier runs brought in
    most = {k: max((c.get(k) or 0.0 for c in results.get("configs", {}).values()), default=0.0)
            for k in _RECIPE_TEXT}
    text += "".join(" " + _RECIPE_TEXT[k].format(fmt(v, 2)) for k, v in most.items() if v)
    others = [s for s in input_sizes(results.get("configs", {})) if s != sel.get("input_size")]
    if sel.get("input_size") and others:
        text += (f" Stage 2 inputs are {sel['input_size']} px; networks named with a size ("
                 + ", ".join(f"{s} px" for s in others) + ") take images of that size, prepared and cut the "
                 "same way.")
    if sel.get("ensemble"):
        text += (" Candidates include, per architecture, mode and input size, the ensemble of its "
                 f"{sel['ensemble']} best networks by validation ROC AUC, or of all of them when it has "
                 "fewer (seeds of one configuration; the mean of their logits answers, their Grad-CAM++ maps "
                 "are averaged).")
    lead = sel.get("lead")
    if lead and not any(math.isnan(v) for v in (lead["difference"], *lead["ci"])):
        lo, hi = lead["ci"]
        apart = "; the interval holds 0, so validation does not tell the two apart." if lo <= 0 <= hi else "."
        text += (f" Validation ROC AUC of the chosen configuration minus that of the next by this rule "
                 f"(`{lead['over']}`): {lead['difference']:+.4f}, 95% paired bootstrap interval {lo:+.4f} to "
                 f"{hi:+.4f}{apart}")
    if sel.get("reference"):
        text += (f" Rows marked (reference run) come from `{sel['reference']}`, trained on the same split "
                 "without the penalty; they are shown for comparison and were not candidates.")
    if sel.get("references"):
        runs = "; ".join(f"({r['label']} run): `{r['path']}`, "
                         + (f"penalty weight {fmt(r['attention_weight'], 2)}" if r.get("attention_weight")
                            else "without the penalty") for r in sel["references"])
        text += (" Rows marked with an earlier run come from that run on the same split; they are shown for "
                 f"comparison and were not candidates here. {runs}.")
    return text


MODE_NAMES = {"whole": "whole image", "lung": "lung-segmented", "square": "centre square"}


def _modes_text(results: Mapping[str, Any]) -> str:
    """The stage 2 input modes of a run's configurations and reference rows, named in MODE_NAMES' order."""
    rows = [*results["configs"].values(), *(results.get("reference_configs") or {}).values()]
    present = {c.get("mode") for c in rows}
    return ", ".join(name for mode, name in MODE_NAMES.items() if mode in present)


def write_build_report(out: str | Path, results: Mapping[str, Any]) -> Path:
    """``report.md`` for a ``build_default`` run (every number from ``results``)."""
    out = Path(out)
    t = results.get("test", {})
    lines = [
        "# Default model: training and evaluation report", "",
        f"Data: `{results.get('data')}`; device: {results.get('device')}; seed {results.get('seed')}. "
        f"Split (images per side and label): `{_plain(results.get('split'))}`.", "",
        "## Stage 1 (lung segmentation)", "",
        table([{"arch": k, "val_dice": v["val_dice"], **v["test"]}
               for k, v in results["stage1"]["by_arch"].items()],
              [("arch", "architecture"), ("val_dice", "val Dice"), ("n", "test n"),
               ("dice_mean", "test Dice"), ("dice_median", "median Dice"), ("iou_mean", "test IoU")]),
        "", f"Chosen: `{results['stage1']['chosen']}`. "
        f"Share of images where lungs were found: `{_plain(results.get('lungs_found'))}`.", "",
        f"## Comparison: architecture x {{{_modes_text(results)}}} (one test split)", "",
        "Threshold of each configuration set on validation for sensitivity >= "
        f"{results.get('target_sensitivity')}; {_selection_text(results)}", "",
        comparison_markdown(results["configs"], results["chosen"], results.get("reference_configs")), "",
        f"## Chosen configuration `{results['chosen']}` on test", "",
        table([{"m": n, "v": t.get(n), "ci": t.get(f"{n}_ci")} for n in
               ("roc_auc", "sensitivity", "specificity", "accuracy", "f1")],
              [("m", "metric"), ("v", "value"), ("ci", "95% bootstrap CI")]), "",
        f"Threshold {fmt(t.get('threshold'), 4)}; TP {fmt(t.get('tp'))}, FP {fmt(t.get('fp'))}, "
        f"TN {fmt(t.get('tn'))}, FN {fmt(t.get('fn'))}.", "",
        "### Per source (test)", "", metrics_table(results.get("per_source", {}), "source"), "",
        within_source_line(results.get("per_source", {})), "",
        "## Shortcut checks", "",
        "Shape-normalised copies of the test images (centre square, fixed size, then the same pipeline), and "
        "trivial baselines that never look at the lungs"
        + (f" (on the centre square at {results['baselines_input_size']} px, the chosen network's input size)"
           if "baselines_input_size" in results else "") + ".", "",
        metrics_table({**{f"{k} (shape-normalised)": v["test_shape_normalised"]
                          for k, v in results["configs"].items()},
                       **{f"baseline {k} (threshold 0.5)": v["test_at_0.5"]
                          for k, v in results.get("baselines", {}).items()},
                       **{f"baseline {k} (val threshold)": v["test_at_val_threshold"]
                          for k, v in results.get("baselines", {}).items()}}, "model / input"), "",
        *(["### Counterfactual check", "", COUNTERFACTUAL_TEXT, "",
           counterfactual_markdown(results["configs"]), ""]
          if counterfactual_markdown(results["configs"]) else []),
        "### Lung attention on test (share of Grad-CAM++ mass inside the lung mask)", "",
        *([f"Not computed: {results['lung_attention']['skipped']}.", ""]
          if "skipped" in results.get("lung_attention", {}) else []),
        table([{"configuration": k, **{f"{g}_{s}": v[g][s] for g in ("all", "positives") for s in
                                       ("median", "p25", "p75")}}
               for k, v in results.get("lung_attention", {}).items() if isinstance(v, dict)],
              [("configuration", "configuration"), ("all_median", "median (all)"), ("all_p25", "p25"),
               ("all_p75", "p75"), ("positives_median", "median (covid)"), ("positives_p25", "p25 (covid)")]),
        "", "## Timings (s)", "",
        table([{"step": k, "s": v} for k, v in results.get("timings_s", {}).items()],
              [("step", "step"), ("s", "seconds")]), "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def reference_configs(paths: tuple[Path, ...], split: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The configurations of earlier runs' ``results.json``, checked to come from a split like this one.

    Returns them keyed ``"<name> (<label> run)"`` with their ``run`` label (the file name without ``build-``
    and ``-results.json``), and one line per run: path, label and the lung-attention penalty weight it used.
    """
    configs: dict[str, Any] = {}
    runs = []
    for path in paths:
        ref = json.loads(Path(path).read_text())
        if _plain(ref.get("split")) != _plain(split):
            raise ValueError(f"reference {path} was made on another split ({ref.get('split')}, "
                             f"here {split}); pass the same --split")
        label = Path(path).name.removesuffix(".json").removesuffix("-results").removeprefix("build-")
        found = {k: v for k, v in ref.get("configs", {}).items() if isinstance(v, dict) and "test" in v}
        if not found:
            raise ValueError(f"reference {path} lists no configurations")
        configs.update({f"{k} ({label} run)": {**v, "run": label} for k, v in found.items()})
        runs.append({"path": str(path), "label": label,
                     "attention_weight": ref.get("selection", {}).get("attention_weight", 0.0)})
    return configs, runs


def readme_results(results: Mapping[str, Any], command: str = "") -> str:
    """The README's Results section, generated from a ``build_default`` ``results.json``."""
    t = results.get("test", {})
    base = results.get("baselines", {})
    selection = _selection_text(results) if "selection" in results else ""  # a sentence of its own here
    lines = ["## Results", "",
             "Generated by `python -m training.report RUN_DIR` from the training run"
             + (f" (`{command}`)" if command else "") + "; one patient-level test split, threshold set on "
             f"validation for sensitivity >= {results.get('target_sensitivity')}.", "",
             *([selection[:1].upper() + selection[1:], ""] if selection else []),
             comparison_markdown(results["configs"], results["chosen"], results.get("reference_configs")), "",
             f"Chosen configuration `{results['chosen']}` on test: ROC AUC {with_ci(t, 'roc_auc')}, "
             f"sensitivity {with_ci(t, 'sensitivity')}, specificity {with_ci(t, 'specificity')}, "
             f"accuracy {with_ci(t, 'accuracy')} (95% bootstrap intervals).", "",
             *([_attention_line(results), ""] if _attention_line(results) else []),
             "What shape, texture or source alone achieves on the same test split (the data's shortcut):", "",
             metrics_table({**{f"{k} on shape-normalised test images": v["test_shape_normalised"]
                               for k, v in results["configs"].items() if k == results["chosen"]},
                            **{f"logistic regression, {k} (threshold 0.5)": v["test_at_0.5"]
                               for k, v in base.items()}}, "model / input"), "",
             "Per source (test):", "", metrics_table(results.get("per_source", {}), "source"), "",
             within_source_line(results.get("per_source", {})), "",
             *([_counterfactual_line(results), ""] if _counterfactual_line(results) else [])]
    return "\n".join(lines)


def _counterfactual_line(results: Mapping[str, Any]) -> str:
    """The chosen configuration's counterfactual check on test, in one sentence ('' when not measured)."""
    cf = results.get("configs", {}).get(results.get("chosen", ""), {}).get("test_counterfactual")
    if not cf:
        return ""
    marks = ", ".join(f"{k} {fmt(v['normals_positive'])}" for k, v in cf["probes"].items())
    return (f"Counterfactual check on test: `{results['chosen']}` calls "
            f"{fmt(cf['plain']['normals_positive'])} of the normal images positive as they are; with one "
            f"mark of the COVID-19 images' sources put on every image: {marks}.")


def add_references(run_dir: Path, paths: Sequence[Path]) -> dict[str, Any]:
    """List earlier runs' configurations beside ``run_dir``'s, as ``build_default --reference`` does, for a
    run made where their results were not at hand (a GPU machine): ``results.json`` gains them (checked to
    come from the same split) and ``report.md`` is written again. The selection is not touched: reference
    rows were never candidates. Returns the updated results."""
    path = Path(run_dir) / "results.json"
    results = json.loads(path.read_text())
    configs, runs = reference_configs(tuple(paths), results["split"])
    results["reference_configs"] = configs
    results.setdefault("selection", {})["references"] = runs
    write_json(path, results)
    write_build_report(run_dir, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.report RUN_DIR [--command TEXT] [--reference RESULTS --write]``: print the README
    Results section."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m training.report", description=main.__doc__)
    p.add_argument("run_dir", type=Path, help="build_default output folder (with results.json)")
    p.add_argument("--command", default="", help="the command that produced the run, quoted in the text")
    p.add_argument("--reference", type=Path, action="append", default=[],
                   help="results.json of an earlier run on the same split to list beside this run's "
                        "(repeatable; needs --write)")
    p.add_argument("--write", action="store_true",
                   help="write the references into RUN_DIR/results.json and RUN_DIR/report.md")
    args = p.parse_args(argv)
    if args.reference and not args.write:
        p.error("--reference changes RUN_DIR/results.json and report.md: add --write")
    try:
        results = (add_references(args.run_dir, args.reference) if args.reference
                   else json.loads((args.run_dir / "results.json").read_text()))
    except (OSError, ValueError, KeyError) as exc:
        p.error(str(exc))
    sys.stdout.write(readme_results(results, args.command) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
