"""The GPU check's figures, read back and written out: pytest's JUnit counts, the plugin / LitGPT ratios, issue
#18's "done when", and the markdown table for RESULTS.md's CUDA section. ``benchmarks.gpu_check`` measures; this
module only reads what it measured."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks.gpu_prepare import PLAN_PROMPTS

PEAK_RATIO_LIMIT = 1.02
DEVICE_CARRY = ["wheelkit"]


def junit_counts(xml_file: Path) -> dict[str, Any]:
    """passed / failed / skipped / errors and each test's outcome, from pytest's JUnit XML."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "tests": []}
    if not xml_file.is_file():
        return counts
    for case in ET.parse(xml_file).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            element = case.find(child)
            if element is not None:
                outcome, message = name, (element.get("message") or "")[:500]
                break
        counts[outcome] += 1
        counts["tests"].append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return counts


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """plugin ``qv`` / LitGPT on the same shape: CUDA peak allocated (whole run, training loop), device memory in
    use (whole run), step time; and whether the peaks are within ``PEAK_RATIO_LIMIT``."""
    litgpt, plugin = runs.get("litgpt", {}), runs.get("plugin-qv", {})

    def ratio(key: str) -> float | None:
        # a training-loop figure stands once both loops finished (a run killed in its final merge keeps it);
        # a whole-run figure only when both runs completed
        done = (lambda r: "fit_seconds" in r) if key.startswith("fit_") else (lambda r: r.get("ok"))
        a, b = plugin.get(key), litgpt.get(key)
        return round(a / b, 4) if a and b and done(plugin) and done(litgpt) else None

    out = {
        "peak_ratio_plugin_vs_litgpt": ratio("peak_cuda_whole_run_mib"),
        "loop_peak_ratio_plugin_vs_litgpt": ratio("fit_peak_cuda_mib"),
        "device_used_peak_ratio_plugin_vs_litgpt": ratio("device_used_peak_whole_run_mib"),
        "step_time_ratio_plugin_vs_litgpt": ratio("median_step_s"),
    }
    peaks = [out["peak_ratio_plugin_vs_litgpt"], out["loop_peak_ratio_plugin_vs_litgpt"]]
    out["within_limit"] = None if None in peaks else all(r <= PEAK_RATIO_LIMIT for r in peaks)
    out["limit"] = PEAK_RATIO_LIMIT
    return out


def markdown(results: dict[str, Any]) -> str:
    """The figures as a table, for RESULTS.md's CUDA section."""
    lines = [
        f"# GPU check: {results.get('gpu_name') or results.get('device')}",
        "",
        f"Status: {results['status']}. Command: `{results['command']}` (carry {DEVICE_CARRY}).",
    ]
    tests = results.get("gpu_tests")
    if tests:
        lines += ["", f"GPU-only tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped,"
                      f" {tests['errors']} errors."]  # fmt: skip
    qlora = results.get("qlora", {})
    s = qlora.get("settings", {})
    if s:
        lines += ["", f"QLoRA (`--quantize bnb.nf4 --precision bf16-true`): {s['steps']} steps, micro-batch"
                      f" {s['micro_batch_size']}, reasoning-gym basic_arithmetic ({s['train_size']} items, Alpaca prompts),"
                      f" max_seq_length {s['max_seq_length']}, seed {s['seed']}; random-weight checkpoints.",
                  "", "| shape | run | ok | CUDA peak whole run MiB | CUDA peak training loop MiB | device used peak MiB |"
                      " median step s | LoRA params | optimizer updates | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(value: Any, fmt: str = "{:.1f}") -> str:
        return "?" if value is None else fmt.format(value)

    for label, runs in qlora.get("runs", {}).items():
        for kind, r in runs.items():
            lines.append("| " + " | ".join([
                label, kind, "yes" if r.get("ok") else ("timed out" if r.get("timed_out") else "no"),
                cell(r.get("peak_cuda_whole_run_mib")), cell(r.get("fit_peak_cuda_mib")),
                cell(r.get("device_used_peak_whole_run_mib")), cell(r.get("median_step_s"), "{:.3f}"),
                cell(r.get("lora_params"), "{:,}"), cell(r.get("optimizer_params"), "{:,}"), cell(r.get("wall_s"), "{:.0f}"),
            ]) + " |")  # fmt: skip
    if qlora.get("peak_ratio_plugin_vs_litgpt") is not None or qlora.get("runs"):
        lines += ["", f"On {qlora.get('model')}: plugin qv / LitGPT CUDA peak whole run"
                      f" {qlora.get('peak_ratio_plugin_vs_litgpt')}, training loop {qlora.get('loop_peak_ratio_plugin_vs_litgpt')},"
                      f" device memory in use {qlora.get('device_used_peak_ratio_plugin_vs_litgpt')}, step time"
                      f" {qlora.get('step_time_ratio_plugin_vs_litgpt')} (limit for the peaks: {PEAK_RATIO_LIMIT})."]  # fmt: skip
    plan = results.get("plan")
    if plan:
        if plan.get("ok"):
            lines += ["", f"`litgpt-plop plan --method plop --precision bf16-true` on the {plan['shape']} shape, block by block,"
                          f" {PLAN_PROMPTS} reasoning-gym prompts: CUDA peak allocated {cell(plan.get('peak_cuda_whole_run_mib'))} MiB, device memory"
                          f" in use {cell(plan.get('device_used_peak_whole_run_mib'))} MiB at its peak"
                          f" ({cell(plan.get('device_used_at_start_mib'))} at start), peak RSS {cell(plan.get('vmhwm_end_mib'))} MiB,"
                          f" {cell(plan.get('wall_s'), '{:.0f}')} s."]  # fmt: skip
        else:
            why = "skipped for time" if plan.get("skipped_for_time") else "failed"
            lines += ["", f"The plan on the {plan['shape']} shape: {why}."]
    return "\n".join(lines)


def done_criteria(results: dict[str, Any]) -> dict[str, Any]:
    """Issue #18's "Done when", as measured."""
    tests, qlora = results.get("gpu_tests") or {}, results.get("qlora") or {}
    return {
        "gpu_name": results.get("gpu_name"),
        "gpu_tests_pass": bool(tests.get("passed")) and not tests.get("failed") and not tests.get("errors"),
        "plugin_peak_within_limit": qlora.get("within_limit"),
        "plan_8b_device_used_peak_mib": (results.get("plan") or {}).get("device_used_peak_whole_run_mib"),
    }
