"""Stock nnU-Net against any set of named arms (DiffAug ratios, schedules, equal exposure, PatchMix,
controls) on held-out real cases, at several training-set sizes and seeds.

For every (training-set size, seed) the benchmark draws ONE training subset from the real cases
outside a fixed held-out test set; every arm (and the synthesizers) sees only that subset. Each
subset is a fold of the benchmark's own ``splits_final.json`` whose 'val' is the test set, so
nnU-Net's own final validation (predictor + evaluation, final checkpoint, no selection on the test
set) scores every arm on the same held-out cases.

Modules: ``arms`` (names -> trainer, env, synthetic set), ``settings``, ``workspace`` (folders,
subsets, shared synthetic sets), ``run`` (the steps), ``report`` (statistics, table, plot).
"""
from nnunet_diffaug.benchmark.arms import (DEFAULT_ARMS, DIFFAUG_TRAINER, STOCK_TRAINER, Arm, SyntheticSpec,
                                           builtin_arm, load_arms_file, resolve_arms)
from nnunet_diffaug.benchmark.report import aggregate, collect_results, format_table, headline_reading, write_report
from nnunet_diffaug.benchmark.run import run_benchmark
from nnunet_diffaug.benchmark.settings import (ARM_DEFINING_SETTINGS, BenchmarkSettings, check_same_arm_settings,
                                               settings_arms)
from nnunet_diffaug.benchmark.workspace import check_inputs, draw_subsets, make_workspace

__all__ = ["ARM_DEFINING_SETTINGS", "DEFAULT_ARMS", "DIFFAUG_TRAINER", "STOCK_TRAINER", "Arm", "BenchmarkSettings",
           "SyntheticSpec", "aggregate", "builtin_arm", "check_inputs", "check_same_arm_settings", "collect_results",
           "draw_subsets", "format_table", "headline_reading", "load_arms_file", "make_workspace", "resolve_arms",
           "run_benchmark", "settings_arms", "write_report"]
