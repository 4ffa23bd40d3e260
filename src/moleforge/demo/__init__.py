"""``moleforge demo``: S'MoRE, MoLoRA and LoRA at one parameter budget, fine-tuned side by side on a small model
built from a shipped config, with pictures and a report. Runs offline on a CPU.

    from moleforge.demo import DemoConfig, run_demo
    paths = run_demo("runs/demo", DemoConfig(steps=300))
"""

from .run import DemoConfig, MethodRun, build_model, matched_lora, matched_molora, run_demo

__all__ = ["DemoConfig", "MethodRun", "run_demo", "build_model", "matched_lora", "matched_molora"]
