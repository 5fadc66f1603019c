"""A hardware-aware schedule in a build's report: the planner's choice (``auto_schedule.json``, written
by :mod:`vitfold.plan.auto_schedule` through the build) beside what the build then measured. No torch."""

from __future__ import annotations

#: The planner's record in a build directory; :func:`vitfold.profiles.report.profile_build` reads it.
AUTO_JSON = "auto_schedule.json"


def describe(info: dict) -> str:
    """The picked schedule in the method's own terms: ``r = [...]`` or ``keep_rate = [...] at blocks [...]``."""
    if "r" in info:
        return f"r = {info['r']}"
    where = f" at blocks {info['locations']}" if "locations" in info else ""
    return f"keep_rate = {info['keep_rate']}{where}"


def with_measurement(info: dict, report: dict) -> dict:
    """``info`` plus the build's measured latency and speedup (dense and reduced interleaved)."""
    measured = report["latency"]["reduced"]["median_ms"]
    return {**info, "measured_ms": measured, "measured_speedup": report["speedup"],
            "prediction_error": measured / info["predicted_ms"] - 1,
            "met_target": (report["speedup"] >= info["target_speedup"]) if info.get("target_speedup")
            else measured <= info["latency_budget_ms"]}


def render_markdown(auto: dict) -> list[str]:
    """Report lines for an auto schedule: target, chosen tokens, predicted vs measured."""
    target = (f"target speedup {auto['target_speedup']:.2f}x" if auto.get("target_speedup")
              else f"latency budget {auto['latency_budget_ms']:.2f} ms")
    lines = ["", "## Hardware-aware schedule (auto)", "",
             f"- {target}; budget {auto['latency_budget_ms']:.2f} ms; curve: {auto['curve']}",
             f"- {auto.get('method', 'tome')}: {describe(auto)} (tokens {auto['tokens']}; at most "
             f"{auto.get('max_merge_fraction', 0.5):.0%} of a block's tokens removed in one block)",
             f"- predicted {auto['predicted_ms']:.2f} ms ({auto['predicted_speedup']:.2f}x over the calibrated dense "
             f"{auto['calibration']['dense_ms']:.2f} ms); cost model: outside blocks {auto['cost_model']['base_ms']:.2f} ms, "
             f"reduction overhead {auto['cost_model'].get('site_ms', 0.0):.3f} ms per reducing block (site) + "
             f"{auto['cost_model']['merge_us_per_token']:.2f} us per token entering it"]
    if "sites" in auto:
        lines.append(f"- {auto['sites']} reduction sites, predicted to cost {auto['reduction_ms']:.2f} ms "
                     f"({auto['reduction_ms'] / auto['predicted_ms']:.1%} of the predicted run)")
    if "measured_ms" in auto:
        lines.append(f"- measured {auto['measured_ms']:.2f} ms, speedup {auto['measured_speedup']:.2f}x "
                     f"(prediction off by {auto['prediction_error']:+.1%}); target "
                     + ("met" if auto["met_target"] else "**missed**"))
    return lines
